"""Real ``dvc repro`` of the pipeline in a temp git repo, on a few real COD CIFs.

The repo is a copy of this project's dvc.yaml, params.yaml and sources with a smaller embedded
sample; stages run the installed ``xrdvision`` command exactly as a user's ``dvc repro`` does.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import EMBEDDED_DIR, ROOT
from xrdvision.data.embedded import ARCHIVE_NAME, read_members, write_archive
from xrdvision.formats.peaklists import read_shards
from xrdvision.models.features import load_features

BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _pick_cifs(per_system: int) -> list[str]:
    rows = list(csv.DictReader((EMBEDDED_DIR / "SAMPLE.csv").open()))
    picked: dict[str, list[str]] = {}
    for r in rows:
        picked.setdefault(r["crystal_system"], [])
        if len(picked[r["crystal_system"]]) < per_system:
            picked[r["crystal_system"]].append(r["cod_id"])
    return [c for ids in picked.values() for c in ids]


def make_repo(tmp: Path, per_system: int, overrides: dict) -> tuple[Path, dict[str, str]]:
    repo = tmp / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "pyproject.toml"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    names = [f"{cod_id}.cif" for cod_id in _pick_cifs(per_system)]
    shipped = read_members(EMBEDDED_DIR / ARCHIVE_NAME, names)
    write_archive(repo / "data" / "embedded" / ARCHIVE_NAME, shipped)
    shutil.copy(
        ROOT / "data" / "measured_split.csv", repo / "data" / "measured_split.csv"
    )  # committed, a dep
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("/mlruns/\n/data/cache/\n")
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "init"], repo, env)
    return repo, env


def test_data_stages_repro_and_rerun_only_what_changed(tmp_path):
    repo, env = make_repo(tmp_path, per_system=3, overrides={"augment": {"copies": 1}})
    out = _run(["dvc", "repro", "split"], repo, env)
    assert "Running stage 'simulate'" in out and "Running stage 'split'" in out

    manifest = list(csv.DictReader((repo / "data/patterns/manifest.csv").open()))
    assert len(manifest) == 21
    ok = [r for r in manifest if r["status"] == "ok"]
    assert len(ok) >= 20
    sample = {r["cod_id"]: r for r in csv.DictReader((EMBEDDED_DIR / "SAMPLE.csv").open())}
    agree = sum(r["crystal_system"] == sample[r["cod_id"]]["crystal_system"] for r in ok)
    assert agree == len(ok)  # labels agree with the COD index's spglib analysis
    index = list(csv.DictReader((repo / "data/images/index.csv").open()))
    assert len(index) == 2 * len(ok)  # original + 1 augmented copy each

    splits = {
        s: list(csv.DictReader((repo / f"data/split/{s}.csv").open())) for s in ("train", "val", "test")
    }
    groups = {s: {r["group"] for r in rows} for s, rows in splits.items()}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert not (groups["val"] & groups["test"])
    assert {r["copy"] if "copy" in r else r["image"].rsplit("_", 1)[1] for r in splits["test"]} <= {
        "0",
        "0.png",
    }

    # Nothing changed: nothing re-runs.
    again = _run(["dvc", "repro", "split"], repo, env)
    assert "Running stage" not in again
    # A param change re-runs simulate and what follows, as an experiment.
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "data"], repo, env)
    exp = _run(["dvc", "exp", "run", "-S", "simulate.two_theta_max=80", "split"], repo, env)
    assert "Running stage 'simulate'" in exp and "Running stage 'ingest'" not in exp
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], repo, env))
    values = json.dumps(shown)
    assert '"two_theta_max": 80' in values


def _measured_subset(tmp: Path, n: int) -> Path:
    """The first ``n`` rows of ../shared/experimental (both sources), as a measured folder."""
    src = ROOT.parent / "shared" / "experimental"
    rows = list(csv.DictReader((src / "INDEX.csv").open()))
    picked = [r for r in rows if r["file"].startswith("rruff")][: n // 2]
    picked += [r for r in rows if r["file"].startswith("rockjock")][: n - len(picked)]
    dst = tmp / "measured"
    for r in picked:
        (dst / r["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / r["file"], dst / r["file"])
    with open(dst / "INDEX.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(picked)
    return dst


@pytest.mark.needs_shared("weights", "experimental")
def test_full_repro_trains_evaluates_and_registers(tmp_path):
    import mlflow

    measured = _measured_subset(tmp_path, 6)
    repo, env = make_repo(
        tmp_path,
        per_system=3,
        overrides={
            "augment": {"copies": 1},
            "model": {"trainable_conv": 0, "dense": [32]},
            "train": {"epochs": 3, "learning_rate": 0.001},
            "measured": {"folder": str(measured)},
            "split": {"train_sources": ["cod", "synth"]},
            "generate": {"n_crystals": 20, "shard_size": 10, "workers": 1},
        },
    )
    out = _run(["dvc", "repro"], repo, env)
    assert "Running stage 'evaluate'" in out and "Running stage 'evaluate_measured'" in out
    assert "Running stage 'generate'" in out
    feats = json.loads((repo / "data/features/summary.json").read_text())
    generated = read_shards(repo / "data/generated", "synth")
    n_generated = sum(len(s) for s in generated)
    assert feats["drawn_train_images"] == {"synth": n_generated} and n_generated >= 6
    train = load_features(repo / "data/features/train.npz")
    drawn = [
        str(c)
        for i, c in zip(train["image"], train["crystal_system"], strict=True)
        if str(i).startswith("synth/")
    ]
    assert drawn == [c for s in generated for c in s.crystal_system]
    real = json.loads((repo / "metrics/measured.json").read_text())
    assert real["skipped"] is False and real["n"] == 6 and real["n_failed"] == 0
    assert set(real["per_source"]) == {"rruff_agi", "rockjock"}
    preds = list(csv.DictReader((repo / "plots/measured/predictions.csv").open()))
    assert sorted(p["file"] for p in preds) == sorted(
        r["file"] for r in csv.DictReader((measured / "INDEX.csv").open())
    )
    assert sum(int(p["correct"]) for p in preds) == round(real["measured_accuracy"] * 6)
    metrics = json.loads((repo / "metrics/metrics.json").read_text())
    test_rows = list(csv.DictReader((repo / "data/split/test.csv").open()))
    # every test structure of the split is scored (3 CIFs per system: a handful of test structures)
    assert metrics["n_test"] == len({r["cod_id"] for r in test_rows}) >= 5
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["test_accuracy_ci95_low"] <= metrics["test_accuracy"] <= metrics["test_accuracy_ci95_high"]
    hist = list(csv.DictReader((repo / "plots/training.csv").open()))
    assert 1 <= len(hist) <= 3
    shown = _run(["dvc", "metrics", "show", "--json"], repo, env)
    assert "test_accuracy" in shown
    store = f"sqlite:///{repo}/mlruns/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)  # no process-wide URI
    mv = client.get_model_version_by_alias("xrdvision-crystal-system", "challenger")
    assert float(mv.tags["test_accuracy"]) == pytest.approx(metrics["test_accuracy"], abs=1e-6)
