"""train + evaluate with real Keras, the real VGG16 weights and a real MLflow sqlite store in a temp dir.

The images are small synthetic "patterns" (a white peak whose position depends on the class), so the
test is quick and the task learnable; the full pipeline on real CIFs runs in test_pipeline_dvc.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers_images import CLASSES, make_split_data, peak_image, tiny_params
from xrdvision.errors import XrdVisionError
from xrdvision.tracking import runs


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    make_split_data(tmp_path)
    return tmp_path


_params = tiny_params


@pytest.mark.needs_shared("weights")
def test_features_train_evaluate_track_and_register(workdir):
    import mlflow

    from xrdvision.models.evaluate import run_evaluate
    from xrdvision.models.features import load_features, run_features
    from xrdvision.models.train import run_train

    p = _params(workdir)
    s = run_features(p, Path("data/split"), Path("data/images"), Path("data/features"))
    assert s["cut_layer"] == "block5_pool" and s["splits"]["train"]["n_images"] == 18
    tr = load_features(Path("data/features/train.npz"))
    assert tr["features"].shape == (18, 7, 7, 512) and tr["features"].max() > 1
    assert list(tr["crystal_system"][:6]) == ["cubic"] * 6

    out = run_train(
        p, Path("data/features"), Path("models"), Path("metrics/train.json"), Path("plots/training.csv")
    )
    assert out["train_accuracy"] >= 0.9, out
    hist = list(csv.DictReader(Path("plots/training.csv").read_text().splitlines()))
    assert len(hist) == out["epochs_run"]
    assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy"} <= set(hist[0])
    assert float(hist[-1]["train_loss"]) < float(hist[0]["train_loss"])
    settings = json.loads(Path("models/preprocessing.json").read_text())
    assert settings["classes"] == json.loads(Path("models/classes.json").read_text())["classes"]
    assert settings["simulate"]["step"] == p.simulate.step and settings["render"]["size"] == 224
    assert settings["labels"]["mode"] == "crystal_system" and settings["measured"]["wavelength"] == 1.5418

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
    assert m["n_test"] == 9 and m["test_accuracy"] >= 2 / 3
    assert m["test_accuracy_ci95_low"] <= m["test_accuracy"] <= m["test_accuracy_ci95_high"]
    on_disk = json.loads(Path("metrics/metrics.json").read_text())
    assert on_disk["test_accuracy"] == m["test_accuracy"] and "accuracy" not in on_disk
    assert {"test_loss", "test_macro_f1", "test_top3_accuracy", "test_balanced_accuracy"} <= set(on_disk)
    conf = list(csv.DictReader(Path("plots/confusion.csv").read_text().splitlines()))
    assert len(conf) == 9 and {r["actual"] for r in conf} == set(CLASSES)
    report = json.loads(Path("reports/classification_report.json").read_text())
    assert set(CLASSES) <= set(report)
    assert Image.open("plots/confusion_matrix.png").size[0] > 100

    # Read everything back from the real MLflow store, as the UI shows it.
    uri = p.mlflow.tracking_uri
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # no process-wide URI
    run = client.get_run(out["run_id"])
    assert run.data.params["train.learning_rate"] == "0.003"
    assert run.data.params["labels.mode"] == "crystal_system"
    # a name that tells runs apart, a one-line note, the commit, the data and test split hashes
    assert run.info.run_name == out["run_name"] == runs.run_name(p)
    assert re.fullmatch(r"vgg16-crystal_system-embedded-head32-lr3e-3-[0-9a-f]{7}", run.info.run_name)
    tags = run.data.tags
    note = tags["mlflow.note.content"]
    assert "\n" not in note and note.startswith("VGG16 crystal system classifier on embedded CIFs; Dense 32")
    assert (
        "best val_loss" in note and note.endswith(f"on {m['n_test']} structures") and "test accuracy" in note
    )
    assert "git_commit" in tags and tags["cut_layer"] == "block5_pool"
    assert "data_md5.data/split" in tags and "data_md5.data/features" in tags
    split_md5 = hashlib.md5(Path("data/split/test.csv").read_bytes()).hexdigest()
    assert tags["test_split_md5"] == split_md5
    # one metric scheme: per-epoch train_*/val_*, test_* from evaluate; no bare or final_* names
    val_hist = client.get_metric_history(out["run_id"], "val_loss")
    assert len(val_hist) == out["epochs_run"] and [h.step for h in val_hist] == list(range(out["epochs_run"]))
    assert len(client.get_metric_history(out["run_id"], "train_accuracy")) == out["epochs_run"]
    assert run.data.metrics["test_accuracy"] == pytest.approx(m["test_accuracy"])
    assert not {k for k in run.data.metrics if k in ("accuracy", "loss") or k.startswith("final_")}
    # datasets: the split tables, digest = the file's md5 (DVC's hash), structures per class
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"embedded-train", "embedded-val", "embedded-test"}
    contexts = {n: {t.key: t.value for t in d.tags}["mlflow.data.context"] for n, d in inputs.items()}
    assert contexts == {
        "embedded-train": "training",
        "embedded-val": "validation",
        "embedded-test": "testing",
    }
    assert inputs["embedded-test"].dataset.digest == split_md5
    profile = json.loads(inputs["embedded-train"].dataset.profile)
    assert profile["structures_per_class"] == {c: 6 for c in CLASSES} and profile["structures"] == 18
    arts = {a.path for a in client.list_artifacts(out["run_id"], "evaluation")}
    assert "evaluation/confusion_matrix.png" in arts and "evaluation/classification_report.json" in arts

    # The logged model (Models page): linked to the run, with the test figures linked to it and to the
    # test split; the registered challenger is that logged model.
    (logged,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert logged.model_id == out["model_id"] and logged.source_run_id == out["run_id"]
    assert logged.name == "model"  # runs:/<run id>/model finds it
    linked = {x.key: x for x in logged.metrics}
    assert linked["test_accuracy"].value == pytest.approx(m["test_accuracy"])
    assert linked["test_accuracy"].dataset_name == "embedded-test"
    assert linked["test_accuracy"].dataset_digest == split_md5
    assert {"test_loss", "test_macro_f1", "test_top3_accuracy", "val_loss", "train_accuracy"} <= set(linked)
    assert linked["val_loss"].step == out["best_epoch"]
    assert logged.tags["test_split_md5"] == split_md5
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [
        {"name": "xrdvision-crystal-system", "version": int(out["version"])}
    ]
    info = mlflow.models.get_model_info(f"models:/{out['model_id']}")
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 224, 224, 3]
    assert info.saved_input_example_info is not None
    assert info.metadata["preprocessing"] == settings and info.metadata["classes"] == settings["classes"]
    mv = client.get_model_version_by_alias("xrdvision-crystal-system", "challenger")
    assert str(mv.version) == out["version"] and mv.run_id == out["run_id"]
    assert mv.source == f"models:/{out['model_id']}"
    assert float(mv.tags["test_accuracy"]) == pytest.approx(m["test_accuracy"], abs=1e-6)
    assert mv.tags["test_split_md5"] == split_md5 and mv.tags["model_id"] == out["model_id"]
    # The registered model predicts like the saved one.
    loaded = mlflow.tensorflow.load_model("models:/xrdvision-crystal-system@challenger")
    x = np.stack([peak_image(0, 3), peak_image(2, 3)]).astype(np.float32)
    from xrdvision.models.vgg16 import load_full_model

    np.testing.assert_allclose(
        loaded.predict(x, verbose=0),
        load_full_model("models/model.keras").predict(x, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_run_names_tell_runs_apart():
    """Model kind, label mode, data source, architecture, learning rate and a short hash of the settings
    that make the model; where runs are logged does not change the hash."""
    from xrdvision.config import parse_params

    base = {"model": {"trainable_conv": 0, "dense": [128]}, "train": {"learning_rate": 0.0016}}
    p = parse_params(base)
    name = runs.run_name(p)
    assert re.fullmatch(r"vgg16-crystal_system-embedded-head128-lr1\.6e-3-[0-9a-f]{7}", name), name
    assert runs.run_name(parse_params({**base, "mlflow": {"experiment": "other"}})) == name
    assert runs.run_name(parse_params({**base, "seed": 7})) != name  # same recipe, another model
    seed_recipe = parse_params(
        {
            "model": {"trainable_conv": 3, "dense": [256]},
            "train": {"learning_rate": 0.0001},
            "labels": {"mode": "space_group"},
            "ingest": {"source": "folder", "folder": "../shared/cod"},
            "split": {"train_sources": ["cod", "synth"]},
            "generate": {"n_crystals": 400},
        }
    )
    assert runs.run_name(seed_recipe, "trial4").startswith(
        "vgg16-space_group-folder-cod+synth400-conv3-head256-lr1e-4-trial4-"
    )
    assert runs.run_note(p).startswith("VGG16 crystal system classifier on embedded CIFs; Dense 128")


def test_confusion_matrix_png_shows_its_whole_title(tmp_path):
    """A long title (the measured one) and long class names fit inside the saved figure: the pixels on
    the image's edges are background, i.e. nothing is cut off there."""
    from xrdvision.models.evaluate import plot_confusion

    names = ["cubic", "hexagonal", "monoclinic", "orthorhombic", "tetragonal", "triclinic", "trigonal"]
    matrix = np.arange(49).reshape(7, 7)
    title = "measured patterns, crystal system: accuracy 28.6% [25%-33%], balanced 21.4% (n=440)"
    plot_confusion(matrix, names, tmp_path / "cm.png", title)
    img = np.asarray(Image.open(tmp_path / "cm.png").convert("L"))
    edges = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    assert edges.min() == 255, "something is drawn on the figure's edge: clipped"
    assert img.shape[1] > 500


def test_unreachable_mlflow_server_fails_before_training(workdir):
    from xrdvision.models.train import run_train

    p = _params(workdir, mlflow={"tracking_uri": "http://127.0.0.1:9"})
    with pytest.raises(XrdVisionError, match=r"http://127.0.0.1:9: MLflow tracking store not reachable"):
        run_train(
            p, Path("data/features"), Path("models"), Path("metrics/train.json"), Path("plots/training.csv")
        )
    assert not Path("models").exists() and not Path("metrics").exists()


def test_tracking_setup_leaves_the_users_environment_alone(tmp_path, monkeypatch):
    """MLflow 3's set_tracking_uri exports MLFLOW_TRACKING_URI; if it stayed, a second setup in the same
    process with other params (a notebook, the test suite) would silently log to the first store."""
    from xrdvision.config import MlflowParams
    from xrdvision.tracking import runs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    first, second = (f"sqlite:///{tmp_path}/{n}/mlflow.db" for n in ("a", "b"))
    assert runs.setup(MlflowParams(tracking_uri=first)) == first
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert runs.setup(MlflowParams(tracking_uri=second)) == second
    monkeypatch.setenv("MLFLOW_TRACKING_URI", first)  # the user's own choice still wins over params
    assert runs.setup(MlflowParams(tracking_uri=second)) == first
    assert os.environ["MLFLOW_TRACKING_URI"] == first


def test_class_missing_from_training_is_an_error(workdir):
    from xrdvision.models.train import check_class_coverage

    classes = ["a", "b", "c"]
    with pytest.raises(XrdVisionError, match=r"val split has classes with no training images: c"):
        check_class_coverage(np.array([0, 1]), {"val": np.array([2])}, classes, "crystal_system")
    assert check_class_coverage(np.array([0, 1]), {"val": np.array([2])}, classes, "space_group")


def test_corrupt_png_is_reported_and_skipped(workdir, capsys):
    from xrdvision.models.features import compute_features
    from xrdvision.models.vgg16 import build_model

    Path("data/images/bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    net = build_model(3, _params(workdir).model, weights=None)
    feats, kept, problems = compute_features(
        net.front, [Path("data/images/0_0.png"), Path("data/images/bad.png")]
    )
    assert kept == [0] and feats.shape[0] == 1
    assert len(problems) == 1 and problems[0].startswith("data/images/bad.png: corrupt image")


def test_metrics_on_a_small_case_worked_by_hand():
    """scikit-learn's confusion matrix, top-k accuracy, macro F1 and class weights give the figures
    worked out by hand (and the ones the hand-written versions gave before)."""
    from xrdvision.models.evaluate import classification_metrics, confusion, top_k_hits
    from xrdvision.models.train import class_weight_map

    classes = [f"c{i}" for i in range(7)]
    y = np.array([0, 1, 2, 3])
    probs = np.array(
        [
            [0.70, 0.10, 0.05, 0.05, 0.04, 0.03, 0.03],  # true 0 first
            [0.50, 0.30, 0.05, 0.05, 0.04, 0.03, 0.03],  # true 1 second: top-3 only
            [0.05, 0.40, 0.10, 0.30, 0.11, 0.02, 0.02],  # true 2 fourth: missed
            [0.05, 0.05, 0.05, 0.60, 0.10, 0.10, 0.05],  # true 3 first
        ]
    )
    m = classification_metrics(probs, y, classes, seed=0)
    assert m["accuracy"] == 0.5 and m["top3_accuracy"] == 0.75 and m["n_test"] == 4
    # balanced accuracy: mean recall over the true classes 0-3 (1, 0, 0, 1)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    # F1 per class present: c0 2/3 (one false positive), c1 0, c2 0, c3 1
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0 + 0 + 1) / 4)
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.70, 0.30, 0.10, 0.60])))
    expected = np.zeros((7, 7), dtype=np.int64)
    expected[0, 0] = expected[1, 0] = expected[2, 1] = expected[3, 3] = 1
    got = confusion(y, probs.argmax(1), 7)
    assert got.dtype == np.int64 and np.array_equal(got, expected)
    np.testing.assert_array_equal(top_k_hits(probs, y, 3), [1.0, 1.0, 0.0, 1.0])
    # balanced class weights: n / (k * count) for the classes present
    assert class_weight_map(np.array([0, 0, 0, 1])) == {0: 4 / 6, 1: 2.0}
    assert class_weight_map(np.array([5, 2, 5])) == {2: 1.5, 5: 0.75}

    # Space groups (> 10 classes): top-5 figure from scikit-learn, its CI from the per-image hits.
    rng = np.random.default_rng(3)
    sg = rng.dirichlet(np.ones(230), size=40)
    ysg = rng.integers(0, 230, size=40)
    ysg[:10] = sg[:10].argmax(1)
    msg = classification_metrics(sg, ysg, [str(i) for i in range(230)], seed=0)
    assert msg["top5_accuracy"] == top_k_hits(sg, ysg, 5).mean()
    assert msg["top5_ci95_low"] <= msg["top5_accuracy"] <= msg["top5_ci95_high"]
