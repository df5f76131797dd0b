"""The ``generate`` stage (data/generate*.py, data/generator_*.py, models/synth_peer.py): statistics fitted
on real training CIFs only, crystals drawn on PyXtal's real Wyckoff tables and labelled by spglib, shards
in the peak-list format that resume and are the same bytes twice, and bad input as one line.

Real structures: the embedded COD CIFs (in git), so a clone without ../shared runs these too."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xrdvision.config import parse_params
from xrdvision.crystal.powder import PowderSettings, simulate_batch
from xrdvision.data import generate
from xrdvision.data.cod_set import read_cod_entry
from xrdvision.data.generate import plan_tasks, run_generate
from xrdvision.data.generator_fit import LEVELS, describe, fit_statistics
from xrdvision.data.generator_sample import Sampler, load_sampler
from xrdvision.data.generator_tables import group_table, group_tables
from xrdvision.data.mp_source import mp_labels
from xrdvision.errors import ConfigError, InputError
from xrdvision.formats.patterns import Patterns, write_patterns
from xrdvision.formats.peaklists import read_shard, read_shards
from xrdvision.formats.tables import SPLIT_COLUMNS, write_table
from xrdvision.models import synth_peer

N_CIFS = 24


@pytest.fixture(scope="module")
def pipeline(embedded_cifs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What the generate stage reads, from real CIFs: data/cifs, data/split, data/patterns. The last
    training structure gets a validation structure's formula (the leakage rule must drop it)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    cifs = tmp / "cifs"
    cifs.mkdir()
    entries = []
    for stem, path in list(embedded_cifs.items())[: N_CIFS + 8]:
        try:
            entries.append(read_cod_entry(path, 0.01, 5.0))
        except InputError:
            continue
        (cifs / f"{stem}.cif").write_bytes(path.read_bytes())
    entries = entries[:N_CIFS]
    batch = simulate_batch([e["record"] for e in entries], PowderSettings(min_distance=0.0))
    peaks = [(p.two_theta, p.intensity, p.d) for p in (batch.peaks(i) for i in range(len(entries)))]
    patterns = tmp / "patterns"
    patterns.mkdir()
    grid = np.linspace(5, 90, 11)
    write_patterns(
        patterns / "patterns.npz",
        Patterns.from_peak_lists(
            [e["id"] for e in entries], peaks, grid, np.zeros((len(entries), 11)), 1.5406
        ),
    )
    part = {"train": entries[:16], "val": entries[16:20], "test": entries[20:]}
    formula = {e["id"]: e["reduced_formula"] for e in entries}
    leaked = part["train"][-1]["id"]
    formula[leaked] = part["val"][0]["reduced_formula"]
    write_table(
        patterns / "manifest.csv",
        ["cod_id", "status", "reduced_formula"],
        [[i, "ok", f] for i, f in formula.items()],
    )
    for name, rows in part.items():
        write_table(
            tmp / "split" / f"{name}.csv",
            SPLIT_COLUMNS,
            [[f"{e['id']}_0.png", e["id"], e["id"], e["crystal_system"], e["space_group"]] for e in rows],
        )
    return {"cifs": cifs, "split": tmp / "split", "patterns": patterns, "leaked": leaked}


def params(**generate_: Any) -> Any:
    return parse_params({"generate": {"workers": 1, "shard_size": 20, "n_crystals": 60, **generate_}})


def run(p: Any, pipeline: dict[str, Any], tmp: Path, work: Path | None = None) -> dict[str, Any]:
    return run_generate(
        p,
        pipeline["cifs"],
        pipeline["split"],
        pipeline["patterns"],
        tmp / "out",
        tmp / "m.json",
        tmp / "plots",
        work,
    )


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("synth-*.npz"))}


def test_wyckoff_tables_are_pyxtals_as_arrays() -> None:
    tables = group_tables()
    assert sorted(tables) == list(range(1, 231))
    for t in tables.values():
        assert (np.diff(t.offsets) == t.multiplicity).all()
        assert t.dof[0] == 3 and t.letters[-1] == "a"  # the general position first
    fm3m = group_table(225)
    assert fm3m.point_group == "m-3m" and fm3m.crystal_system == "cubic"
    general = fm3m.orbit(0, np.array([0.11, 0.23, 0.37]))
    assert len(np.unique(np.round(general, 6), axis=0)) == 192
    assert np.allclose(
        sorted(map(tuple, fm3m.orbit(fm3m.index("a"), np.zeros(3)))),
        [(0, 0, 0), (0, 0.5, 0.5), (0.5, 0, 0.5), (0.5, 0.5, 0)],
    )
    with pytest.raises(ValueError, match="231"):
        group_table(231)


def test_stage_fits_on_training_only_and_writes_resumable_identical_shards(
    pipeline: dict[str, Any], tmp_path: Path, caplog: Any
) -> None:
    p = params()
    s = run(p, pipeline, tmp_path, tmp_path / "work")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    sel = stats["selection"]
    assert sel["n_cod_train"] == 16 and sel["n_cod_train_dropped_for_leakage"] == 1  # val's formula
    assert stats["sources"] == {"cod": 15 - sel["n_not_described"], "mp": 0}
    assert set(stats["space_groups"]) == {str(n) for n in range(1, 231)}
    assert {v["level"] for v in stats["space_groups"].values()} <= set(LEVELS)
    shards = read_shards(tmp_path / "out", source="synth")
    assert [len(x) + len(x.failed_ids) for x in shards] == [20, 20, 20]
    assert s["n_structures"] + s["n_failed"] == 60 and s["n_structures"] >= 50
    first = shards[0]
    assert first.source == "synth" and first.normal is not None and first.ids[0].startswith("synth-")
    assert (first.source_space_group > 0).all() and len(first.two_theta) > 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    for key in (
        "volume_per_atom",
        "c_over_a",
        "n_lines",
        "first_line",
        "top10_share",
        "crystal_system",
        "space_group",
    ):
        assert 0 <= metrics[f"ks_{key}"] <= 1
        assert (tmp_path / "plots" / f"{key}.csv").read_text().startswith("bin,real,generated\n")
    assert 0 <= metrics["space_group_mismatch_rate"] < 0.3
    # resume: nothing to build; a fresh folder gets the same bytes; a smaller run is a prefix
    with caplog.at_level(logging.INFO, logger="xrdvision"):
        again = run(p, pipeline, tmp_path)
    assert again["timing"]["n_built"] == 0 and again["n_structures"] == s["n_structures"]
    assert "resuming: 3 of 3 shards already done" in caplog.text
    other = tmp_path / "again"
    run(p, pipeline, other)
    assert files(other / "out") == files(tmp_path / "out")
    small = tmp_path / "small"
    run(params(n_crystals=20), pipeline, small)
    assert files(small / "out") == {"synth-00000.npz": files(tmp_path / "out")["synth-00000.npz"]}


def test_synthetic_only_peer_is_scored_on_real_validation_and_test(
    pipeline: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = params()
    run(p, pipeline, tmp_path)
    monkeypatch.setattr(synth_peer, "SIZES", (10, 100))
    scores = synth_peer.run_synth_peer(
        p, tmp_path / "out", pipeline["split"], pipeline["patterns"], tmp_path / "m.json"
    )
    assert scores["synth_only_scored_on"] == 8 and "synth_only_accuracy_1e2" not in scores
    assert 0 <= scores["synth_only_accuracy_1e1"] <= 1 and scores["synth_only_trained_1e1"] <= 10
    assert (
        json.loads((tmp_path / "m.json").read_text())["synth_only_accuracy_1e1"]
        == scores["synth_only_accuracy_1e1"]
    )


def _stats(embedded_cifs: dict[str, Path]) -> dict[str, Any]:
    descs = []
    for path in list(embedded_cifs.values())[:12]:
        try:
            descs.append(describe(read_cod_entry(path, 0.01, 5.0)["record"]))
        except (InputError, ValueError):
            continue
    return fit_statistics(descs, min_structures=3)


@pytest.fixture(scope="module")
def stats(embedded_cifs: dict[str, Path]) -> dict[str, Any]:
    return _stats(embedded_cifs)


def test_drawn_crystals_keep_their_space_group_mostly(stats: dict[str, Any]) -> None:
    sampler = Sampler(stats, max_atoms=200)
    rng = np.random.default_rng(0)
    same = total = 0
    for sg in (2, 14, 62, 139, 166, 194, 225):
        for k in range(5):
            rec = sampler.crystal(sg, rng, f"c{k}")
            assert rec is not None and len(rec["species"]) == len(rec["frac"]) <= 200
            total += 1
            same += mp_labels(rec)[0] == sg
    assert same / total >= 0.8


def test_bad_input_is_one_line_naming_it(stats: dict[str, Any], tmp_path: Path) -> None:
    broken = {**stats, "space_groups": {k: v for k, v in stats["space_groups"].items() if k != "17"}}
    with pytest.raises(InputError, match="space group 17 has no statistics at any level") as err:
        Sampler(broken, 200).crystal(17, np.random.default_rng(0), "x")
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="unknown space-group prior 'fancy'"):
        Sampler(stats, 200).space_group_prior("fancy")
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(stats)[:500])
    with pytest.raises(InputError, match=f"{path}: unreadable generator statistics file"):
        load_sampler(path, 200)
    path.write_text(json.dumps({**stats, "groups": {}}))
    with pytest.raises(InputError, match="not a generator statistics file"):
        load_sampler(path, 200)
    with pytest.raises(ConfigError, match=r"generate\.n_crystals"):
        parse_params({"generate": {"n_crystals": -1}})
    with pytest.raises(ConfigError, match=r"generate\.prior"):
        parse_params({"generate": {"prior": "fancy"}})


def test_a_crystal_that_fails_is_counted_and_the_shard_written(stats: dict[str, Any]) -> None:
    bad = json.loads(json.dumps(stats))
    for g in bad["groups"].values():
        g["element_sets"] = {"Xq": 1, **g["element_sets"]}  # an element no form factor knows
    bad["atomic_volume"]["Xq"] = 20.0
    p = params(n_crystals=40)
    task = plan_tasks(p, json.dumps(bad))[0]
    shard = read_shard_bytes(generate.build_shard(task)[0])
    assert len(shard) + len(shard.failed_ids) == 20
    assert shard.failed_reasons and all("synth-" in r for r in shard.failed_reasons)
    assert any("Xq" in r for r in shard.failed_reasons)


def read_shard_bytes(data: bytes) -> Any:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synth-00000.npz"
        path.write_bytes(data)
        return read_shard(path)


def test_mp_structures_without_the_folder_writes_nothing(pipeline: dict[str, Any], tmp_path: Path) -> None:
    p = parse_params(
        {"generate": {"mp_structures": 100, "workers": 1}, "mp": {"folder": str(tmp_path / "nope")}}
    )
    with pytest.raises(InputError, match=r"nope: generate\.mp_structures > 0 but mp\.folder is not a folder"):
        run(p, pipeline, tmp_path)
    assert not list((tmp_path / "out").glob("*"))


_KILLED_RUN = """
import sys
from pathlib import Path
from xrdvision.config import parse_params
from xrdvision.data.generate import run_generate
p = parse_params({"generate": {"workers": 1, "shard_size": 10, "n_crystals": 300}})
a = [Path(x) for x in sys.argv[1:]]
run_generate(p, a[0], a[1], a[2], a[3], a[4], a[5], a[6])
"""


@pytest.mark.slow
def test_kill_9_leaves_whole_shards_and_the_rerun_resumes(
    pipeline: dict[str, Any], tmp_path: Path, caplog: Any
) -> None:
    """As ``dvc exp run`` after an interrupt: shards of the killed run survive in the work folder (outside
    the DVC output, which dvc clears), whole, and the rerun builds only the others."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    out, work = tmp_path / "out", tmp_path / "cache" / "generate"
    paths = [
        pipeline["cifs"],
        pipeline["split"],
        pipeline["patterns"],
        out,
        tmp_path / "m.json",
        tmp_path / "plots",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUN, *map(str, paths), str(work)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(work.glob("synth-*.npz"))) < 3:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = sorted(work.glob("synth-*.npz"))
    assert 3 <= len(written) < 30, "the run should have been killed part way"
    for path in written:
        read_shard(path)
    shutil.rmtree(out, ignore_errors=True)
    p = parse_params({"generate": {"workers": 1, "shard_size": 10, "n_crystals": 300}})
    with caplog.at_level(logging.INFO, logger="xrdvision"):
        run_generate(p, *paths, work)
    assert f"resuming: {len(written)} of 30 shards already done" in caplog.text
    assert not work.exists() and len(list(out.glob("synth-*.npz"))) == 30


def test_off_writes_no_shards_and_a_uniform_prior_covers_all_groups(
    pipeline: dict[str, Any], stats: dict[str, Any], tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "synth-00007.npz").write_bytes(b"left over")
    p = params(n_crystals=0)
    s = run(p, pipeline, tmp_path)
    assert s["enabled"] is False and not list((tmp_path / "out").glob("synth-*"))
    assert json.loads((tmp_path / "m.json").read_text()) == {"n_crystals": 0}
    assert (
        synth_peer.run_synth_peer(
            p, tmp_path / "out", pipeline["split"], pipeline["patterns"], tmp_path / "m.json"
        )
        == {}
    )
    sampler = Sampler(stats, 200)
    assert np.allclose(sampler.space_group_prior("uniform"), 1 / 230)
    train = sampler.space_group_prior("train")
    assert set(np.flatnonzero(train) + 1) == {int(k) for k in stats["space_group_frequency"]}
    rng = np.random.default_rng(3)
    for sg in (1, 75, 143, 168, 195, 230):  # groups no training structure has: pooled statistics
        rec = sampler.crystal(sg, rng, "x")
        assert rec is not None and mp_labels(rec)[1] == group_table(sg).crystal_system
