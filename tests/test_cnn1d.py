"""The 1-D model through the same train / evaluate / registry / predict path as VGG16, on real CIFs.

36 embedded COD CIFs become the workspace (data/cifs, a manifest, a split); the model is tiny and trains
for two short epochs, so the test checks the path (inputs, tracking, calibration, serving, errors), not
the accuracy (the learning curve in benchmarks/ measures that).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from xrdvision.config import parse_params
from xrdvision.errors import InputError, XrdVisionError


def tiny_cnn_params(root: Path, **over):
    data = {
        "mlflow": {"tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db", "experiment": "test"},
        "model": {"kind": "cnn1d"},
        "cnn1d": {"width": 4, "depth": 2, "kernel": 5, "dense": 16, "dropout": 0.0},
        "pattern": {"patterns_per_epoch": 48, "holdout": 16, "holdout_share": 0.25},
        "train": {"epochs": 2, "batch_size": 16, "learning_rate": 0.003, "patience": 2},
    }
    for k, v in over.items():
        data.setdefault(k, {}).update(v)
    return parse_params(data)


@pytest.fixture
def workdir(tmp_path, monkeypatch, embedded_cifs):
    """data/cifs, data/patterns/manifest.csv and data/split of 36 real CIFs (24 / 6 / 6)."""
    from xrdvision.data.peak_table import cod_table

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ids = sorted(embedded_cifs)[:36]
    (tmp_path / "data/cifs").mkdir(parents=True)
    (tmp_path / "data/patterns").mkdir()
    for i in ids:
        shutil.copy(embedded_cifs[i], tmp_path / f"data/cifs/{i}.cif")
    with open(tmp_path / "data/patterns/manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["cod_id", "file", "status"])
        w.writerows([i, f"data/cifs/{i}.cif", "ok"] for i in ids)
    cod = cod_table(tiny_cnn_params(tmp_path))
    (tmp_path / "data/split").mkdir()
    for name, part in (("train", slice(0, 24)), ("val", slice(24, 30)), ("test", slice(30, 36))):
        with open(tmp_path / f"data/split/{name}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image", "cod_id", "group", "crystal_system", "space_group"])
            for k in range(len(cod))[part]:
                w.writerow(
                    [
                        f"{cod.ids[k]}_0.png",
                        cod.ids[k],
                        cod.reduced_formula[k],
                        cod.crystal_system[k],
                        cod.space_group[k],
                    ]
                )
    return tmp_path


def test_cnn1d_trains_registers_evaluates_and_predicts(workdir):
    import mlflow

    from xrdvision.models.evaluate import run_evaluate
    from xrdvision.models.train import run_train
    from xrdvision.serve.predict import predict_files, serving_payload

    p = tiny_cnn_params(workdir)
    out = run_train(
        p, Path("data/features"), Path("models"), Path("metrics/train.json"), Path("plots/training.csv")
    )
    assert out["n_train_structures"] + out["n_holdout_structures"] == 24
    assert out["temperature"] > 0 and 0 <= out["val_ece"] <= 1 and out["epochs_run"] >= 1
    settings = json.loads(Path("models/preprocessing.json").read_text())
    assert settings["model"]["kind"] == "cnn1d" and settings["pattern"]["step"] == 0.01
    client = mlflow.MlflowClient()
    run = client.get_run(out["run_id"])
    assert run.data.tags["model_kind"] == "cnn1d" and run.info.run_name.startswith("cnn1d-crystal_system-")
    mv = client.get_model_version(out["registered_model"], out["version"])
    assert mv.tags["model_kind"] == "cnn1d"

    m = run_evaluate(
        p,
        Path("models"),
        Path("data/split"),
        Path("data/images"),
        Path("metrics/metrics.json"),
        Path("plots"),
        Path("reports"),
        Path("metrics/train.json"),
    )
    assert m["n_test"] == 6 and 0 <= m["test_accuracy"] <= 1
    # scored apart: every structure whose compound no training structure shares (this split is not grouped)
    assert m["n_unseen"] >= 1 and m["n_unseen"] + m["n_cod_seen_in_training"] == 36
    assert "unseen_balanced_accuracy" in json.loads(Path("metrics/metrics.json").read_text())

    from xrdvision.models.scoring import test_split_scorer
    from xrdvision.tracking.registry import promote

    decision = promote(p, test_split_scorer(p, Path("data/split"), Path("data/images")))
    assert decision["promoted"] and decision["challenger"]["test_accuracy"] == pytest.approx(
        m["test_accuracy"]
    )

    cif = next(Path("data/cifs").glob("*.cif"))
    img = workdir / "picture.png"
    from PIL import Image

    Image.new("RGB", (224, 224)).save(img)
    preds = predict_files([cif, img], None, "models/model.keras")
    assert preds[0].ok and preds[0].kind == "cif" and len(preds[0].top) == 3
    assert np.isclose(preds[0].probabilities.sum(), 1.0, atol=1e-4)
    assert not preds[1].ok and "this model reads patterns, not images" in preds[1].error
    body = serving_payload(cif, p)
    assert np.asarray(body["inputs"]).shape == (1, 8501, 1)
    # What `mlflow models serve` runs on /invocations: the logged model's pyfunc on that body.
    served = mlflow.pyfunc.load_model(out["model_uri"]).predict(np.asarray(body["inputs"], dtype=np.float32))
    np.testing.assert_allclose(np.asarray(served)[0], preds[0].probabilities, atol=1e-5)


def test_cnn1d_bad_inputs_are_one_line(workdir):
    from xrdvision.models.train_cnn1d import fit_cnn1d
    from xrdvision.serve.inputs import Preparer

    with pytest.raises(InputError, match=r"data/peaklists.*no mp peak-list shards"):
        fit_cnn1d(tiny_cnn_params(workdir, split={"train_sources": ["mp"]}))
    Path("data/peaklists").mkdir(parents=True)
    Path("data/peaklists/mp-00000.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match=r"mp-00000\.npz: unreadable peak-list shard"):
        fit_cnn1d(tiny_cnn_params(workdir, split={"train_sources": ["mp"]}))
    with pytest.raises(XrdVisionError, match=r"8501 points, but the model takes 4251"):
        Preparer(tiny_cnn_params(workdir), 4251, "cnn1d")


def test_cnn1d_search_space_round_trips_and_a_study_tunes_it(workdir):
    from xrdvision.config import TuneParams
    from xrdvision.models.search_space import overrides_from_trial, recipe_of, trial_from_overrides
    from xrdvision.models.tune import run_tune

    p = tiny_cnn_params(
        workdir,
        tune={"trials": 2, "epochs": 1, "storage": f"sqlite:///{workdir}/optuna.db", "study_name": "cnn"},
    )
    base = recipe_of(tiny_cnn_params(workdir, cnn1d={"width": 8, "depth": 3}))
    assert set(base) == {"cnn1d.width", "cnn1d.depth", "cnn1d.kernel", "cnn1d.dropout", "train.learning_rate"}
    assert overrides_from_trial(trial_from_overrides(base, TuneParams())) == base
    assert trial_from_overrides({**base, "cnn1d.width": 12}, TuneParams()) is None
    r = run_tune(p, Path("data/features"), workdir / "tune" / "best_params.yaml")
    assert r["n_complete"] + r["n_pruned"] == 2 and "cnn1d.width" in r["best_params"]


def test_cnn1d_training_resumes_after_an_interrupt(workdir):
    """A run killed after its second epoch resumes at the third from its backup folder (Keras
    BackupAndRestore), instead of starting over; a finished run leaves no backup behind."""
    import keras

    from xrdvision.models.train_cnn1d import fit_cnn1d

    params = tiny_cnn_params(workdir, train={"epochs": 4, "patience": 10})
    backup = workdir / "data/cache/train_backup/resume-test"

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):  # epochs 1 and 2 finished (and were backed up)
            if epoch == 2:
                raise KeyboardInterrupt("killed in epoch 3")

    with pytest.raises(KeyboardInterrupt):
        fit_cnn1d(params, extra_callbacks=[Interrupt()], backup_dir=backup, verbose=0)
    assert backup.is_dir() and any(backup.rglob("*"))
    seen: list[int] = []

    class Epochs(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(epoch)

    _, _, info = fit_cnn1d(params, extra_callbacks=[Epochs()], backup_dir=backup, verbose=0)
    assert seen == [2, 3]  # epochs 3 and 4 only: the first two were restored
    assert info["epochs_run"] == 2 and len(info["train_prior"]) == 7
    assert not backup.exists() or not any(backup.rglob("*.weights.h5"))
