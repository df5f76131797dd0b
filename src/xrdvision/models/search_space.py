"""The tuned recipe: Optuna's trial parameters <-> ``params.yaml`` keys, and the best-params file.

What is searched (the knobs the seed recipe fixed by hand):

- ``train.learning_rate``: log-uniform in ``tune.lr_range``;
- ``model.dense``: one or two ReLU layers, each 64/128/256/512 wide;
- ``model.dropout``: uniform in [0, 0.5];
- ``model.trainable_conv``: 0 (head only), 3 (block 5) or 6 (blocks 4 + 5), capped by
  ``tune.max_trainable_conv``;

and for the 1-D model (``model.kind: cnn1d``) its own section: ``train.learning_rate`` as above,
``cnn1d.width`` 8/16/32, ``cnn1d.depth`` 3-5, ``cnn1d.kernel`` 5/7/9/11/15, ``cnn1d.dropout`` in [0, 0.5].

Pure functions between the two namings, plus the ``tune/best_params.yaml`` file (params.yaml layout,
with the ``dvc exp run -S`` line in a comment) and ``xrdvision tune --apply``, which merges it into
``params.yaml`` keeping its comments.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from xrdvision.config import Params, TuneParams, parse_params
from xrdvision.errors import XrdVisionError
from xrdvision.formats.atomic import atomic_path, write_text

CONV_CHOICES = (0, 3, 6)  # head only, block 5, blocks 4 + 5
DENSE_WIDTHS = (64, 128, 256, 512)
MAX_DENSE_LAYERS = 2
DROPOUT_RANGE = (0.0, 0.5)
TUNED_KEYS = ("model.dense", "model.dropout", "model.trainable_conv", "train.learning_rate")
CNN1D_WIDTHS = (8, 16, 32)
CNN1D_DEPTHS = (3, 5)
CNN1D_KERNELS = (5, 7, 9, 11, 15)
CNN1D_KEYS = ("cnn1d.width", "cnn1d.depth", "cnn1d.kernel", "cnn1d.dropout", "train.learning_rate")


def conv_choices(tune: TuneParams) -> list[int]:
    """The ``trainable_conv`` values searched: 0/3/6 up to ``tune.max_trainable_conv``."""
    return [k for k in CONV_CHOICES if k <= tune.max_trainable_conv]


def suggest(trial, tune: TuneParams, kind: str = "vgg16") -> dict[str, Any]:
    """Sample one recipe of model ``kind`` from ``trial``; returns params.yaml keys (``model.dense``, ...)."""
    trial.suggest_float("learning_rate", tune.lr_range[0], tune.lr_range[1], log=True)
    if kind == "cnn1d":
        trial.suggest_categorical("width", list(CNN1D_WIDTHS))
        trial.suggest_int("depth", *CNN1D_DEPTHS)
        trial.suggest_categorical("kernel", list(CNN1D_KERNELS))
        trial.suggest_float("dropout", *DROPOUT_RANGE)
        return overrides_from_trial(trial.params)
    n = trial.suggest_int("n_dense", 1, MAX_DENSE_LAYERS)
    for i in range(n):
        trial.suggest_categorical(f"dense_{i}", list(DENSE_WIDTHS))
    trial.suggest_float("dropout", *DROPOUT_RANGE)
    trial.suggest_categorical("trainable_conv", conv_choices(tune))
    return overrides_from_trial(trial.params)


def overrides_from_trial(trial_params: dict[str, Any]) -> dict[str, Any]:
    """Optuna's parameter names -> params.yaml keys (either kind's section)."""
    if "width" in trial_params:
        return {
            "cnn1d.width": int(trial_params["width"]),
            "cnn1d.depth": int(trial_params["depth"]),
            "cnn1d.kernel": int(trial_params["kernel"]),
            "cnn1d.dropout": float(trial_params["dropout"]),
            "train.learning_rate": float(trial_params["learning_rate"]),
        }
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
    if "cnn1d.width" in overrides:
        tp = {
            "learning_rate": float(overrides["train.learning_rate"]),
            "width": int(overrides["cnn1d.width"]),
            "depth": int(overrides["cnn1d.depth"]),
            "kernel": int(overrides["cnn1d.kernel"]),
            "dropout": float(overrides["cnn1d.dropout"]),
        }
        ok = (
            tune.lr_range[0] <= tp["learning_rate"] <= tune.lr_range[1]
            and tp["width"] in CNN1D_WIDTHS
            and CNN1D_DEPTHS[0] <= tp["depth"] <= CNN1D_DEPTHS[1]
            and tp["kernel"] in CNN1D_KERNELS
            and DROPOUT_RANGE[0] <= tp["dropout"] <= DROPOUT_RANGE[1]
        )
        return tp if ok else None
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
    return {k: flat[k] for k in (CNN1D_KEYS if params.model.kind == "cnn1d" else TUNED_KEYS)}


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
