"""Random crystals for training (real PyXtal, real simulate + render, real symmetry analysis)."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import EMBEDDED_DIR
from xrdvision.config import parse_params
from xrdvision.crystal.labels import analyse_symmetry
from xrdvision.crystal.systems import CRYSTAL_SYSTEMS as SYSTEMS
from xrdvision.data.synthesize import (
    crystal_system_of,
    draw_stoichiometry,
    element_sets,
    random_crystal,
    run_synthesize,
    space_group_weights,
)
from xrdvision.formats.tables import read_synth_train


def test_space_group_to_system_and_weights():
    assert [crystal_system_of(n) for n in (1, 2, 3, 15, 16, 74, 75, 142, 143, 167, 168, 194, 195, 230)] == [
        s for s in SYSTEMS for _ in range(2)
    ]
    with pytest.raises(ValueError):
        crystal_system_of(231)
    sgs, p = space_group_weights([14, 14, 14, 2, 15, 62], "monoclinic")
    assert sgs.tolist() == [14, 15] and p.tolist() == pytest.approx([0.75, 0.25])
    sgs, p = space_group_weights([14], "cubic")  # none in training: uniform over the system
    assert sgs.tolist() == list(range(195, 231)) and p.sum() == pytest.approx(1.0)


def test_element_sets_from_formulas(caplog):
    sets = element_sets(["Al2O3", "SiO2", "O2Si", "CaCO3", "not a formula ###"], 4)
    assert sets == [("Al", "O"), ("C", "Ca", "O"), ("O", "Si")]
    assert "1 training formula(s) unreadable" in caplog.text  # reported (a warning), not silently dropped


@pytest.mark.parametrize("sg", [2, 14, 62, 139, 166, 194, 225])
def test_random_crystal_has_the_drawn_symmetry(sg):
    rng = np.random.default_rng(sg)
    s = None
    for _ in range(20):
        s = random_crystal(sg, ("Mg", "Si", "O"), 40, rng)
        if s is not None:
            break
    assert s is not None
    assert 1 <= len(s) <= 40 and {str(e) for e in s.composition.elements} <= {"Mg", "Si", "O"}
    found = analyse_symmetry(s).get_space_group_number()
    # spglib may find a supergroup of a random arrangement (same or higher system), never a lower one
    assert SYSTEMS.index(crystal_system_of(found)) >= SYSTEMS.index(crystal_system_of(sg))
    counts = draw_stoichiometry(sg, 2, 40, np.random.default_rng(0))
    assert counts is not None and sum(counts) <= 40


def _inputs(tmp: Path) -> tuple[Path, Path]:
    rows = list(csv.DictReader((EMBEDDED_DIR / "SAMPLE.csv").open()))
    split = tmp / "split"
    split.mkdir()
    with open(split / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "cod_id", "group", "copy", "crystal_system", "space_group"])
        for r in rows:
            w.writerow(
                [
                    f"{r['cod_id']}_0.png",
                    r["cod_id"],
                    r["cod_id"],
                    0,
                    r["crystal_system"],
                    r["space_group_number"],
                ]
            )
    manifest = tmp / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["cod_id", "formula", "status"])
        for r in rows:
            w.writerow([r["cod_id"], r["formula"], "ok"])
    return split, manifest


def test_stage_writes_labelled_training_images_deterministically_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    split, manifest = _inputs(tmp_path)
    p = parse_params({"synth": {"per_system": 2, "max_atoms": 24}, "simulate": {"workers": 1}})
    s = run_synthesize(p, split, manifest, tmp_path / "synth")
    assert s["n_cifs"] == 14 and s["n_generation_failed"] == 0
    assert s["n_images"] == s["n_simulated"] >= 12
    rows = list(csv.DictReader((tmp_path / "synth/train.csv").open()))
    assert len(rows) == s["n_images"] and all(r["cod_id"].startswith("synth-") for r in rows)
    # labels are the analysed symmetry of the generated crystal, consistent with its space group
    assert all(crystal_system_of(int(r["space_group"])) == r["crystal_system"] for r in rows)
    assert sum(s["labels_per_system"].values()) == s["n_simulated"]
    img = Image.open(tmp_path / "synth/images" / rows[0]["image"])
    assert img.size == (224, 224)
    px = np.asarray(img.convert("RGB"))
    assert px.max() == 255 and np.median(px) == 0  # white lines on black, as in training
    first = {f.name: f.read_bytes() for f in sorted((tmp_path / "synth/cifs").glob("*.cif"))}

    # a rerun in a fresh folder writes the same crystals; an interrupted one keeps what it had
    again = run_synthesize(p, split, manifest, tmp_path / "again")
    assert {f.name: f.read_bytes() for f in sorted((tmp_path / "again/cifs").glob("*.cif"))} == first
    assert again["n_images"] == s["n_images"]
    victim = sorted((tmp_path / "again/cifs").glob("*.cif"))[3]
    victim.unlink()
    resumed = run_synthesize(p, split, manifest, tmp_path / "again")
    assert victim.read_bytes() == first[victim.name] and resumed["n_images"] == s["n_images"]

    listed = read_synth_train(tmp_path / "synth")
    assert len(listed) == len(rows)
    assert all(r["image"].startswith("synth/") and Path(r["path"]).is_file() for r in listed)


def test_off_by_default_gives_an_empty_list(tmp_path):
    p = parse_params({})
    assert p.synth.per_system == 0
    s = run_synthesize(p, tmp_path / "no-split", tmp_path / "no-manifest.csv", tmp_path / "synth")
    assert s["n_images"] == 0 and read_synth_train(tmp_path / "synth") == []
    assert (tmp_path / "synth/train.csv").read_text().startswith("image,cod_id")


def test_missing_inputs_are_one_line(tmp_path):
    from xrdvision.errors import XrdVisionError

    p = parse_params({"synth": {"per_system": 1}})
    with pytest.raises(XrdVisionError, match=r"train\.csv.*not found"):
        run_synthesize(p, tmp_path / "nope", tmp_path / "m.csv", tmp_path / "synth")
    with pytest.raises(Exception, match=r"synth\.max_atoms"):
        parse_params({"synth": {"max_atoms": 1}})
    with pytest.raises(Exception, match=r"synth\.copies"):
        parse_params({"synth": {"copies": -1}})


def test_rich_chemistry_is_cut_to_max_species_not_dropped(tmp_path):
    """A training compound with more elements than ``synth.max_species`` still gives crystals, with a
    random subset of its elements (COD is mostly C-H-N-O + metals: dropping those skews the chemistry)."""
    from pymatgen.core import Structure

    from xrdvision.data.synthesize import generate_cifs

    train = [{"cod_id": "1", "space_group": "14"}, {"cod_id": "2", "space_group": "225"}]
    manifest = [{"cod_id": "1", "formula": "Cu2 P4 H60 C58 I2 N4"}, {"cod_id": "2", "formula": "Na4 Cl4"}]
    p = parse_params(
        {"synth": {"per_system": 2, "max_atoms": 24, "max_species": 3}, "simulate": {"workers": 2}}
    )
    out = generate_cifs(p, train, manifest, tmp_path / "two")
    assert out["n_written"] == 14 and out["failed"] == []
    files = sorted((tmp_path / "two").glob("*.cif"))
    # the same crystals whatever the number of processes (each is seeded by seed, system, index)
    one = replace(p, simulate=replace(p.simulate, workers=1))
    assert generate_cifs(one, train, manifest, tmp_path / "one")["n_written"] == 14
    assert [f.read_bytes() for f in files] == [(tmp_path / "one" / f.name).read_bytes() for f in files]
    species = [{str(e) for e in Structure.from_file(f).composition.elements} for f in files]
    rich = [s for s in species if s != {"Na", "Cl"}]
    assert rich and all(len(s) == 3 and s <= {"Cu", "P", "H", "C", "I", "N"} for s in rich)
