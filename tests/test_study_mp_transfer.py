"""benchmarks/study_mp_transfer.py's parts: its figures are only worth quoting if no COD compound reaches
training, the samples are nested and seeded, every structure gets the project's own label and the
peer's features, and scores are taken on the subsets they claim. Shards written here run in a bare
clone; the real Materials Project shards and COD CIFs are used where ../shared has them."""

from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xrdvision.config import load_params
from xrdvision.crystal.labels import class_names
from xrdvision.crystal.powder import PowderSettings, simulate_batch
from xrdvision.data.cod_set import CodSet, build_cod_set, has_carbon_and_hydrogen, pipeline_split
from xrdvision.data.mp_source import Entry, catalogue, mp_shards, read_lines
from xrdvision.models.mp_transfer import (
    Featurised,
    disagreement_rate,
    element_set,
    featurise_chunk,
    featurise_shards,
    score_subsets,
    select,
    shard_tasks,
    train_and_score,
)
from xrdvision.models.peak_peer import (
    N_FEATURES,
    batch_features,
    class_probabilities,
    make_peer,
    peak_list_features,
)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = class_names("crystal_system")
NACL: dict[str, Any] = {
    "id": "mp-22862",
    "cell": [5.69, 5.69, 5.69, 90.0, 90.0, 90.0],
    "species": ["Na"] * 4 + ["Cl"] * 4,
    "frac": [
        *([0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]),
        *([0.5, 0.5, 0.5], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]),
    ],
    "sg": 225,
    "crystal_system": "cubic",
    "icsd": True,
}
RUTILE: dict[str, Any] = {  # TiO2, P4_2/mnm
    "id": "mp-2657",
    "cell": [4.65, 4.65, 2.97, 90.0, 90.0, 90.0],
    "species": ["Ti", "Ti", "O", "O", "O", "O"],
    "frac": [
        [0, 0, 0],
        [0.5, 0.5, 0.5],
        [0.305, 0.305, 0],
        [0.695, 0.695, 0],
        [0.805, 0.195, 0.5],
        [0.195, 0.805, 0.5],
    ],
    "sg": 136,
    "crystal_system": "tetragonal",
    "icsd": False,
}


def write_shard(path: Path, records: list[dict[str, Any]]) -> Path:
    with lzma.open(path, "wt", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    return path


def test_peak_features_are_scale_free_but_for_the_first_line() -> None:
    d = np.array([4.0, 2.0, 1.5, 1.2, 1.0])
    amp = np.array([1.0, 0.5, 0.001, 0.3, 0.2])  # the 0.1 % line is below the 0.2 % cut
    f = peak_list_features(amp, d)
    assert f.shape == (N_FEATURES,) == (85,)
    q = 1 / d[[0, 1, 3, 4]] ** 2
    assert np.allclose(f[:4], q / q[0]) and np.all(f[4:40] == 0)
    assert f[40:84].sum() == 3  # ratios 1, 4, 11.1 (16 is past the last bin)
    assert f[84] == pytest.approx(1 / 16)
    stretched = peak_list_features(amp, 1.03 * d)  # a DFT cell 3 % too large
    assert np.allclose(stretched[:84], f[:84]) and stretched[84] < f[84]
    with pytest.raises(ValueError, match="empty"):
        peak_list_features(np.zeros(0), np.zeros(0))


def test_study_representation_uses_the_shared_features() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("sr", ROOT / "benchmarks" / "study_representation.py")
    sr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sr)

    class Pat:  # the Patterns interface the study reads
        def peaks(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            d = np.array([3.0, 2.0, 1.0]) * (k + 1)
            return np.zeros(3), np.array([1.0, 0.5, 0.2]), d

    got = sr.peak_features(Pat(), [0, 2])
    assert np.array_equal(got[1], peak_list_features(np.array([1.0, 0.5, 0.2]), np.array([9.0, 6.0, 3.0])))


def test_class_probabilities_use_the_fixed_class_order() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    y = np.array(["trigonal", "cubic", "monoclinic"] * 20)
    model = make_peer(20, n_jobs=1).fit(X, y)
    probs = class_probabilities(model, X[:5], CLASSES)
    assert probs.shape == (5, 7) and np.allclose(probs.sum(1), 1)
    absent = [CLASSES.index(c) for c in CLASSES if c not in y]
    assert np.all(probs[:, absent] == 0)
    assert np.allclose(probs[:, CLASSES.index("cubic")], model.predict_proba(X[:5])[:, 0])


def entry(i: int, formula: str, icsd: bool = False) -> Entry:
    return Entry(f"structures-{i // 10:02d}.jsonl.xz", i % 10 + 1, f"mp-{i}", formula, icsd, 4)


def test_selection_drops_held_out_compounds_everywhere_and_nests() -> None:
    entries = [entry(i, ["NaCl", "SiO2", f"X{i}"][i % 3], icsd=i % 2 == 0) for i in range(300)]
    sel = select(entries, {"NaCl", "SiO2"}, [10, 50, 1000], seed=3)
    assert sel["n_catalogue"] == 300 and sel["n_dropped"] == 200 and sel["n_left"] == 100
    assert sel["n_dropped_icsd"] == 100 and len(sel["icsd"]) == 50
    assert sel["dropped_formulas"] == ["NaCl", "SiO2"]
    sets = [*sel["sizes"].values(), sel["icsd"]]
    assert all(e.reduced_formula not in {"NaCl", "SiO2"} for s in sets for e in s)
    assert all(e.icsd for e in sel["icsd"])
    small, mid, big = (set(e.id for e in sel["sizes"][n]) for n in (10, 50, 1000))
    assert len(small) == 10 and len(mid) == 50 and len(big) == 100 and small < mid < big
    again = select(entries, {"NaCl", "SiO2"}, [10], seed=3)["sizes"][10]
    other = select(entries, {"NaCl", "SiO2"}, [10], seed=4)["sizes"][10]
    assert [e.id for e in again] == [e.id for e in sel["sizes"][10]] != [e.id for e in other]


def test_element_set_is_the_chemical_system() -> None:
    assert element_set("Fe0.5Ni0.5O") == {"Fe", "Ni", "O"} == element_set("NiFeO2")
    assert element_set("H17C5AlP2N2O8") == {"H", "C", "Al", "P", "N", "O"}


def test_shard_tasks_group_by_shard_in_line_order() -> None:
    entries = [entry(i, "A") for i in (25, 3, 1, 2, 27, 8)]
    tasks = shard_tasks(entries, chunk=2)
    assert tasks == [
        ("structures-00.jsonl.xz", [2, 3]),
        ("structures-00.jsonl.xz", [4, 9]),
        ("structures-02.jsonl.xz", [6, 8]),
    ]


def test_featurise_chunk_labels_each_structure_and_reports_the_bad_one() -> None:
    flat = {**NACL, "id": "mp-flat", "cell": [5.0, 5.0, 5.0, 90.0, 90.0, 180.0]}
    out = featurise_chunk([NACL, flat, RUTILE], PowderSettings(), 0.01, 5.0)
    assert out["ids"] == ["mp-22862", "mp-2657"] and out["X"].shape == (2, N_FEATURES)
    assert out["label"] == ["cubic", "tetragonal"] and out["space_group"] == [225, 136]
    assert out["shard_space_group"] == [225, 136]
    assert list(out["errors"]) == ["mp-flat"] and "mp:mp-flat" in out["errors"]["mp-flat"]
    # the features are those of the batch simulator's peak list
    X, kept = batch_features(simulate_batch([NACL]))
    assert np.array_equal(out["X"][0], X[0]) and kept.tolist() == [0]


def test_featurise_shards_in_worker_processes(tmp_path: Path) -> None:
    recs = [{**NACL, "id": f"mp-{i}"} if i % 2 else {**RUTILE, "id": f"mp-{i}"} for i in range(6)]
    recs[3] = {**recs[3], "frac": [[0, 0, 0]] * 8}  # eight atoms on one spot: the simulator's to reject
    write_shard(tmp_path / "structures-00.jsonl.xz", recs[:4])
    write_shard(tmp_path / "structures-01.jsonl.xz", recs[4:])
    entries = list(catalogue(mp_shards(tmp_path)))
    tasks = shard_tasks(entries, chunk=3)
    got = featurise_shards(tmp_path, tasks, workers=2)
    assert got.ids == ["mp-0", "mp-1", "mp-2", "mp-4", "mp-5"] and list(got.errors) == ["mp-3"]
    assert got.label.tolist() == ["tetragonal", "cubic", "tetragonal", "tetragonal", "cubic"]
    assert disagreement_rate(got.space_group, got.shard_space_group) == 0.0
    here = featurise_chunk(
        read_lines(tmp_path / "structures-00.jsonl.xz", [1, 2]), PowderSettings(), 0.01, 5.0
    )
    assert np.array_equal(got.X[:2], here["X"])
    got.save(tmp_path / "f.npz")
    back = Featurised.load(tmp_path / "f.npz")
    assert back.ids == got.ids and np.array_equal(back.X, got.X) and back.errors == got.errors
    assert back.take(back.rows_of(["mp-5", "nope", "mp-0"])).ids == ["mp-5", "mp-0"]


def test_disagreement_rate_skips_unknown() -> None:
    assert disagreement_rate([225, 136, 14, 2], [225, 0, 15, 2]) == pytest.approx(1 / 3)
    assert np.isnan(disagreement_rate([1], [0]))


def test_scores_are_taken_on_each_named_subset() -> None:
    y = np.array(["cubic"] * 6 + ["trigonal"] * 4)
    probs = np.zeros((10, 7))
    probs[:, CLASSES.index("cubic")] = 1.0  # always cubic: right on the first six
    mask = np.arange(10) < 8
    got = score_subsets(
        probs, y, CLASSES, {"all": np.ones(10, bool), "first8": mask, "none": ~np.ones(10, bool)}, 0
    )
    assert got["all"]["accuracy"] == 0.6 and got["all"]["n_test"] == 10
    assert got["first8"]["accuracy"] == 0.75 and got["first8"]["n_test"] == 8
    assert got["all"]["balanced_accuracy"] == 0.5
    assert got["all"]["accuracy_ci95_low"] <= 0.6 <= got["all"]["accuracy_ci95_high"]
    assert got["none"] == {}


def test_train_and_score_learns_what_separates_and_times_it() -> None:
    rng = np.random.default_rng(1)
    y = np.array(["cubic", "hexagonal"] * 100)
    X = rng.normal(size=(200, 5)) + (y == "cubic")[:, None] * 4
    out = train_and_score(
        X[:150], y[:150], X[150:], y[150:], CLASSES, {"all": np.ones(50, bool)}, 0, n_estimators=20
    )
    assert out["cod"]["all"]["accuracy"] > 0.95 and out["n_train"] == 150
    assert out["train_per_class"]["cubic"] == 75 and out["fit_seconds"] >= 0


def test_carbon_and_hydrogen() -> None:
    assert has_carbon_and_hydrogen(["C", "H", "N", "Cu"]) and not has_carbon_and_hydrogen(["C", "O", "Ca"])


@pytest.mark.needs_shared("cod")  # ids outside the embedded 719 (1000026, 2101499)
def test_cod_set_labels_simulates_and_round_trips(cod_dir: Path, tmp_path: Path) -> None:
    # 1000017 and 1000032: corundum twice (one compound group); 1000026 MgB2; 2101499 carbon
    paths = [cod_dir / f"{i}.cif" for i in ("1000017", "1000026", "1000032", "2101499")]
    paths.append(tmp_path / "broken.cif")
    paths[-1].write_text("data_broken\n_cell_length_a 5\n")
    cod = build_cod_set(paths, workers=1)
    assert cod.ids == ["1000017", "1000026", "1000032", "2101499"] and list(cod.failed) == ["broken"]
    assert cod.crystal_system.tolist() == ["trigonal", "hexagonal", "trigonal", "cubic"]
    assert cod.reduced_formula[0] == cod.reduced_formula[2] == "Al2O3" and not cod.has_c_and_h.any()
    tt, amp, _ = cod.peaks(1)
    assert len(tt) > 5 and amp.max() == pytest.approx(1.0) and np.all(np.diff(tt) > 0)
    cod.save(tmp_path / "cod.npz")
    back = CodSet.load(tmp_path / "cod.npz")
    assert back.ids == cod.ids and np.array_equal(back.d, cod.d) and back.failed == cod.failed
    split = pipeline_split(cod, cod.ids, {"train": 0.7, "val": 0.2, "test": 0.1}, 42)
    assert split["1000017"] == split["1000032"]  # one compound, one split


@pytest.mark.needs_shared("mp")
def test_real_shard_records_featurise_with_few_label_disagreements(mp_dir: Path) -> None:
    recs = read_lines(mp_dir / "structures-00.jsonl.xz", range(1, 201))
    out = featurise_chunk(recs, PowderSettings(), 0.01, 5.0)
    assert len(out["ids"]) >= 195 and out["X"].shape[1] == N_FEATURES
    assert np.isfinite(out["X"]).all()
    assert disagreement_rate(out["space_group"], out["shard_space_group"]) < 0.05


@pytest.mark.needs_shared("cod")
def test_default_split_of_the_canonical_structures_is_the_documented_one(cod_dir: Path) -> None:
    # README: the default run splits the 719 canonical structures 502 / 145 / 72.
    from xrdvision.data.embedded import canonical_ids

    canon = canonical_ids(cod_dir / "INDEX.csv", cod_dir / "SOURCES.csv")
    rows = {}
    import csv

    with open(cod_dir / "INDEX.csv", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            rows[r["cod_id"]] = r
    # INDEX.csv's labels are spglib's at 0.01 (fallbacks as labels.py): the split's inputs, no CIF read
    cod = CodSet(
        ids=list(rows),
        crystal_system=np.array([r["crystal_system"] for r in rows.values()]),
        space_group=np.array([int(r["space_group_number"]) for r in rows.values()]),
        reduced_formula=np.array([_reduced(r["formula"]) for r in rows.values()]),
        has_c_and_h=np.zeros(len(rows), bool),
        offsets=np.zeros(len(rows) + 1, np.int64),
        two_theta=np.zeros(0),
        intensity=np.zeros(0),
        d=np.zeros(0),
    )
    params = load_params(ROOT / "params.yaml")
    fractions = {"train": params.split.train, "val": params.split.val, "test": params.split.test}
    split = pipeline_split(cod, canon, fractions, params.seed)
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 502, "val": 145, "test": 72}


def _reduced(formula: str) -> str:
    from pymatgen.core import Composition

    return Composition(formula).reduced_formula


def test_labelled_peak_lists_keep_the_order_given(tmp_path: Path) -> None:
    from xrdvision.models.mp_transfer import labelled_peak_lists

    flat = {**NACL, "id": "mp-flat", "cell": [5.0, 5.0, 5.0, 90.0, 90.0, 180.0]}
    write_shard(tmp_path / "structures-00.jsonl.xz", [NACL, flat, RUTILE])
    entries = {e.id: e for e in catalogue(mp_shards(tmp_path))}
    ids, lists, labels, bad = labelled_peak_lists(
        tmp_path, [entries[i] for i in ("mp-2657", "mp-flat", "mp-22862")], PowderSettings()
    )
    assert (
        ids == ["mp-2657", "mp-22862"]
        and labels.tolist() == ["tetragonal", "cubic"]
        and list(bad) == ["mp-flat"]
    )
    assert np.array_equal(lists[1].two_theta, simulate_batch([NACL]).peaks(0).two_theta)
