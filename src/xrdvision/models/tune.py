"""The ``tune`` step: an Optuna study over the train stage's recipe, every trial a nested MLflow run.

What is searched (the knobs the seed recipe fixed by hand):

- ``train.learning_rate``: log-uniform in ``tune.lr_range``;
- ``model.dense``: one or two ReLU layers, each 64/128/256/512 wide;
- ``model.dropout``: uniform in [0, 0.5];
- ``model.trainable_conv``: 0 (head only), 3 (block 5) or 6 (blocks 4 + 5), capped by
  ``tune.max_trainable_conv``.

A trial trains exactly like the train stage (:func:`xrdvision.models.train.fit_tail`: same model, loss,
optimiser, early stopping), for ``tune.epochs`` epochs on the cached features. The objective is the
**best validation loss** of the trial (minimised): on a validation split of a few dozen structures the
loss moves smoothly with every epoch while accuracy moves in steps of one structure, so it ranks
trials and feeds the pruner better. The best epoch's validation accuracy is recorded beside it.

Features per depth. The cache from the ``features`` stage holds the output of the frozen layers for
``model.trainable_conv`` of ``params.yaml``; a trial with another depth needs the output of another
layer. Deeper cuts are *derived* from the cache by running the frozen VGG16 layers between the two cuts
on the cached tensors (exact: the same layers on the same inputs); shallower cuts are computed from the
images listed in the cache. Either way the result is cached once per depth under
``data/cache/tune_features/<cut layer>/`` and keyed by the source features, so a rerun reuses it.

Persistence. The study lives in an Optuna RDB storage (``tune.storage``: sqlite by default, any
SQLAlchemy URL so several machines can work on one study) and a rerun resumes it. The settings that
define the objective (search space, epochs, label mode, data) are stored on the study; a rerun with
other settings under the same ``tune.study_name`` is an error rather than a silent mix of two
experiments. A fresh study first tries the recipe of ``params.yaml`` (the baseline), so the best trial
is always compared with the default recipe on the same split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params, TuneParams, parse_params
from xrdvision.errors import XrdVisionError
from xrdvision.formats.atomic import atomic_path, write_text
from xrdvision.models.features import load_features
from xrdvision.tracking import runs

CONV_CHOICES = (0, 3, 6)  # head only, block 5, blocks 4 + 5
DENSE_WIDTHS = (64, 128, 256, 512)
MAX_DENSE_LAYERS = 2
DROPOUT_RANGE = (0.0, 0.5)
OBJECTIVE = "val_loss"  # best (lowest) validation loss of a trial, minimised
PRUNER_STARTUP_TRIALS = 2  # trials that always run to the end before pruning starts
PRUNER_WARMUP_EPOCHS = 2  # epochs a trial always runs before it can be pruned
SETTINGS_ATTR = "xrdvision_settings"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
TUNED_KEYS = ("model.dense", "model.dropout", "model.trainable_conv", "train.learning_rate")
SPLITS = ("train", "val")


# ---------------------------------------------------------------------------------------------------
# Search space: pure functions between Optuna's trial parameters and params.yaml keys
# ---------------------------------------------------------------------------------------------------


def conv_choices(tune: TuneParams) -> list[int]:
    """The ``trainable_conv`` values searched: 0/3/6 up to ``tune.max_trainable_conv``."""
    return [k for k in CONV_CHOICES if k <= tune.max_trainable_conv]


def suggest(trial, tune: TuneParams) -> dict[str, Any]:
    """Sample one recipe from ``trial``; returns params.yaml keys (``model.dense``, ...)."""
    trial.suggest_float("learning_rate", tune.lr_range[0], tune.lr_range[1], log=True)
    n = trial.suggest_int("n_dense", 1, MAX_DENSE_LAYERS)
    for i in range(n):
        trial.suggest_categorical(f"dense_{i}", list(DENSE_WIDTHS))
    trial.suggest_float("dropout", *DROPOUT_RANGE)
    trial.suggest_categorical("trainable_conv", conv_choices(tune))
    return overrides_from_trial(trial.params)


def overrides_from_trial(trial_params: dict[str, Any]) -> dict[str, Any]:
    """Optuna's parameter names -> params.yaml keys."""
    n = int(trial_params["n_dense"])
    return {
        "model.dense": [int(trial_params[f"dense_{i}"]) for i in range(n)],
        "model.dropout": float(trial_params["dropout"]),
        "model.trainable_conv": int(trial_params["trainable_conv"]),
        "train.learning_rate": float(trial_params["learning_rate"]),
    }


def trial_from_overrides(overrides: dict[str, Any], tune: TuneParams) -> dict[str, Any] | None:
    """params.yaml keys -> Optuna's parameter names, or None when the recipe is outside the space.

    Used to enqueue a known recipe (the baseline of params.yaml) as a trial.
    """
    dense = list(overrides["model.dense"])
    lr = float(overrides["train.learning_rate"])
    dropout = float(overrides["model.dropout"])
    conv = int(overrides["model.trainable_conv"])
    inside = (
        1 <= len(dense) <= MAX_DENSE_LAYERS
        and all(w in DENSE_WIDTHS for w in dense)
        and tune.lr_range[0] <= lr <= tune.lr_range[1]
        and DROPOUT_RANGE[0] <= dropout <= DROPOUT_RANGE[1]
        and conv in conv_choices(tune)
    )
    if not inside:
        return None
    out: dict[str, Any] = {
        "learning_rate": lr,
        "n_dense": len(dense),
        "dropout": dropout,
        "trainable_conv": conv,
    }
    out.update({f"dense_{i}": w for i, w in enumerate(dense)})
    return out


def recipe_of(params: Params) -> dict[str, Any]:
    """The tuned keys' current values in ``params`` (the baseline recipe)."""
    flat = params.flat()
    return {k: flat[k] for k in TUNED_KEYS}


def apply_overrides(params: Params, overrides: dict[str, Any]) -> Params:
    """A copy of ``params`` with ``{"model.dropout": 0.2, ...}`` set, validated like params.yaml."""
    data = dataclasses.asdict(params)
    for key, value in overrides.items():
        *sections, name = key.split(".")
        node = data
        for s in sections:
            node = node[s]
        node[name] = value
    return parse_params(data)


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"model.dropout": 0.2}`` -> ``{"model": {"dropout": 0.2}}`` (params.yaml layout)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, name = key.split(".")
        node = out
        for s in sections:
            node = node.setdefault(s, {})
        node[name] = value
    return out


def dvc_set_args(best: dict[str, Any]) -> list[str]:
    """``dvc exp run -S`` arguments for a best-params mapping (flat or nested)."""
    flat = best if all("." in k for k in best) else _flatten(best)
    return [f"{k}={json.dumps(v)}" for k, v in flat.items()]


def _flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in nested.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------------
# Study settings: what must match for a rerun to resume the same experiment
# ---------------------------------------------------------------------------------------------------


def study_settings(params: Params, data_md5: str, weights_md5: str) -> dict[str, Any]:
    """Everything that defines the objective; stored on the study and compared on every rerun.

    The seed is left out on purpose: a rerun with another seed measures the same objective.
    """
    return {
        "objective": f"minimize {OBJECTIVE}",
        "tune.lr_range": [float(v) for v in params.tune.lr_range],
        "dense_layers": [1, MAX_DENSE_LAYERS],
        "dense_widths": list(DENSE_WIDTHS),
        "dropout_range": list(DROPOUT_RANGE),
        "trainable_conv": conv_choices(params.tune),
        "tune.epochs": params.tune.epochs,
        "labels.mode": params.labels.mode,
        "train.batch_size": params.train.batch_size,
        "train.patience": params.train.patience,
        "train.class_weights": params.train.class_weights,
        "weights_md5": weights_md5,
        "data_md5": data_md5,
    }


def settings_mismatch(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One short phrase per setting that differs (empty: the study can be resumed)."""
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if a != b:
            if key.endswith("md5"):
                a = str(a)[:8] if a else a
                b = str(b)[:8] if b else b
            out.append(f"{key} stored {a} vs now {b}")
    return out


def data_fingerprint(splits: dict[str, dict[str, np.ndarray]], image_dir: Path, mode: str) -> str:
    """md5 of the train/val images (names, labels, file bytes): independent of the cached cut layer.

    Keyed on the images rather than the cached tensors so that changing ``model.trainable_conv`` in
    params.yaml (and re-running ``features``) does not make the study look like another experiment.
    """
    h = hashlib.md5()
    for s in SPLITS:
        for name, label in zip(splits[s]["image"], splits[s][mode], strict=True):
            h.update(f"{s}\t{name}\t{label}\n".encode())
            path = Path(image_dir) / str(name)
            h.update(hashlib.md5(path.read_bytes()).digest() if path.is_file() else b"missing")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Features at each depth
# ---------------------------------------------------------------------------------------------------


class DepthFeatures:
    """Train/val features cut at any ``trainable_conv``, derived or computed once and cached on disk.

    Holds one depth in memory at a time: the block 3 tensors of a few thousand images take GBs.
    """

    def __init__(
        self,
        params: Params,
        base: dict[str, dict[str, np.ndarray]],
        image_dir: Path,
        cache_dir: Path,
        weights: Path,
    ) -> None:
        self.params = params
        self.base = base
        self.image_dir = Path(image_dir)
        self.cache_dir = Path(cache_dir)
        self.weights = Path(weights)
        self.base_cut = str(base["train"]["cut_layer"])
        self._vgg = None
        self._source_key: str | None = None
        self._current: tuple[int, tuple[dict, dict]] | None = None

    def vgg(self):
        """VGG16's conv base with the weights (built once; only its layer order and weights are used)."""
        if self._vgg is None:
            import keras

            from xrdvision.models.vgg16 import IMAGE_SIZE

            self._vgg = keras.applications.VGG16(
                weights=str(self.weights), include_top=False, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3)
            )
        return self._vgg

    def source_key(self) -> str:
        """md5 of the cached source tensors + their cut + the weights: what every derived cache depends on."""
        if self._source_key is None:
            h = hashlib.md5(f"{self.base_cut}\n{self.base['train'].get('weights_md5', '')}\n".encode())
            for s in SPLITS:
                h.update(np.ascontiguousarray(self.base[s]["features"]).view(np.uint8))
                h.update("\n".join(map(str, self.base[s]["image"])).encode())
            self._source_key = h.hexdigest()
        return self._source_key

    def get(self, trainable_conv: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(train, val) features cut for ``trainable_conv`` (the layout of :func:`load_features`)."""
        if self._current is not None and self._current[0] == trainable_conv:
            return self._current[1]
        from xrdvision.models.vgg16 import cut_layer_name

        self._current = None  # free the previous depth before building the next
        target = cut_layer_name(trainable_conv)
        if target == self.base_cut:
            pair = (self.base["train"], self.base["val"])
        else:
            pair = tuple(self._cached(s, target, trainable_conv) for s in SPLITS)
        self._current = (trainable_conv, pair)
        return pair

    def _cached(self, split: str, target: str, trainable_conv: int) -> dict[str, np.ndarray]:
        path = self.cache_dir / target / f"{split}.npz"
        if path.is_file():
            data = load_features(path)
            if str(data.get("source_key", "")) == self.source_key():
                return data
        src = self.base[split]
        names = [layer.name for layer in self.vgg().layers]
        if names.index(target) > names.index(self.base_cut):
            feats = derive_features(
                src["features"], self.vgg(), self.base_cut, target, desc=f"{target} {split}"
            )
        else:
            feats = self._from_images(src, trainable_conv, f"{target} {split}")
        data = {
            **src,
            "features": feats,
            "cut_layer": np.array(target),
            "source_key": np.array(self.source_key()),
        }
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **data)
        return data

    def _from_images(self, src: dict[str, np.ndarray], trainable_conv: int, desc: str) -> np.ndarray:
        from xrdvision.models.features import compute_features
        from xrdvision.models.vgg16 import build_model

        model_params = dataclasses.replace(self.params.model, trainable_conv=trainable_conv)
        net = build_model(7, model_params, weights=self.weights, seed=self.params.seed)
        paths = [self.image_dir / str(n) for n in src["image"]]
        feats, _, problems = compute_features(net.front, paths, desc=desc)
        if problems:
            raise XrdVisionError(f"{problems[0]} (needed to cut features at trainable_conv={trainable_conv})")
        return feats


def derive_features(
    x: np.ndarray, vgg, from_layer: str, to_layer: str, batch_size: int = 32, desc: str = "derive"
) -> np.ndarray:
    """Run VGG16's layers after ``from_layer`` up to ``to_layer`` on cached ``from_layer`` outputs.

    Exact: the frozen network is a chain, so the output of a deeper layer is the later layers applied
    to the output of a shallower one.
    """
    import keras
    from tqdm import tqdm

    names = [layer.name for layer in vgg.layers]
    i, j = names.index(from_layer), names.index(to_layer)
    if j <= i:
        raise ValueError(f"{to_layer} is not after {from_layer}")
    inp = keras.Input(tuple(x.shape[1:]))
    y = inp
    for layer in vgg.layers[i + 1 : j + 1]:
        y = layer(y)
    model = keras.Model(inp, y)
    out = []
    for start in tqdm(range(0, len(x), batch_size), desc=desc, unit="batch"):
        out.append(np.asarray(model(x[start : start + batch_size], training=False), dtype=np.float32))
    return np.concatenate(out) if out else np.zeros((0, *model.output.shape[1:]), np.float32)


# ---------------------------------------------------------------------------------------------------
# Storage and study
# ---------------------------------------------------------------------------------------------------


def display_url(url: str) -> str:
    """The storage URL with any password hidden (it goes into messages and MLflow tags)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: the error that follows says so
        return url


def open_storage(url: str):
    """Connect to the Optuna RDB storage (creating a local sqlite file's folder), or fail in one line."""
    import optuna

    engine_kwargs: dict[str, Any] = {}
    if url.startswith(("postgresql", "mysql")):
        engine_kwargs = {"connect_args": {"connect_timeout": 10}}  # not minutes of TCP retries
    try:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as exc:  # SQLAlchemy, DB drivers and a missing driver raise different types
        reason = " ".join(str(exc).split())[:160]
        raise XrdVisionError(f"{display_url(url)}: Optuna storage not reachable ({reason})") from None


def open_study(params: Params, storage, settings: dict[str, Any]):
    """Create or resume the study; a stored study with other settings is a one-line error.

    The TPE seed is ``seed + number of trials already in the study``: a resumed study with the
    original seed would replay the first random suggestions and repeat trials already run.
    """
    import optuna

    name = params.tune.study_name
    where = f"{display_url(params.tune.storage)}: study '{name}'"
    probe = optuna.load_study(study_name=name, storage=storage) if _study_exists(storage, name) else None
    n_existing = len(probe.trials) if probe is not None else 0
    if probe is not None:
        if len(probe.directions) > 1 or probe.direction != optuna.study.StudyDirection.MINIMIZE:
            raise XrdVisionError(
                f"{where} exists with direction {[d.name.lower() for d in probe.directions]}, "
                f"tune minimises {OBJECTIVE}: use another tune.study_name"
            )
        stored = probe.user_attrs.get(SETTINGS_ATTR)
        if stored is None and n_existing:
            raise XrdVisionError(
                f"{where} exists and was not made by xrdvision tune: use another tune.study_name"
            )
        diff = settings_mismatch(stored or {}, settings) if stored is not None else []
        if diff:
            raise XrdVisionError(
                f"{where} exists with other settings ({'; '.join(diff[:3])}): "
                "use another tune.study_name to start a new study"
            )
    sampler = optuna.samplers.TPESampler(
        seed=params.seed + n_existing,
        n_startup_trials=max(2, min(10, params.tune.trials // 3)),
    )
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS
    )
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction="minimize",
        load_if_exists=True,
    )
    if SETTINGS_ATTR not in study.user_attrs:
        study.set_user_attr(SETTINGS_ATTR, settings)
    return study


def _study_exists(storage, name: str) -> bool:
    import optuna

    return name in optuna.study.get_all_study_names(storage)


# ---------------------------------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------------------------------


def _epoch_callback(trial):
    """Per-epoch metrics to the trial's MLflow run, and validation loss to Optuna for pruning.

    A prune stops training through ``stop_training`` (not by raising inside Keras), and the objective
    raises ``TrialPruned`` once ``fit`` has returned, so Keras and MLflow close cleanly.
    """
    import keras
    import mlflow

    class OptunaMlflowCallback(keras.callbacks.Callback):
        pruned_at: int | None = None

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items() if np.isscalar(v)}
            mlflow.log_metrics(logs, step=epoch)
            value = logs.get(OBJECTIVE, float("nan"))
            trial.report(value, epoch)
            if trial.should_prune():
                self.pruned_at = epoch
                self.model.stop_training = True

    return OptunaMlflowCallback()


def make_objective(params: Params, features: DepthFeatures, weights: Path, record: list[dict[str, Any]]):
    """The Optuna objective: one trial = one nested MLflow run training like the train stage."""
    import keras
    import mlflow
    import optuna

    from xrdvision.models.train import fit_tail

    def objective(trial) -> float:
        t0 = time.perf_counter()
        overrides = suggest(trial, params.tune)
        trial_params = apply_overrides(params, {**overrides, "train.epochs": params.tune.epochs})
        train, val = features.get(trial_params.model.trainable_conv)
        pruned_at = None
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params(trial_params.flat())
            mlflow.set_tags(
                {
                    "optuna.study": params.tune.study_name,
                    "optuna.trial": str(trial.number),
                    "label_mode": params.labels.mode,
                    "cut_layer": str(train["cut_layer"]),
                }
            )
            cb = _epoch_callback(trial)
            try:
                _, hist, info = fit_tail(
                    trial_params, train, val, weights=weights, extra_callbacks=[cb], verbose=0
                )
            finally:
                keras.backend.clear_session()
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


def write_best_params(path: Path, best: dict[str, Any], comment: str) -> None:
    """The best recipe in params.yaml layout (mergeable into params.yaml; ``-S`` form in a comment)."""
    lines = []
    for section, values in sorted(nest(best).items()):
        lines.append(f"{section}:")
        lines += [f"  {k}: {json.dumps(v)}" for k, v in sorted(values.items())]  # JSON values are YAML
    body = "\n".join(lines) + "\n"
    hint = "dvc exp run " + " ".join(f"-S '{a}'" for a in dvc_set_args(best))
    write_text(path, f"# {comment}\n# apply with: {hint}\n{body}")


def read_best_params(path: Path) -> dict[str, Any]:
    """A best-params file as nested params.yaml sections; a file that is not one is a one-line error."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise XrdVisionError(f"{path}: best params not found (run `xrdvision tune` first)") from None
    except yaml.YAMLError as exc:
        raise XrdVisionError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(data, dict) or not data:
        raise XrdVisionError(f"{path}: not a best-params file (expected sections model/train)")
    return data


def apply_best_params(best_path: Path, params_path: Path = Path("params.yaml")) -> dict[str, Any]:
    """Write the tuned values into ``params_path`` in place, keeping its comments and order.

    The merged file is validated before it replaces the old one (atomically), so a bad best-params file
    never leaves params.yaml invalid. Returns the flat keys changed with their new values.
    """
    from ruamel.yaml import YAML

    best = read_best_params(best_path)
    rt = YAML()  # round-trip: comments and key order survive
    rt.width = 4096
    try:
        doc = rt.load(Path(params_path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise XrdVisionError(f"{params_path}: params file not found") from None
    flat = _flatten(best)
    changed = {}
    for key, value in flat.items():
        *sections, name = key.split(".")
        node = doc
        for s in sections:
            if s not in node:
                node[s] = {}
            node = node[s]
        if node.get(name) != value:
            changed[key] = value
        node[name] = value
    plain = json.loads(json.dumps(doc))  # ruamel's CommentedMap -> plain dicts for validation
    try:
        parse_params(plain)
    except XrdVisionError as exc:
        raise XrdVisionError(f"{best_path}: would make {params_path} invalid ({exc})") from None
    with atomic_path(params_path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        rt.dump(doc, fh)
    return changed


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
            reason = " ".join(str(exc).split())[:120]
            print(f"tune: {name} has no data yet ({reason})")
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
    Plots and ``trials.csv`` go beside ``out_path`` and to the study's parent MLflow run.
    """
    import mlflow
    import optuna
    from optuna.trial import TrialState

    from xrdvision.models.vgg16 import resolve_weights, weights_fingerprint

    storage = open_storage(params.tune.storage)  # fail fast: before features, MLflow and training
    runs.setup(params.mlflow)
    features_dir, out_path = Path(features_dir), Path(out_path)
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
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(params, storage, settings)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    if not study.trials:
        baseline = trial_from_overrides(recipe_of(params), params.tune)
        if baseline is not None:
            study.enqueue_trial(baseline, user_attrs={"baseline": True})
        else:
            print("tune: the params.yaml recipe is outside the search space; no baseline trial")
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

    features = DepthFeatures(params, base, image_dir, cache_dir, weights)
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
                make_objective(params, features, weights, record),
                n_trials=to_run,
                callbacks=[*callbacks, _progress_line],
                gc_after_trial=True,
                show_progress_bar=True,
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


def _progress_line(study, trial) -> None:
    from tqdm import tqdm

    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    params = overrides_from_trial(trial.params) if "n_dense" in trial.params else trial.params
    tqdm.write(
        f"tune: trial {trial.number} {trial.state.name.lower()} {OBJECTIVE} {value} "
        f"({trial.user_attrs.get('seconds', float('nan')):.0f} s) {json.dumps(params)}"
    )


def summarize(study) -> dict[str, Any]:
    """Counts and the best trial of the whole study (all runs, all machines)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    out: dict[str, Any] = {
        "n_trials": sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials),
        "n_complete": len(complete),
        "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "n_failed": sum(t.state == TrialState.FAIL for t in trials),
        "best_value": None,
        "best_params": None,
        "best_trial": None,
        "best_val_accuracy": None,
        "baseline_value": None,
        "baseline_val_accuracy": None,
    }
    if complete:
        best = min(complete, key=lambda t: t.value)
        out.update(
            {
                "best_value": float(best.value),
                "best_params": overrides_from_trial(best.params),
                "best_trial": best.number,
                "best_val_accuracy": float(best.user_attrs.get("val_accuracy", float("nan"))),
            }
        )
    base = [t for t in complete if t.user_attrs.get("baseline")]
    if base:
        out["baseline_value"] = float(base[0].value)
        out["baseline_val_accuracy"] = float(base[0].user_attrs.get("val_accuracy", float("nan")))
    return out


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
