"""Tuning with real Optuna (sqlite storage), real Keras + VGG16 weights and a real MLflow sqlite store.

The data are tiny synthetic "patterns" (a white peak whose position depends on the class, as in
test_train_evaluate.py), features are cut at block5_pool (``trainable_conv`` 0) and the search space is
held to that depth, so a trial takes seconds.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers_images import make_split_data, tune_params
from xrdvision.config import default_params_dict, load_params, parse_params
from xrdvision.errors import ConfigError, XrdVisionError

ROOT = Path(__file__).resolve().parents[1]


_params = tune_params


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Tiny images, split lists and block5_pool features, made once for the module (read-only)."""
    from xrdvision.models.features import run_features

    root = tmp_path_factory.mktemp("tiny")
    make_split_data(root)
    p = _params(root)
    run_features(p, root / "data/split", root / "data/images", root / "data/features")
    return root


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _run(tiny: Path, work: Path, p, **kw):
    from xrdvision.models.tune import run_tune

    return run_tune(
        p,
        tiny / "data/features",
        work / "tune/best_params.yaml",
        image_dir=tiny / "data/images",
        cache_dir=work / "cache",
        **kw,
    )


GOOD = {"train.learning_rate": 3e-3, "model.dense": [128], "model.dropout": 0.1}
HOPELESS = {"train.learning_rate": 1e-5, "model.dense": [64], "model.dropout": 0.5}


@pytest.mark.needs_shared("weights")
def test_study_nested_runs_pruning_best_params_and_resume(tiny, work, caplog):
    import mlflow
    import optuna

    from xrdvision.models.tune import format_summary

    caplog.set_level(logging.INFO, logger="xrdvision.models.tune")
    p = _params(work)
    # Trial 0: the params.yaml recipe (baseline), 1: a good recipe, 2: a hopeless one (lr 1e-5), which
    # the median pruner must stop after the warm-up epochs.
    out = _run(tiny, work, p, enqueue=[GOOD, HOPELESS])
    assert (out["n_trials"], out["n_complete"], out["n_pruned"], out["n_new"]) == (3, 2, 1, 3), out
    assert out["baseline_value"] is not None and out["best_value"] <= out["baseline_value"]
    assert out["seconds_per_trial"] > 0

    study = optuna.load_study(study_name="tiny", storage=p.tune.storage)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"], states
    assert study.trials[0].user_attrs["baseline"] is True
    assert study.trials[0].params["learning_rate"] == pytest.approx(0.003)
    assert study.trials[2].params["learning_rate"] == pytest.approx(1e-5)
    pruned = study.trials[2]
    assert max(pruned.intermediate_values) == 2  # stopped at the first epoch after the 2-epoch warm-up
    best = min((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert out["best_value"] == pytest.approx(best.value)
    assert best.value == pytest.approx(min(best.intermediate_values.values()))  # objective: best val_loss

    # MLflow: one parent run for the study, every trial a nested run with params and per-epoch metrics.
    uri = p.mlflow.tracking_uri
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # no process-wide URI
    exp = client.get_experiment_by_name("test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_id == out["parent_run_id"]
    assert len(children) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {out["parent_run_id"]}
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in children}
    for t in study.trials:
        run = by_trial[t.number]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"]
        assert run.data.tags["optuna.state"] == t.state.name
        assert float(run.data.params["train.learning_rate"]) == pytest.approx(t.params["learning_rate"])
        assert run.data.params["model.trainable_conv"] == "0" and run.data.params["train.epochs"] == "4"
        hist = client.get_metric_history(run.info.run_id, "val_loss")
        assert [h.step for h in hist] == sorted(t.intermediate_values)
        np.testing.assert_allclose(
            [h.value for h in hist],
            [t.intermediate_values[s] for s in sorted(t.intermediate_values)],
            rtol=1e-6,
        )
    assert len(client.get_metric_history(by_trial[1].info.run_id, "val_loss")) == 4
    parent = client.get_run(out["parent_run_id"])
    assert parent.data.params["study.tune.lr_range"] == "[1e-05, 0.01]"
    assert parent.data.metrics["n_pruned"] == 1 and parent.data.metrics["best_value"] == pytest.approx(
        best.value
    )
    arts = {a.path for a in client.list_artifacts(out["parent_run_id"], "tune")}
    assert {
        "tune/best_params.yaml",
        "tune/optimization_history.png",
        "tune/param_importances.png",
        "tune/trials.csv",
    } <= arts
    assert Image.open(work / "tune/optimization_history.png").size[0] >= 400
    trials_csv = list(csv.DictReader((work / "tune/trials.csv").read_text().splitlines()))
    assert [r["state"] for r in trials_csv] == states

    # The best params file: params.yaml layout, valid when merged, the best trial's recipe.
    best_file = yaml.safe_load((work / "tune/best_params.yaml").read_text())
    assert set(best_file) == {"model", "train"}
    assert set(best_file["model"]) == {"dense", "dropout", "trainable_conv"}
    merged = default_params_dict()
    for section, values in best_file.items():
        merged[section].update(values)
    tuned = parse_params(merged)
    assert tuned.train.learning_rate == pytest.approx(best.params["learning_rate"])
    assert tuned.model.dense == [best.params[f"dense_{i}"] for i in range(best.params["n_dense"])]
    assert out["best_params"]["model.dropout"] == pytest.approx(tuned.model.dropout)
    assert "dvc exp run -S 'model.dense=" in (work / "tune/best_params.yaml").read_text()

    line = format_summary(out)
    assert line.startswith("tune: 3 trials run (1 pruned), study has 3 (1 pruned); best val_loss ")
    assert f"params.yaml recipe {out['baseline_value']:.4f}" in line and "\n" not in line

    # A rerun resumes: the study grows (trial numbers go on), under the same parent run.
    again = _run(tiny, work, p, n_trials=1)
    assert again["n_trials"] == 4 and again["n_new"] == 1 and again["parent_run_id"] == out["parent_run_id"]
    study = optuna.load_study(study_name="tiny", storage=p.tune.storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert not study.trials[3].user_attrs.get("baseline")  # the baseline is tried once, not per rerun
    assert (
        len([r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]) == 4
    )
    # Topping up to tune.trials (3) runs nothing more: the study already has 4.
    assert _run(tiny, work, p)["n_new"] == 0

    # Same study name, other search space: one-line error naming the setting, nothing run.
    p2 = _params(work, tune={"lr_range": [1e-4, 1e-2]})
    with pytest.raises(XrdVisionError) as err:
        _run(tiny, work, p2)
    msg = str(err.value)
    assert (
        "study 'tiny' exists with other settings" in msg and "tune.lr_range stored" in msg and "\n" not in msg
    )
    assert len(optuna.load_study(study_name="tiny", storage=p.tune.storage).trials) == 4
    progress = [r.getMessage() for r in caplog.records if r.name == "xrdvision.models.tune"]
    assert any(m.startswith("tune: trial 2 pruned val_loss ") for m in progress), progress
    assert any(m.startswith("tune: trial 3 ") and '"model.dense": ' in m for m in progress)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("sqlite:////proc/no/such/dir/optuna.db", "sqlite:////proc/no/such/dir/optuna.db"),
        ("postgresql://user:secret@127.0.0.1:9/optuna", "postgresql://user:***@127.0.0.1:9/optuna"),
        ("nosuchdb://host/x", "nosuchdb://host/x"),
    ],
)
@pytest.mark.needs_shared("weights")
def test_unreachable_storage_is_one_line_before_anything_else(tiny, work, url, shown):
    p = _params(work, tune={"storage": url})
    with pytest.raises(XrdVisionError) as err:
        _run(tiny, work, p)
    msg = str(err.value)
    assert msg.startswith(f"{shown}: Optuna storage not reachable (") and "\n" not in msg
    assert "secret" not in msg
    assert not (work / "mlruns").exists() and not (work / "tune").exists()  # failed before MLflow/training


@pytest.mark.needs_shared("weights")
def test_study_with_other_direction_or_foreign_study_is_an_error(tiny, work):
    import optuna

    p = _params(work)
    (work / "optuna").mkdir()
    optuna.create_study(study_name="tiny", storage=p.tune.storage, direction="maximize")
    with pytest.raises(XrdVisionError, match=r"study 'tiny' exists with direction \['maximize'\]"):
        _run(tiny, work, p)
    foreign = optuna.create_study(study_name="other", storage=p.tune.storage)
    foreign.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with pytest.raises(XrdVisionError, match=r"study 'other' exists and was not made by xrdvision tune"):
        _run(tiny, work, _params(work, tune={"study_name": "other"}))
    assert not (work / "tune").exists()


def test_search_space_round_trip_and_validation():
    from xrdvision.config import TuneParams
    from xrdvision.models.search_space import (
        apply_overrides,
        conv_choices,
        dvc_set_args,
        nest,
        overrides_from_trial,
        recipe_of,
        trial_from_overrides,
    )
    from xrdvision.models.tune_study import settings_mismatch

    tune = TuneParams()
    assert conv_choices(tune) == [0, 3]  # the CPU default; blocks 4+5 only when asked
    assert conv_choices(TuneParams(max_trainable_conv=6)) == [0, 3, 6]
    assert conv_choices(TuneParams(max_trainable_conv=4)) == [0, 3]
    base = recipe_of(parse_params({}))
    assert base == {  # the default recipe: the tuned head-only one
        "model.dense": [128],
        "model.dropout": 0.13,
        "model.trainable_conv": 0,
        "train.learning_rate": 0.00163,
    }
    tp = trial_from_overrides(base, tune)
    assert tp == {
        "learning_rate": 0.00163,
        "n_dense": 1,
        "dense_0": 128,
        "dropout": 0.13,
        "trainable_conv": 0,
    }
    assert overrides_from_trial(tp) == base
    two = {**base, "model.dense": [512, 64]}
    assert overrides_from_trial(trial_from_overrides(two, tune)) == two
    # Outside the space: not enqueued.
    assert trial_from_overrides({**base, "model.dense": [100]}, tune) is None
    assert trial_from_overrides({**base, "model.trainable_conv": 6}, TuneParams(max_trainable_conv=3)) is None
    assert trial_from_overrides({**base, "train.learning_rate": 0.5}, tune) is None

    p = apply_overrides(parse_params({}), {"model.dense": [128, 64], "train.learning_rate": 0.002})
    assert p.model.dense == [128, 64] and p.train.learning_rate == 0.002 and p.model.dropout == 0.13
    with pytest.raises(ConfigError, match=r"model\.dropout"):
        apply_overrides(parse_params({}), {"model.dropout": 1.5})
    assert nest({"model.dropout": 0.2, "train.learning_rate": 0.01}) == {
        "model": {"dropout": 0.2},
        "train": {"learning_rate": 0.01},
    }
    assert dvc_set_args({"model": {"dense": [128, 64]}}) == ["model.dense=[128, 64]"]
    assert settings_mismatch({"a": 1, "data_md5": "0123456789ab"}, {"a": 1, "data_md5": "ffffffffffff"}) == [
        "data_md5 stored 01234567 vs now ffffffff"
    ]
    assert settings_mismatch({"a": [1, 2]}, {"a": [1, 2]}) == []


def test_apply_best_params_keeps_comments_and_validates(work):
    from xrdvision.models.search_space import apply_best_params, write_best_params

    params_file = work / "params.yaml"
    params_file.write_text((ROOT / "params.yaml").read_text())
    best = work / "tune/best_params.yaml"
    write_best_params(
        best,
        {
            "model.dense": [512, 64],
            "model.dropout": 0.12,
            "model.trainable_conv": 3,
            "train.learning_rate": 0.0007,
        },
        "test",
    )
    changed = apply_best_params(best, params_file)
    assert changed == {
        "model.dense": [512, 64],
        "model.dropout": 0.12,
        "model.trainable_conv": 3,
        "train.learning_rate": 0.0007,
    }
    text = params_file.read_text()
    assert "# every random choice (sampling, augmentation, split, init) derives from it" in text
    p = load_params(params_file)
    assert p.model.dense == [512, 64] and p.train.learning_rate == 0.0007 and p.model.trainable_conv == 3
    assert p.simulate.step == 0.02  # the rest untouched
    # A best-params file that would make params.yaml invalid leaves it as it was.
    best.write_text("model:\n  dropout: 2.0\n")
    with pytest.raises(XrdVisionError, match=r"best_params.yaml: would make .*params.yaml invalid"):
        apply_best_params(best, params_file)
    assert params_file.read_text() == text


@pytest.mark.needs_shared("weights")
def test_deeper_cut_derived_from_cached_features_is_exact(tiny, work):
    """block4_pool features + VGG16's block 5 = block5_pool features computed from the images."""
    from xrdvision.config import ModelParams
    from xrdvision.models.features import compute_features, load_features
    from xrdvision.models.tune_features import derive_features
    from xrdvision.models.vgg16 import build_model, resolve_weights

    weights = resolve_weights()
    paths = [tiny / "data/images" / f"{i}_0.png" for i in (0, 7, 14)]
    front3 = build_model(3, ModelParams(trainable_conv=3), weights=weights).front
    block4, _, _ = compute_features(front3, paths)
    direct = load_features(tiny / "data/features/train.npz")["features"][[0, 7, 14]]
    import keras

    vgg = keras.applications.VGG16(weights=str(weights), include_top=False, input_shape=(224, 224, 3))
    derived = derive_features(block4, vgg, "block4_pool", "block5_pool")
    assert derived.shape == direct.shape == (3, 7, 7, 512)
    np.testing.assert_allclose(derived, direct, rtol=1e-4, atol=1e-3 * float(np.abs(direct).max()))


@pytest.mark.needs_shared("weights")
def test_shallower_cut_is_computed_from_the_images_once_and_cached(tiny, work):
    from xrdvision.models.features import load_features
    from xrdvision.models.tune_features import DepthFeatures
    from xrdvision.models.vgg16 import resolve_weights

    base = {s: load_features(tiny / f"data/features/{s}.npz") for s in ("train", "val")}
    dtf = DepthFeatures(_params(work), base, tiny / "data/images", work / "cache", resolve_weights())
    tr, va = dtf.get(3)
    assert tr["features"].shape == (18, 14, 14, 512) and va["features"].shape == (6, 14, 14, 512)
    assert str(tr["cut_layer"]) == "block4_pool"
    assert list(tr["image"]) == list(base["train"]["image"])
    assert list(tr["crystal_system"]) == list(base["train"]["crystal_system"])
    cached = work / "cache/block4_pool/train.npz"
    stamp = cached.stat().st_mtime_ns
    assert dtf.get(0)[0] is base["train"]  # the cached depth is used as it is
    again = DepthFeatures(_params(work), base, tiny / "data/images", work / "cache", resolve_weights()).get(
        3
    )[0]
    assert cached.stat().st_mtime_ns == stamp  # reused, not recomputed
    np.testing.assert_array_equal(again["features"], tr["features"])


def test_plots_and_trials_csv_for_a_one_trial_study(work):
    """With too few trials Optuna draws equal importances (PED-ANOVA warns); the files still exist."""
    import optuna

    from xrdvision.models.tune import log_study_plots

    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    files = log_study_plots(study, work / "tune")
    assert [f.name for f in files] == ["optimization_history.png", "param_importances.png", "trials.csv"]
    assert Image.open(work / "tune/param_importances.png").size == (800, 500)
    rows = list(csv.DictReader((work / "tune/trials.csv").read_text().splitlines()))
    assert len(rows) == 1 and rows[0]["state"] == "COMPLETE"
    assert float(rows[0]["params_x"]) == pytest.approx(study.trials[0].params["x"])
