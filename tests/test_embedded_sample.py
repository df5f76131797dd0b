"""The embedded default sample: the selection rule, and that data/embedded is what it gives."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from conftest import EMBEDDED_DIR
from helpers_cod import cod_index
from xrdvision.crystal.systems import CRYSTAL_SYSTEMS
from xrdvision.data.embedded import EMBEDDED_EXCLUDED, build_embedded_sample, select_sample


def test_select_sample_is_deterministic_and_covers_every_system(cod_dir: Path) -> None:
    args = (cod_dir / "INDEX.csv", cod_dir / "SOURCES.csv")
    ids = select_sample(*args, per_system=15, seed=42, max_atoms=200)

    assert ids == select_sample(*args, per_system=15, seed=42, max_atoms=200)
    assert ids != select_sample(*args, per_system=15, seed=1, max_atoms=200)
    index = cod_index()
    with open(cod_dir / "SOURCES.csv", newline="", encoding="utf-8") as fh:
        variants = {r["cod_id"] for r in csv.DictReader(fh) if r["cod_tools_test_variant"] == "1"}
    rows = [index[i] for i in ids]
    assert Counter(r["crystal_system"] for r in rows) == dict.fromkeys(CRYSTAL_SYSTEMS, 15)
    assert len({(r["formula"], r["space_group_number"]) for r in rows}) == len(rows)
    assert all(int(r["n_atoms_in_cell"]) <= 200 for r in rows)
    assert not variants & set(ids)
    for system in CRYSTAL_SYSTEMS[2:]:  # orthorhombic and up have >= 15 space groups to spread over
        assert len({r["space_group_number"] for r in rows if r["crystal_system"] == system}) == 15


def test_select_sample_exclusion_replaces_only_the_excluded(cod_dir: Path) -> None:
    args = (cod_dir / "INDEX.csv", cod_dir / "SOURCES.csv", 15, 42, 200)
    ids = select_sample(*args)
    dropped = ids[3]
    again = select_sample(*args, exclude=[dropped])
    assert dropped not in again
    assert len(set(ids) - set(again)) == 1


def test_embedded_sample_is_what_select_sample_gives(cod_dir: Path) -> None:
    with open(EMBEDDED_DIR / "SAMPLE.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    ids = select_sample(
        cod_dir / "INDEX.csv", cod_dir / "SOURCES.csv", 15, 42, 200, exclude=EMBEDDED_EXCLUDED
    )
    assert [r["cod_id"] for r in rows] == ids
    index = cod_index()
    assert all(r == {k: index[r["cod_id"]][k] for k in r} for r in rows)
    assert sum((EMBEDDED_DIR / f"{i}.cif").stat().st_size for i in ids) < 3_000_000


def test_build_embedded_sample_checks_and_copies(cod_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "embedded"
    excluded = build_embedded_sample(cod_dir, out, per_system=1, seed=42, max_atoms=200, max_seconds=5.0)

    with open(out / "SAMPLE.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["crystal_system"] for r in rows] == list(CRYSTAL_SYSTEMS)
    assert not {r["cod_id"] for r in rows} & set(excluded)
    for row in rows:
        assert (out / f"{row['cod_id']}.cif").read_bytes() == (cod_dir / f"{row['cod_id']}.cif").read_bytes()
    assert len(list(out.glob("*.cif"))) == 7
