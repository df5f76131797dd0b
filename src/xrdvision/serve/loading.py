"""Loading a trained classifier for prediction: model URIs, the registry, class lists, input settings.

The model comes from the MLflow registry (``models:/<prefix>-<mode>@champion`` by default), any alias,
version or run URI, an MLflow model folder or a local ``.keras`` file. Where its class list comes from is
recorded, and a model whose outputs do not match the class list is refused rather than silently
mislabelled.

A model carries its input settings (grid, wavelength, peak profile, rendering, label mode, classes; see
:func:`xrdvision.models.train.input_settings`): ``preprocessing.json`` beside ``model.keras`` in a
``models/`` folder, ``preprocessing`` in a logged model's MLmodel metadata. Inputs are prepared with
those (:meth:`LoadedModel.input_params`), so predicting needs no ``params.yaml``. An older model without
them falls back to ``params.yaml`` with a warning (and :func:`settings_mismatch` names the image
settings that differ from its training run), or fails in one line when there is no ``params.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import MlflowParams, Params
from xrdvision.errors import XrdVisionError, one_line
from xrdvision.models.train import INPUT_SETTINGS, INPUT_SETTINGS_FILE
from xrdvision.tracking import runs

CHAMPION = "champion"
CLASSES_FILE = "classes.json"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))?$")


@dataclass
class LoadedModel:
    """A Keras image classifier with its class names and where both came from.

    ``classes_from`` says where the class list was found (model version tag, MLflow model metadata,
    ``classes.json`` beside a ``.keras`` file, or the default order of the label mode, the last only
    when nothing was stored with the model). ``run_id`` is the MLflow run that trained it, when known.
    """

    model: Any
    classes: list[str]
    uri: str
    label_mode: str
    classes_from: str
    run_id: str | None = None
    registered: tuple[str, str] | None = None  # (registered model name, version)
    warnings: list[str] = field(default_factory=list)
    settings: dict[str, Any] | None = None  # input settings stored with the model (None: an older one)
    settings_from: str = ""
    model_id: str | None = None  # the MLflow logged model, when known

    def input_params(self, params: Params | None) -> Params:
        """The settings to prepare inputs with: the model's own, else (an older model) ``params``."""
        if self.settings is not None:
            return apply_input_settings(params or Params(), self.settings, self.settings_from)
        if params is None:
            raise XrdVisionError(no_settings_error(self.uri))
        return params

    @property
    def image_size(self) -> int:
        """Pixels per side of an image model's input; grid points of a 1-D model's."""
        return int(self.model.input_shape[1])

    @property
    def model_kind(self) -> str:
        """``vgg16`` or ``cnn1d``: from the stored input settings, else from the input's rank."""
        stored = ((self.settings or {}).get("model") or {}).get("kind")
        return str(stored) if stored else ("cnn1d" if len(self.model.input_shape) == 3 else "vgg16")

    @property
    def train_prior(self) -> list[float] | None:
        """The training class frequencies stored with the model (None: an older model)."""
        stored = (self.settings or {}).get("train_prior")
        return [float(v) for v in stored] if isinstance(stored, list) else None

    def prior_correction(self, prior: str) -> Callable[[np.ndarray], np.ndarray]:
        """What turns this model's probabilities into those under the class prior ``measured.prior``
        names (``train``: unchanged; see :func:`xrdvision.models.calibration.prior_from_spec`). A bad prior
        fails here, once, before any input is prepared."""
        from xrdvision.models.calibration import correct_prior, prior_from_spec

        new = prior_from_spec(prior, self.classes, self.train_prior, "measured.prior")
        if new is None:
            return lambda probs: probs
        train = np.asarray(self.train_prior)
        return lambda probs: correct_prior(probs, train, new)

    def predict(self, images: np.ndarray, batch_size: int = 16, progress: bool = False) -> np.ndarray:
        """Class probabilities ``(n, n_classes)`` of raw 0-255 RGB images ``(n, size, size, 3)``, or of
        patterns ``(n, points, 1)`` for a 1-D model."""
        from tqdm import tqdm

        out = []
        x = np.asarray(images, dtype=np.float32)
        starts = range(0, len(x), batch_size)
        for start in tqdm(starts, desc="classify", unit="batch", disable=not progress):
            out.append(
                np.asarray(self.model(x[start : start + batch_size], training=False), dtype=np.float64)
            )
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))


def default_model_uri(params: Params | None) -> str:
    """``models:/<prefix>-<label mode>@champion``: the model users get unless they ask for another."""
    params = params or Params()
    return f"models:/{runs.registered_model_name(params.mlflow, params.labels.mode)}@{CHAMPION}"


def no_settings_error(uri: str) -> str:
    return (
        f"{uri}: the model carries no input settings (trained before they were stored with it) and there "
        "is no params.yaml here to take them from: run where its params.yaml is, or pass --params"
    )


def apply_input_settings(params: Params, settings: dict[str, Any], where: str) -> Params:
    """``params`` with the simulate / labels / render / measured-wavelength values a model stored."""
    try:
        changes = {}
        for section, keys in INPUT_SETTINGS.items():
            stored = settings.get(section) or {}
            changes[section] = dataclasses.replace(
                getattr(params, section), **{k: stored[k] for k in keys if k in stored}
            )
        return dataclasses.replace(params, **changes)
    except Exception as exc:  # a pydantic ValidationError or a TypeError from a hand-edited file
        raise XrdVisionError(f"{where}: invalid input settings ({one_line(exc)[:200]})") from None


def _settings_json(path: Path) -> dict[str, Any] | None:
    """``preprocessing.json`` beside a ``.keras`` file, or None (an older model)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise XrdVisionError(f"{path}: unreadable input settings ({exc})") from None
    if not isinstance(data, dict):
        raise XrdVisionError(f"{path}: expected a mapping of input settings")
    return data


def _mode_for(classes: list[str]) -> str:
    from xrdvision.crystal.labels import class_names

    for mode in ("crystal_system", "space_group"):
        if classes == class_names(mode):
            return mode
    return "custom"


def _default_classes(n_out: int, uri: str) -> tuple[list[str], str]:
    """The label mode's class order for a model that stored none, chosen by its number of outputs."""
    from xrdvision.crystal.labels import class_names

    for mode in ("crystal_system", "space_group"):
        if len(class_names(mode)) == n_out:
            return class_names(mode), f"default {mode} class order (no class list stored with the model)"
    raise XrdVisionError(
        f"{uri}: model has {n_out} outputs and no stored class list; cannot name its classes"
    )


def _classes_json(path: Path) -> list[str] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise XrdVisionError(f"{path}: unreadable class list ({exc})") from None
    classes = data.get("classes") if isinstance(data, dict) else data
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise XrdVisionError(f"{path}: expected {{'classes': [names...]}}")
    return classes


def _load_local(path: Path) -> LoadedModel:
    """A ``.keras`` file (classes from ``classes.json`` beside it), a folder holding one (the DVC
    ``models`` output, with ``run.json``), or an MLflow model folder (``MLmodel``)."""
    from xrdvision.models.vgg16 import load_full_model

    if path.is_dir() and (path / "MLmodel").is_file():
        return _load_mlflow(str(path.resolve()), None)
    keras_file = path / "model.keras" if path.is_dir() else path
    model = load_full_model(keras_file)
    classes = _classes_json(keras_file.parent / CLASSES_FILE)
    classes_from = str(keras_file.parent / CLASSES_FILE)
    if classes is None:
        classes, classes_from = _default_classes(int(model.output_shape[-1]), str(path))
    run_id, registered, model_id = None, None, None
    run_json = keras_file.parent / runs.RUN_INFO
    if run_json.is_file():
        info = runs.read_run_info(run_json)
        run_id, model_id = info.get("run_id"), info.get("model_id")
        if info.get("registered_model") and info.get("version"):
            registered = (str(info["registered_model"]), str(info["version"]))
    settings_file = keras_file.parent / INPUT_SETTINGS_FILE
    return LoadedModel(
        model,
        classes,
        str(keras_file),
        _mode_for(classes),
        classes_from,
        run_id,
        registered,
        settings=_settings_json(settings_file),
        settings_from=str(settings_file),
        model_id=model_id,
    )


def _registry_version(uri: str) -> Any:
    """The model version a ``models:/name@alias`` or ``models:/name/N`` URI points at (None for others).

    A missing model, alias or version is one line saying what exists, so the user can pick another.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    m = _MODELS_URI.match(uri)
    if not m or not (m.group("alias") or m.group("version")):
        return None
    client = mlflow.MlflowClient()
    name = m.group("name")
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        raise XrdVisionError(
            f"{uri}: no registered model '{name}' in {mlflow.get_tracking_uri()} "
            "(train one with `dvc repro`, or pass --model with a .keras file)"
        ) from None
    aliases = {str(k): str(v) for k, v in (registered.aliases or {}).items()}
    try:
        if m.group("alias"):
            return client.get_model_version_by_alias(name, m.group("alias"))
        return client.get_model_version(name, m.group("version"))
    except MlflowException:
        have = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "no aliases"
        hint = f" (e.g. models:/{name}@{next(iter(sorted(aliases)))})" if aliases else ""
        what = f"alias '{m.group('alias')}'" if m.group("alias") else f"version {m.group('version')}"
        raise XrdVisionError(f"{uri}: registered model '{name}' has no {what}; it has {have}{hint}") from None


def _load_mlflow(uri: str, version: Any) -> LoadedModel:
    """An MLflow model (TensorFlow flavour, or the Keras flavour of older versions), its metadata
    (classes, input settings) and, for a registry version, its tags and logged model id."""
    import mlflow

    try:
        model = mlflow.tensorflow.load_model(uri)
    except Exception as exc:  # missing artifacts, another flavour, corrupt archive: several types
        raise XrdVisionError(f"{uri}: cannot load model ({one_line(exc)[:200]})") from None
    try:
        metadata = mlflow.models.get_model_info(uri).metadata or {}
    except Exception:  # a folder without MLmodel metadata: fall through to the default order
        metadata = {}
    classes, classes_from, mode = None, "", ""
    if version is not None and (version.tags or {}).get("classes"):
        classes = json.loads(version.tags["classes"])
        classes_from = f"model version tag 'classes' ({version.name} v{version.version})"
        mode = version.tags.get("label_mode", "")
    if classes is None and metadata.get("classes"):
        classes = list(metadata["classes"])
        classes_from = "MLflow model metadata 'classes'"
        mode = metadata.get("label_mode", "")
    if classes is None:
        classes, classes_from = _default_classes(int(model.output_shape[-1]), uri)
    run_id = version.run_id if version is not None else None
    m = re.match(r"^runs:/([0-9a-f]+)/", uri)
    if m:
        run_id = m.group(1)
    model_id = None
    for source in (getattr(version, "source", None) or "", uri):
        found = re.match(r"^models:/(m-[0-9a-f]+)$", source)
        if found:
            model_id = found.group(1)
            break
    registered = (str(version.name), str(version.version)) if version is not None else None
    settings = metadata.get("preprocessing")
    return LoadedModel(
        model,
        classes,
        uri,
        mode or _mode_for(classes),
        classes_from,
        run_id,
        registered,
        settings=settings if isinstance(settings, dict) else None,
        settings_from=f"{uri} (MLmodel metadata 'preprocessing')",
        model_id=model_id,
    )


def _store(params: Params | None, uri: str) -> MlflowParams:
    """Where to look ``uri`` up: params' store, or with no params.yaml ``MLFLOW_TRACKING_URI``."""
    if params is not None:
        return params.mlflow
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise XrdVisionError(
            f"{uri}: no params.yaml here and MLFLOW_TRACKING_URI is not set: say which MLflow store holds "
            "the model (export MLFLOW_TRACKING_URI=sqlite:////path/to/mlruns/mlflow.db) or pass a "
            "models/ folder"
        )
    return MlflowParams()


def load_model(params: Params | None, model_uri: str | None = None) -> LoadedModel:
    """Load the classifier named by ``model_uri`` (default: :func:`default_model_uri`).

    Accepted: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<run id>/model``, any
    other MLflow model URI, an MLflow model folder, a folder holding ``model.keras`` (the ``models``
    stage output) or a ``.keras`` file. The class list is checked against the model's outputs.
    ``params`` None means there is no ``params.yaml``: a registry URI is looked up in
    ``MLFLOW_TRACKING_URI``, and the model must carry its input settings.
    """
    uri = model_uri or default_model_uri(params)
    local = Path(uri)
    if "://" not in uri and not uri.startswith(("models:/", "runs:/")):
        if not local.exists():
            raise XrdVisionError(f"{uri}: model not found (a .keras file, a model folder or an MLflow URI)")
        loaded = _load_local(local)
    else:
        runs.setup(_store(params, uri))
        loaded = _load_mlflow(uri, _registry_version(uri))
    n_out = int(loaded.model.output_shape[-1])
    if n_out != len(loaded.classes):
        raise XrdVisionError(
            f"{uri}: model has {n_out} outputs but its class list ({loaded.classes_from}) has "
            f"{len(loaded.classes)} names"
        )
    if loaded.settings is None:
        if params is None:
            raise XrdVisionError(no_settings_error(uri))
        loaded.warnings = [
            f"{uri}: the model carries no input settings (trained before they were stored with it); "
            "inputs are prepared with params.yaml's simulate/render settings",
            *settings_mismatch(params, loaded.run_id),
        ]
    return loaded


# What shapes an input image: if these differ from the model's training run, a CIF or a pattern is
# drawn differently from the images the model learnt from, and its predictions mean less.
IMAGE_SETTINGS = (
    "simulate.wavelength",
    "simulate.kalpha2",
    "simulate.two_theta_min",
    "simulate.two_theta_max",
    "simulate.step",
    "simulate.fwhm",
    "simulate.eta",
    "render.size",
    "render.line_width",
)


def _same(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip().lower() == b.strip().lower()


def settings_mismatch(params: Params, run_id: str | None) -> list[str]:
    """The image settings in ``params`` that differ from those the model's training run logged.

    Empty when they agree, or when the run is unknown or its store cannot be read (nothing to compare).
    """
    if not run_id:
        return []
    import mlflow

    try:
        runs.setup(params.mlflow, check=False)
        logged = mlflow.MlflowClient().get_run(run_id).data.params
    except Exception:  # another store, no server: nothing to compare against
        return []
    flat = params.flat()
    out = []
    for key in IMAGE_SETTINGS:
        if key in logged and not _same(str(flat[key]), logged[key]):
            out.append(f"{key} is {flat[key]} here but the model was trained with {logged[key]}")
    return out
