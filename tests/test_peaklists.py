"""The ``peaklists`` stage (data/peaklists.py) and its shard format (formats/peaklists.py): off by default,
leakage-free against COD's validation and test compounds, the same bytes on every run, locally or on a
Dask cluster, resuming after a ``kill -9``, and bad records reported one line each.

Real structures come from one shard of ../shared/mp (``mp_dir``); the bad-input and format tests write
their own and run in a bare clone too."""

from __future__ import annotations

import json
import logging
import lzma
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xrdvision.cli import main
from xrdvision.config import Params, parse_params
from xrdvision.data import peaklists
from xrdvision.data.peaklists import run_peaklists
from xrdvision.errors import InputError
from xrdvision.formats.peaklists import PeakListShard, read_shard, shard_bytes, write_shard_bytes
from xrdvision.formats.tables import SPLIT_COLUMNS, read_table, write_table

ROOT = Path(__file__).resolve().parents[1]
# Compounds of the first structures of structures-00 (mp-1 Cs, mp-2 Pd, mp-8 Re ...) put in COD's splits.
COD = {"val": {"1": "Cs"}, "test": {"2": "Pd"}, "train": {"3": "Re", "4": "SiO2"}}


def cod_split(tmp: Path) -> tuple[Path, Path]:
    """A COD split folder and manifest whose compounds are those of ``COD``."""
    split = tmp / "split"
    rows = []
    for name, members in COD.items():
        write_table(
            split / f"{name}.csv",
            SPLIT_COLUMNS,
            [[f"{i}_0.png", i, f"{f}|1", "cubic", 1] for i, f in members.items()],
        )
        rows += [{"cod_id": i, "status": "ok", "reduced_formula": f} for i, f in members.items()]
    manifest = tmp / "manifest.csv"
    write_table(manifest, ["cod_id", "status", "reduced_formula"], rows)
    return split, manifest


def params(folder: Path, **mp: Any) -> Params:
    sources = mp.pop("train_sources", ["cod", "mp"])
    return parse_params(
        {"split": {"train_sources": sources}, "mp": {"folder": str(folder), "workers": 1, **mp}}
    )


def run(p: Params, tmp: Path, out: str) -> dict[str, Any]:
    split, manifest = cod_split(tmp)
    return run_peaklists(p, split, manifest, tmp / out)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


N_LINES = 2000


@pytest.fixture(scope="module")
def one_shard(mp_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shard folder holding the first 2000 structures of ../shared/mp's structures-00, as a shard."""
    folder = tmp_path_factory.mktemp("mp")
    with lzma.open(mp_dir / "structures-00.jsonl.xz", "rt", encoding="utf-8") as fh:
        lines = [line for _, line in zip(range(N_LINES), fh, strict=False)]
    with lzma.open(folder / "structures-00.jsonl.xz", "wt", encoding="utf-8", preset=0) as out:
        out.write("".join(lines))
    return folder


def test_off_by_default_writes_an_empty_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "peaklists"
    out.mkdir()
    (out / "mp-00007.npz").write_bytes(b"stale")
    (out / ".mp-00008.npz.x.npz.tmp").write_bytes(b"half")
    s = run_peaklists(Params(), tmp_path / "no-split", tmp_path / "no-manifest.csv", out)
    assert s["enabled"] is False and s["reason"] == "split.train_sources has no mp"
    assert sorted(files(out)) == ["leakage.csv", "manifest.csv", "summary.json"]
    assert read_table(out / "manifest.csv", ["id", "status"], "manifest") == []
    params_file = tmp_path / "params.yaml"
    params_file.write_text("seed: 42\n")
    argv = ["--params", str(params_file), "peaklists", "--split", "x", "--manifest", "y", "--out", str(out)]
    assert main(argv) == 0
    assert "peaklists: off (split.train_sources has no mp)" in capsys.readouterr().out


@pytest.mark.needs_shared("mp")
def test_leakage_labels_and_same_bytes_twice(one_shard: Path, tmp_path: Path) -> None:
    p = params(one_shard, max_structures=150, shard_size=40)
    s = run(p, tmp_path, "a")
    again = run(p, tmp_path, "b")
    assert s == again and files(tmp_path / "a") == files(tmp_path / "b")
    assert [x["name"] for x in s["shards"]] == [
        "mp-00000.npz",
        "mp-00001.npz",
        "mp-00002.npz",
        "mp-00003.npz",
    ]
    assert s["n_records_read"] == N_LINES and s["n_selected"] == 150
    assert s["n_structures"] + s["n_failed"] == 150
    # Cs and Pd (COD validation and test) are dropped; Re (COD training) is not.
    leak = s["leakage"]
    dropped = read_table(tmp_path / "a" / "leakage.csv", ["id", "reduced_formula"], "leakage")
    assert {r["reduced_formula"] for r in dropped} == {"Cs", "Pd"} and leak["n_mp_dropped"] == len(
        dropped
    ) >= 2
    assert leak["n_cod_structures"] == 2 and not s["honest_external_test"]
    rows = read_table(tmp_path / "a" / "manifest.csv", ["id", "reduced_formula", "status"], "manifest")
    assert len(rows) == 150 and not {"Cs", "Pd"} & {r["reduced_formula"] for r in rows}
    shard = read_shard(tmp_path / "a" / "mp-00000.npz")
    assert shard.source == "mp" and len(shard) == len(shard.offsets) - 1
    tt, inten = shard.peaks(0)
    assert len(tt) and inten.max() == pytest.approx(1.0) and (np.diff(tt) > 0).all()
    assert tt.min() >= 5 and tt.max() <= 90 and shard.d().shape == shard.two_theta.shape
    # Each line carries its unit plane normal (March-Dollase texture in the training patterns).
    assert shard.normal is not None and shard.normal.shape == (len(shard.two_theta), 3)
    np.testing.assert_allclose(np.linalg.norm(shard.normal.astype(np.float32), axis=1), 1.0, atol=2e-3)
    lab = s["labels"]
    assert sum(lab["per_crystal_system"].values()) == s["n_structures"]
    assert 0 <= lab["disagreement_rate"] < 0.1
    # Training on the Materials Project alone: COD's training compounds are left out too.
    alone = run(params(one_shard, max_structures=150, shard_size=40, train_sources=["mp"]), tmp_path, "c")
    assert alone["honest_external_test"] and alone["leakage"]["n_cod_structures"] == 4
    assert alone["leakage"]["n_mp_dropped"] > leak["n_mp_dropped"]


@pytest.mark.needs_shared("mp")
def test_a_changed_plan_rebuilds_only_what_changed(
    one_shard: Path, tmp_path: Path, caplog: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(params(one_shard, max_structures=120, shard_size=40), tmp_path, "a")
    run(params(one_shard, max_structures=80, shard_size=40), tmp_path, "b")
    run(params(one_shard, max_structures=80, shard_size=40), tmp_path, "a")
    # The 80 are the first of the 120 drawn (nested samples), cut into other shards: all rebuilt, none stale.
    assert files(tmp_path / "a") == files(tmp_path / "b")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xrdvision"):
        run(params(one_shard, max_structures=80, shard_size=40), tmp_path, "a")
    assert "resuming: 2 of 2 shards already done" in caplog.text
    # Other code (a fix in the simulator, say) makes other shards: none is kept.
    monkeypatch.setattr(peaklists, "code_digest", lambda: "other code")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xrdvision"):
        run(params(one_shard, max_structures=80, shard_size=40), tmp_path, "a")
    assert "resuming" not in caplog.text and "2 shards (80 structures) to build" in caplog.text


_KILLED_RUN = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from pathlib import Path
from xrdvision.config import parse_params
from xrdvision.data import peaklists
from xrdvision.data.peaklists import run_peaklists
p = parse_params({"split": {"train_sources": ["cod", "mp"]},
                  "mp": {"folder": sys.argv[1], "max_structures": 300, "shard_size": 10, "workers": 1}})
run_peaklists(p, Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
"""


@pytest.mark.needs_shared("mp")
def test_kill_9_leaves_whole_shards_and_the_rerun_resumes(
    one_shard: Path, tmp_path: Path, caplog: Any
) -> None:
    """Shards are built in a work folder outside the DVC output (``dvc exp run`` clears an output its lock
    does not know): a killed run leaves whole shards there, and the rerun builds only the others."""
    split, manifest = cod_split(tmp_path)
    out, work = tmp_path / "killed", tmp_path / "cache" / "peaklists"
    args = [sys.executable, "-c", _KILLED_RUN, str(one_shard), str(split), str(manifest), str(out), str(work)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(work.glob("mp-*.npz"))) < 3:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = sorted(work.glob("mp-*.npz"))
    assert 3 <= len(written) < 30, "the run should have been killed part way"
    for path in written:
        read_shard(path)  # every shard on disk is whole
    shutil.rmtree(out, ignore_errors=True)  # as dvc exp run does before it reruns the stage
    p = params(one_shard, max_structures=300, shard_size=10)
    with caplog.at_level(logging.INFO, logger="xrdvision"):
        s = run_peaklists(p, split, manifest, out, work)
    assert f"resuming: {len(written)} of 30 shards already done" in caplog.text
    assert not work.exists() and not list(out.glob(".*.tmp"))
    clean = run_peaklists(p, split, manifest, tmp_path / "clean")
    assert s == clean and files(out) == files(tmp_path / "clean")


@pytest.mark.needs_shared("mp")
def test_dask_local_cluster_writes_the_same_bytes(one_shard: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    local = run(params(one_shard, max_structures=300, shard_size=60), tmp_path, "local")
    pool = run(params(one_shard, max_structures=300, shard_size=60, workers=2), tmp_path, "pool")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        address = cluster.scheduler_address
        on_dask = run(
            params(one_shard, max_structures=300, shard_size=60, scheduler=address), tmp_path, "dask"
        )
    assert len(local["shards"]) == 5
    assert local == pool == on_dask
    assert files(tmp_path / "local") == files(tmp_path / "pool") == files(tmp_path / "dask")


def test_an_absent_dask_scheduler_is_one_error(tmp_path: Path) -> None:
    from xrdvision.data.shard_runner import run_tasks
    from xrdvision.errors import ConfigError

    with pytest.raises(ConfigError, match=r"mp.scheduler: no Dask scheduler answers at tcp://127.0.0.1:9"):
        list(run_tasks(str, ["x"], scheduler="tcp://127.0.0.1:9", connect_timeout=1))


NACL = {
    "cell": [5.69, 5.69, 5.69, 90.0, 90.0, 90.0],
    "species": ["Na"] * 4 + ["Cl"] * 4,
    "frac": [
        *([0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]),
        *([0.5, 0.5, 0.5], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]),
    ],
    "sg": 225,
    "icsd": True,
}


def test_bad_records_are_one_line_each_and_the_rest_is_written(tmp_path: Path) -> None:
    folder = tmp_path / "mp"
    folder.mkdir()
    flat = {**NACL, "id": "mp-flat", "cell": [5.0, 5.0, 5.0, 90.0, 90.0, 180 - 1e-9]}
    close = {**NACL, "id": "mp-close", "frac": [[0, 0, 0], [0.01, 0, 0], *NACL["frac"][2:]]}
    lines = [{**NACL, "id": "mp-good"}, flat, close, {**NACL, "id": "mp-xx", "species": ["Xx"] * 8}]
    with lzma.open(folder / "structures-00.jsonl.xz", "wt") as fh:
        fh.write("".join(json.dumps(x) + "\n" for x in lines) + "{broken\n")
    whole = lzma.compress("".join(json.dumps({**NACL, "id": f"mp-{i}"}) + "\n" for i in range(500)).encode())
    (folder / "structures-02.jsonl.xz").write_bytes(whole[: len(whole) // 2])
    s = run(params(folder), tmp_path, "out")
    text = "\n".join(s["read_errors"] + s["failures"])
    assert "structures-00.jsonl.xz:mp-xx (line 4): unknown element 'Xx' (atom 0)" in text
    assert "structures-00.jsonl.xz:line 5:" in text
    assert "structures-01.jsonl.xz: missing shard" in text
    assert "structures-02.jsonl.xz: truncated or damaged after line" in text
    assert "structures-00.jsonl.xz:mp-flat: zero-volume cell" in text
    assert "structures-00.jsonl.xz:mp-close: overlapping atoms" in text
    assert s["n_failed"] == 2 and s["n_read_errors"] == 4
    assert s["n_structures"] == s["n_records_read"] - 2 > 1
    rows = read_table(tmp_path / "out" / "manifest.csv", ["id", "status", "reason"], "manifest")
    failed = {r["id"]: r["reason"] for r in rows if r["status"] == "failed"}
    assert sorted(failed) == ["mp-close", "mp-flat"] and all("\n" not in r for r in failed.values())
    good = next(r for r in rows if r["id"] == "mp-good")
    assert (good["crystal_system"], good["space_group"], good["source_space_group"]) == (
        "cubic",
        "225",
        "225",
    )


def _shard(**changes: Any) -> PeakListShard:
    base = dict(
        ids=["a", "b"],
        reduced_formula=["NaCl", "KCl"],
        crystal_system=["cubic", "cubic"],
        space_group=np.array([225, 225]),
        source_space_group=np.array([225, 0]),
        icsd=np.array([True, False]),
        offsets=np.array([0, 2, 3]),
        two_theta=np.array([10.0, 20.0, 30.0]),
        intensity=np.array([1.0, 0.5, 1.0]),
        failed_ids=["c"],
        failed_reasons=["structures-00.jsonl.xz:c: zero-volume cell"],
        source="mp",
        wavelength=1.5406,
        plan="abc",
    )
    return PeakListShard(**{**base, **changes})


def test_shard_format_round_trip_fixed_bytes_and_checks(tmp_path: Path) -> None:
    data = shard_bytes(_shard())
    time.sleep(1.1)  # a zip member's date has 2-second steps; none is written
    assert shard_bytes(_shard()) == data
    write_shard_bytes(tmp_path / "mp-00000.npz", data)
    back = read_shard(tmp_path / "mp-00000.npz")
    assert back.ids == ["a", "b"] and back.failed_ids == ["c"] and back.plan == "abc"
    assert back.two_theta.dtype == np.float32 and back.space_group.dtype == np.int16
    np.testing.assert_array_equal(back.peaks(1)[0], [30.0])
    with np.load(tmp_path / "mp-00000.npz") as npz:  # plain numpy reads it
        assert npz.files[:2] == ["ids", "reduced_formula"]
    with pytest.raises(ValueError, match="offsets"):
        shard_bytes(_shard(offsets=np.array([0, 3, 2])))
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut.npz: unreadable peak-list shard"):
        read_shard(tmp_path / "cut.npz")
    with pytest.raises(InputError, match="not found"):
        read_shard(tmp_path / "none.npz")
