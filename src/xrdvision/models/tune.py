"""The ``tune`` step: an Optuna study over the train stage's recipe, every trial a nested MLflow run.

A trial trains exactly like the train stage (:func:`xrdvision.models.train.fit_tail`: same model, loss,
optimiser, early stopping), for ``tune.epochs`` epochs on the cached features cut at the trial's depth
(:mod:`xrdvision.models.tune_features`). The objective is the **best validation loss** of the trial
(minimised): on a validation split of a few dozen structures the loss moves smoothly with every epoch
while accuracy moves in steps of one structure, so it ranks trials and feeds the pruner better. The
best epoch's validation accuracy is recorded beside it.

MLflow: the study has one parent run (made once, found again on a rerun through the study's user
attribute); each trial is a nested run with the trial's full flattened params, per-epoch metrics (the
same values Optuna's pruner sees), its best figures and ``optuna.*`` tags. A fresh study first tries the
recipe of ``params.yaml`` (the baseline), so the best trial is always compared with the default recipe
on the same split. Search space: :mod:`xrdvision.models.search_space`; storage and resume rules:
:mod:`xrdvision.models.tune_study`.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.errors import XrdVisionError, one_line
from xrdvision.formats.atomic import atomic_path
from xrdvision.models.features import load_features
from xrdvision.models.search_space import (
    apply_overrides,
    overrides_from_trial,
    recipe_of,
    suggest,
    trial_from_overrides,
    write_best_params,
)
from xrdvision.models.tune_features import SPLITS, DepthFeatures
from xrdvision.models.tune_study import (
    OBJECTIVE,
    data_fingerprint,
    display_url,
    open_storage,
    open_study,
    study_settings,
    summarize,
)
from xrdvision.tracking import runs

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"


def _pruning_callback(trial):
    """Validation loss to Optuna after every epoch; stops training when the pruner says so.

    A prune stops training through ``stop_training`` (not by raising inside Keras), and the objective
    raises ``TrialPruned`` once ``fit`` has returned, so Keras and MLflow close cleanly.
    """
    import keras

    class OptunaPruning(keras.callbacks.Callback):
        pruned_at: int | None = None

        def on_epoch_end(self, epoch, logs=None):
            trial.report(float((logs or {}).get(OBJECTIVE, float("nan"))), epoch)
            if trial.should_prune():
                self.pruned_at = epoch
                self.model.stop_training = True

    return OptunaPruning()


def vgg16_trials(features: DepthFeatures, weights: Path):
    """How a VGG16 trial fits: the tail on cached features of its ``trainable_conv`` depth."""
    from xrdvision.models.train import fit_tail

    def fit(trial_params: Params, callbacks: list) -> tuple[dict, dict, dict[str, str]]:
        train, val = features.get(trial_params.model.trainable_conv)
        _, hist, info = fit_tail(
            trial_params, train, val, weights=weights, extra_callbacks=callbacks, verbose=0
        )
        return hist, info, {"cut_layer": str(train["cut_layer"])}

    return fit


def cnn1d_trials(table: Any):
    """How a 1-D model trial fits: patterns drawn from the training peak lists (loaded once)."""
    from xrdvision.models.train_cnn1d import fit_cnn1d

    def fit(trial_params: Params, callbacks: list) -> tuple[dict, dict, dict[str, str]]:
        _, hist, info = fit_cnn1d(trial_params, table=table, extra_callbacks=callbacks, verbose=0)
        return hist, info, {"train_sources": ",".join(trial_params.split.train_sources)}

    return fit


def make_objective(params: Params, fit_trial: Any, record: list[dict[str, Any]]):
    """The Optuna objective: one trial = one nested MLflow run training like the train stage
    (``fit_trial``: :func:`vgg16_trials` or :func:`cnn1d_trials`)."""
    import keras
    import mlflow
    import optuna

    from xrdvision.models.train import mlflow_epoch_callback

    def objective(trial) -> float:
        t0 = time.perf_counter()
        overrides = suggest(trial, params.tune, params.model.kind)
        trial_params = apply_overrides(params, {**overrides, "train.epochs": params.tune.epochs})
        pruned_at = None
        with mlflow.start_run(
            run_name=runs.run_name(trial_params, f"trial{trial.number}"), nested=True
        ) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params(trial_params.flat())
            mlflow.set_tags(
                {
                    "optuna.study": params.tune.study_name,
                    "optuna.trial": str(trial.number),
                    "label_mode": params.labels.mode,
                    "model_kind": params.model.kind,
                }
            )
            cb = _pruning_callback(trial)
            try:
                hist, info, tags = fit_trial(trial_params, [mlflow_epoch_callback(), cb])
            finally:
                keras.backend.clear_session()
            mlflow.set_tags(tags)
            seconds = time.perf_counter() - t0
            val_loss = np.asarray(hist.get("val_loss", []), dtype=float)
            best_epoch = int(np.nanargmin(val_loss)) if np.isfinite(val_loss).any() else -1
            best = float(val_loss[best_epoch]) if best_epoch >= 0 else float("nan")
            best_acc = float(hist["val_accuracy"][best_epoch]) if best_epoch >= 0 else float("nan")
            pruned_at = cb.pruned_at
            state = "PRUNED" if pruned_at is not None else ("COMPLETE" if math.isfinite(best) else "FAIL")
            mlflow.log_metrics(
                {
                    f"best_{OBJECTIVE}": best,
                    "best_val_accuracy": best_acc,
                    "best_epoch": best_epoch,
                    "epochs_run": info["epochs_run"],
                    "trial_seconds": seconds,
                    "fit_seconds": info["seconds"],
                }
            )
            mlflow.set_tag("optuna.state", state)
        for k, v in {
            "val_accuracy": best_acc,
            "best_epoch": best_epoch,
            "seconds": seconds,
            "epochs_run": info["epochs_run"],
        }.items():
            trial.set_user_attr(k, v)
        record.append({"number": trial.number, "state": state, "value": best, "seconds": seconds})
        if pruned_at is not None:
            raise optuna.TrialPruned(f"{OBJECTIVE} above the median of earlier trials at epoch {pruned_at}")
        return best  # NaN (diverged) makes Optuna mark the trial failed and go on

    return objective


# ---------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------


def log_study_plots(study, out_dir: Path) -> list[Path]:
    """Optimisation history and parameter importances (matplotlib) plus a CSV of every trial.

    With very few trials Optuna draws equal importances (and warns); if it cannot draw a plot at all,
    the figure says why instead, so the files a DVC stage declares always exist.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    out: list[Path] = []
    plots = {
        "optimization_history.png": plot_optimization_history,
        "param_importances.png": plot_param_importances,
    }
    for name, fn in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            reason = one_line(exc)
            log.warning("tune: %s has no data yet (%s)", name, reason)
            fig, ax = plt.subplots()
            ax.text(0.5, 0.5, f"not available yet:\n{reason}", ha="center", va="center", wrap=True)
            ax.set_axis_off()
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        with atomic_path(Path(out_dir) / name, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
        out.append(Path(out_dir) / name)
    df = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
    with atomic_path(Path(out_dir) / "trials.csv") as tmp:
        df.to_csv(tmp, index=False)
    out.append(Path(out_dir) / "trials.csv")
    return out


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------


def run_tune(
    params: Params,
    features_dir: Path,
    out_path: Path,
    *,
    n_trials: int | None = None,
    image_dir: Path = Path("data/images"),
    cache_dir: Path = Path("data/cache/tune_features"),
    enqueue: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the study and write the best recipe to ``out_path``.

    ``n_trials=None`` tops the study up to ``tune.trials`` finished trials (a rerun after an
    interruption runs only what is missing; several machines on one storage stop together);
    ``n_trials=N`` runs N more. ``enqueue`` lists extra recipes (params.yaml keys) to try first.
    Each finished trial is logged in one line at INFO (:func:`trial_line`).
    Plots and ``trials.csv`` go beside ``out_path`` and to the study's parent MLflow run.
    """
    from xrdvision.models.vgg16 import resolve_weights, weights_fingerprint

    storage = open_storage(params.tune.storage)  # fail fast: before features, MLflow and training
    runs.setup(params.mlflow)
    features_dir, out_path = Path(features_dir), Path(out_path)
    if params.model.kind == "cnn1d":
        from xrdvision.data.peak_table import cod_table, training_table
        from xrdvision.models.tune_study import table_fingerprint

        table = training_table(params, cod_table(params))
        settings = study_settings(params, table_fingerprint(table, params.labels.mode), "none")
        return _optimize(params, storage, settings, cnn1d_trials(table), out_path, n_trials, enqueue)
    base = {s: load_features(features_dir / f"{s}.npz") for s in SPLITS}
    weights = resolve_weights(params.model.weights)
    weights_md5 = weights_fingerprint(weights)
    cached_md5 = str(base["train"].get("weights_md5", ""))
    if cached_md5 and cached_md5 != weights_md5:
        raise XrdVisionError(
            f"{features_dir / 'train.npz'}: computed with VGG16 weights md5 {cached_md5[:8]}, params resolve "
            f"to {weights} (md5 {weights_md5[:8]}): run `dvc repro features`"
        )
    settings = study_settings(params, data_fingerprint(base, image_dir, params.labels.mode), weights_md5)
    fit_trial = vgg16_trials(DepthFeatures(params, base, image_dir, cache_dir, weights), weights)
    return _optimize(params, storage, settings, fit_trial, out_path, n_trials, enqueue)


def _optimize(
    params: Params,
    storage: Any,
    settings: dict[str, Any],
    fit_trial: Any,
    out_path: Path,
    n_trials: int | None,
    enqueue: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    """Open (or resume) the study, run the trials under one parent MLflow run, write the best recipe."""
    import mlflow
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(params, storage, settings)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    if not study.trials:
        baseline = trial_from_overrides(recipe_of(params), params.tune)
        if baseline is not None:
            study.enqueue_trial(baseline, user_attrs={"baseline": True})
        else:
            log.warning("tune: the params.yaml recipe is outside the search space; no baseline trial")
    for extra in enqueue or []:
        tp = trial_from_overrides({**recipe_of(params), **extra}, params.tune)
        if tp is None:
            raise XrdVisionError(f"tune: enqueued recipe {extra} is outside the search space")
        study.enqueue_trial(tp)
    done = len(study.get_trials(deepcopy=False, states=finished))
    if n_trials is None:
        target = params.tune.trials
        to_run = max(0, target - done)
        callbacks = [optuna.study.MaxTrialsCallback(target, states=finished)]
    else:
        to_run, callbacks = n_trials, []

    record: list[dict[str, Any]] = []
    experiment_id = runs.use_experiment(params.mlflow)
    parent_id = _parent_run_id(study, experiment_id)
    start = {"run_id": parent_id} if parent_id else {"run_name": f"tune-{params.tune.study_name}"}
    with mlflow.start_run(**start) as parent:
        if parent_id is None:
            study.set_user_attr(PARENT_RUN_ATTR, parent.info.run_id)
            mlflow.log_params(
                {f"study.{k}": json.dumps(v) if isinstance(v, list) else v for k, v in settings.items()}
            )
            mlflow.set_tags(
                {
                    "optuna.study": params.tune.study_name,
                    "optuna.storage": display_url(params.tune.storage),
                    "label_mode": params.labels.mode,
                    "git_commit": runs.git_commit(),
                }
            )
        if to_run:
            study.optimize(
                make_objective(params, fit_trial, record),
                n_trials=to_run,
                callbacks=[*callbacks, _log_trial],
                gc_after_trial=True,
                show_progress_bar=log.isEnabledFor(logging.INFO),  # the CLI's --quiet hides it
            )
        result = summarize(study)
        mlflow.log_metrics(
            {
                k: float(v)
                for k, v in result.items()
                if isinstance(v, (int, float)) and v is not None and math.isfinite(float(v))
            }
        )
        if result["n_complete"] == 0:
            raise XrdVisionError(
                f"{display_url(params.tune.storage)}: study '{params.tune.study_name}': no trial completed "
                f"({result['n_pruned']} pruned, {result['n_failed']} failed)"
            )
        comment = (
            f"xrdvision tune: study '{params.tune.study_name}', best of {result['n_trials']} trials "
            f"(trial {result['best_trial']}): {OBJECTIVE} {result['best_value']:.4f}, "
            f"val_accuracy {result['best_val_accuracy']:.3f}"
        )
        write_best_params(out_path, result["best_params"], comment)
        files = log_study_plots(study, out_path.parent)
        for f in [out_path, *files]:
            mlflow.log_artifact(str(f), "tune")
        result["parent_run_id"] = parent.info.run_id
    new = [r["seconds"] for r in record]
    result.update(
        {
            "n_new": len(record),
            "n_new_pruned": sum(r["state"] == "PRUNED" for r in record),
            "seconds_per_trial": float(np.mean(new)) if new else float("nan"),
            "best_params_path": str(out_path),
        }
    )
    return result


def _parent_run_id(study, experiment_id: str) -> str | None:
    """The study's parent MLflow run if it is in this store and experiment (else a new parent is made)."""
    import mlflow

    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if not run_id:
        return None
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except Exception:  # another store, or deleted: start a new parent
        return None
    ok = run.info.lifecycle_stage == "active" and run.info.experiment_id == experiment_id
    return run_id if ok else None


def trial_line(trial) -> str:
    """One line for a finished trial: number, state, objective, seconds, recipe (params.yaml keys)."""
    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    known = {"n_dense", "width"} & set(trial.params)
    params = overrides_from_trial(trial.params) if known else trial.params
    return (
        f"tune: trial {trial.number} {trial.state.name.lower()} {OBJECTIVE} {value} "
        f"({trial.user_attrs.get('seconds', float('nan')):.0f} s) {json.dumps(params)}"
    )


def _log_trial(study, trial) -> None:
    """Optuna study callback: :func:`trial_line` of every finished trial, at INFO."""
    log.info("%s", trial_line(trial))


def format_summary(result: dict[str, Any]) -> str:
    """The CLI's one line for :func:`run_tune`."""
    base = ""
    if result.get("baseline_value") is not None:
        base = f"; params.yaml recipe {result['baseline_value']:.4f}"
    per_trial = f"{result['seconds_per_trial']:.1f} s/trial; " if result["n_new"] else ""
    return (
        f"tune: {result['n_new']} trials run ({result['n_new_pruned']} pruned), "
        f"study has {result['n_trials']} "
        f"({result['n_pruned']} pruned); best {OBJECTIVE} {result['best_value']:.4f} "
        f"(val accuracy {result['best_val_accuracy']:.3f}, trial {result['best_trial']}){base}; "
        f"{per_trial}best params -> {result['best_params_path']}"
    )
