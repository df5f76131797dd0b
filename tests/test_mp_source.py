"""The Materials Project reader (data/mp_source.py): real shards from ../shared/mp, and shards written here
with bad lines, a gap and a truncation (those run in a bare clone too)."""

from __future__ import annotations

import itertools
import json
import lzma
import warnings
from pathlib import Path
from typing import Any

import pytest

from xrdvision.crystal.labels import derive_labels
from xrdvision.data.mp_source import (
    crystal_system_of,
    drop_compounds,
    mp_labels,
    read_mp_records,
    reduced_formula,
)
from xrdvision.errors import InputError

NACL: dict[str, Any] = {
    "id": "mp-22862",
    "formula": "NaCl",
    "nsites": 8,
    "cell": [5.69, 5.69, 5.69, 90.0, 90.0, 90.0],
    "species": ["Na"] * 4 + ["Cl"] * 4,
    "frac": [
        *([0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]),
        *([0.5, 0.5, 0.5], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]),
    ],
    "sg": 225,
    "icsd": True,
}


def write_shard(path: Path, lines: list[str]) -> Path:
    with lzma.open(path, "wt", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))
    return path


def record(i: int, **changes: Any) -> dict[str, Any]:
    return {**NACL, "id": f"mp-{i}", **changes}


def test_reduced_formula_is_pymatgens() -> None:
    assert reduced_formula(["O", "Si", "O"]) == "SiO2"
    assert reduced_formula(["Fe", "Fe", "O", "O", "O"]) == "Fe2O3"
    assert reduced_formula(NACL["species"]) == "NaCl"


def test_crystal_system_of_space_group_numbers() -> None:
    assert [crystal_system_of(n) for n in (1, 3, 16, 75, 143, 168, 195, 230)] == [
        "triclinic",
        "monoclinic",
        "orthorhombic",
        "tetragonal",
        "trigonal",
        "hexagonal",
        "cubic",
        "cubic",
    ]
    with pytest.raises(ValueError, match="231"):
        crystal_system_of(231)


def test_bad_input_is_one_line_each_and_the_read_goes_on(tmp_path: Path) -> None:
    good = [json.dumps(record(i)) for i in range(3)]
    write_shard(
        tmp_path / "structures-00.jsonl.xz",
        [
            good[0],
            "{not json",
            json.dumps(record(11, species=["Na"] * 4 + ["Xx"] * 4)),
            json.dumps({k: v for k, v in record(12).items() if k != "frac"}),
            json.dumps(record(13, cell=[1, 2, 3])),
            good[1],
        ],
    )
    # structures-01 is missing; structures-02 is cut short: its first record survives.
    full = lzma.compress(("\n".join([good[2]] + [json.dumps(record(100 + i)) for i in range(400)])).encode())
    (tmp_path / "structures-02.jsonl.xz").write_bytes(full[: len(full) // 2])
    errors: list[str] = []
    recs = list(read_mp_records(tmp_path, errors=errors))
    assert [r["id"] for r in recs][:3] == ["mp-0", "mp-1", "mp-2"]
    assert all(r["reduced_formula"] == "NaCl" and r["shard"].startswith("structures-") for r in recs)
    assert len(errors) == 6, errors
    text = "\n".join(errors)
    assert all("\n" not in e for e in errors)
    assert "structures-01.jsonl.xz: missing shard" in text
    assert "structures-00.jsonl.xz:line 2:" in text
    assert "structures-00.jsonl.xz:mp-11 (line 3): unknown element 'Xx' (atom 4)" in text
    assert "structures-00.jsonl.xz:mp-12 (line 4): missing field(s) frac" in text
    assert "structures-00.jsonl.xz:mp-13 (line 5): cell must be 6 numbers" in text
    assert "structures-02.jsonl.xz: truncated or damaged after line" in text


def test_a_missing_folder_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="shard folder not found"):
        list(read_mp_records(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="no shards"):
        list(read_mp_records(tmp_path))


def test_filters_leakage_and_nested_seeded_samples(tmp_path: Path) -> None:
    lines = [json.dumps(record(i, icsd=i % 2 == 0, species=NACL["species"])) for i in range(40)]
    lines += [json.dumps(record(100 + i, species=["K"] * 4 + ["Cl"] * 4)) for i in range(20)]
    write_shard(tmp_path / "structures-00.jsonl.xz", lines)
    assert len(list(read_mp_records(tmp_path))) == 60
    assert len(list(read_mp_records(tmp_path, icsd_only=True))) == 20 + 20
    assert list(read_mp_records(tmp_path, max_sites=7)) == []
    assert {r["reduced_formula"] for r in read_mp_records(tmp_path, exclude_formulas={"NaCl"})} == {"KCl"}
    small = [r["id"] for r in read_mp_records(tmp_path, max_structures=10, seed=7)]
    large = [r["id"] for r in read_mp_records(tmp_path, max_structures=30, seed=7)]
    assert len(small) == 10 and len(large) == 30 and set(small) <= set(large)
    assert small == [r["id"] for r in read_mp_records(tmp_path, max_structures=10, seed=7)]
    assert small != [r["id"] for r in read_mp_records(tmp_path, max_structures=10, seed=8)]
    assert small == sorted(small, key=lambda s: int(s[3:]))  # shard order, not draw order
    dropped: list[str] = []
    kept = list(drop_compounds(read_mp_records(tmp_path), {"KCl"}, dropped))
    assert len(kept) == 40 and len(dropped) == 20 and dropped[0] == "mp-100"


def test_labels_from_arrays(tmp_path: Path) -> None:
    assert mp_labels(NACL) == (225, "cubic")
    with pytest.raises(ValueError, match="zero-volume"):
        mp_labels(record(1, cell=[5.0, 5.0, 5.0, 90.0, 90.0, 180 - 1e-9]))


@pytest.mark.needs_shared("mp")
def test_real_shards_labels_agree_with_the_projects_pymatgen_labels(mp_dir: Path) -> None:
    """spglib on the arrays gives what crystal.labels gives on the pymatgen structure, including where
    the shard's own ``sg`` says otherwise (mp-21, mp-53 among the first hundred)."""
    from pymatgen.core import Lattice, Structure

    recs = list(itertools.islice(read_mp_records(mp_dir), 120))
    assert [r["id"] for r in recs[:2]] == ["mp-1", "mp-2"]
    assert recs[0]["shard"] == "structures-00.jsonl.xz" and recs[0]["icsd"] is True
    disagree = 0
    for rec in recs:
        ours = mp_labels(rec, 0.01, 5.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = Structure(Lattice.from_parameters(*rec["cell"]), rec["species"], rec["frac"])
            ref = derive_labels(s, 0.01, 5.0)
        assert ours == (ref.space_group, ref.crystal_system), rec["id"]
        assert rec["reduced_formula"] == ref.reduced_formula
        disagree += ours[0] != rec["sg"]
    assert 0 < disagree < 12


@pytest.mark.needs_shared("mp")
def test_real_sample_is_seeded(mp_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "structures-00.jsonl.xz").symlink_to(mp_dir / "structures-00.jsonl.xz")
    kwargs: dict[str, Any] = {"max_structures": 20, "seed": 42, "icsd_only": True, "max_sites": 10}
    a = list(read_mp_records(tmp_path, **kwargs))
    assert [r["id"] for r in a] == [r["id"] for r in read_mp_records(tmp_path, **kwargs)]
    assert len({r["id"] for r in a}) == 20 and all(r["icsd"] and r["nsites"] <= 10 for r in a)
