"""Prediction on new files (CIFs, measured patterns, images) and the real-data check.

Every input becomes the image the model was trained on, by the training code itself: a CIF goes
through :func:`xrdvision.data.simulate.simulate_file` and the same
:class:`~xrdvision.data.render.Renderer` settings as the render stage (so a CIF from the training set
gives exactly its training image); a measured pattern goes through :mod:`xrdvision.serve.measured`
(wavelength, background, normalisation, training grid) and the
same renderer; a ready image is taken as it is. The images are then classified in batches.

A bad file never stops the others: it gets its own one-line error in the results. The model comes from
the MLflow registry (``models:/<prefix>-<mode>@champion`` by default), any alias, version or run URI,
an MLflow model folder or a local ``.keras`` file; where its class list comes from is recorded, and a
model whose outputs do not match the class list is refused rather than silently mislabelled.

:func:`run_evaluate_measured` is the real-data check: the model on the measured patterns listed in
``params.measured.folder``/``INDEX.csv``, with bootstrap confidence intervals, per-source and per-class
figures and a confusion matrix, written for DVC and logged to MLflow.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.errors import InputError, XrdVisionError
from xrdvision.formats.atomic import atomic_open, write_json
from xrdvision.formats.tables import read_table
from xrdvision.tracking import runs

CIF_SUFFIXES = (".cif",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CHAMPION = "champion"
CLASSES_FILE = "classes.json"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))?$")


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


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

    @property
    def image_size(self) -> int:
        return int(self.model.input_shape[1])

    def predict(self, images: np.ndarray, batch_size: int = 16, progress: bool = False) -> np.ndarray:
        """Class probabilities ``(n, n_classes)`` of raw 0-255 RGB images ``(n, size, size, 3)``."""
        from tqdm import tqdm

        out = []
        x = np.asarray(images, dtype=np.float32)
        starts = range(0, len(x), batch_size)
        for start in tqdm(starts, desc="classify", unit="batch", disable=not progress):
            out.append(
                np.asarray(self.model(x[start : start + batch_size], training=False), dtype=np.float64)
            )
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))


def default_model_uri(params: Params) -> str:
    """``models:/<prefix>-<label mode>@champion``: the model users get unless they ask for another."""
    return f"models:/{runs.registered_model_name(params.mlflow, params.labels.mode)}@{CHAMPION}"


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
    run_id, registered = None, None
    run_json = keras_file.parent / runs.RUN_INFO
    if run_json.is_file():
        info = runs.read_run_info(run_json)
        run_id = info.get("run_id")
        if info.get("registered_model") and info.get("version"):
            registered = (str(info["registered_model"]), str(info["version"]))
    return LoadedModel(model, classes, str(keras_file), _mode_for(classes), classes_from, run_id, registered)


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
    import mlflow

    try:
        model = mlflow.keras.load_model(uri)
    except Exception as exc:  # missing artifacts, another flavour, corrupt archive: several types
        raise XrdVisionError(f"{uri}: cannot load model ({' '.join(str(exc).split())[:200]})") from None
    classes, classes_from, mode = None, "", ""
    if version is not None and (version.tags or {}).get("classes"):
        classes = json.loads(version.tags["classes"])
        classes_from = f"model version tag 'classes' ({version.name} v{version.version})"
        mode = version.tags.get("label_mode", "")
    if classes is None:
        try:
            metadata = mlflow.models.get_model_info(uri).metadata or {}
        except Exception:  # a folder without MLmodel metadata: fall through to the default order
            metadata = {}
        if metadata.get("classes"):
            classes = list(metadata["classes"])
            classes_from = "MLflow model metadata 'classes'"
            mode = metadata.get("label_mode", "")
    if classes is None:
        classes, classes_from = _default_classes(int(model.output_shape[-1]), uri)
    run_id = version.run_id if version is not None else None
    m = re.match(r"^runs:/([0-9a-f]+)/", uri)
    if m:
        run_id = m.group(1)
    registered = (str(version.name), str(version.version)) if version is not None else None
    return LoadedModel(model, classes, uri, mode or _mode_for(classes), classes_from, run_id, registered)


def load_model(params: Params, model_uri: str | None = None) -> LoadedModel:
    """Load the classifier named by ``model_uri`` (default: :func:`default_model_uri`).

    Accepted: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<run id>/model``, any
    other MLflow model URI, an MLflow model folder, a folder holding ``model.keras`` (the ``models``
    stage output) or a ``.keras`` file. The class list is checked against the model's outputs.
    """
    uri = model_uri or default_model_uri(params)
    local = Path(uri)
    if "://" not in uri and not uri.startswith(("models:/", "runs:/")):
        if not local.exists():
            raise XrdVisionError(f"{uri}: model not found (a .keras file, a model folder or an MLflow URI)")
        loaded = _load_local(local)
    else:
        runs.setup(params.mlflow)
        loaded = _load_mlflow(uri, _registry_version(uri))
    n_out = int(loaded.model.output_shape[-1])
    if n_out != len(loaded.classes):
        raise XrdVisionError(
            f"{uri}: model has {n_out} outputs but its class list ({loaded.classes_from}) has "
            f"{len(loaded.classes)} names"
        )
    loaded.warnings = settings_mismatch(params, loaded.run_id)
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


# --------------------------------------------------------------------------------------------------
# Files -> images
# --------------------------------------------------------------------------------------------------


def input_kind(path: str | Path) -> str:
    """``cif``, ``pattern`` or ``image`` from the file name; anything else is an :class:`InputError`."""
    from xrdvision.serve.measured import PATTERN_SUFFIXES, VENDOR_FORMATS

    if Path(path).is_dir():
        raise InputError(path, "is a folder; pass the files in it (e.g. folder/*.xy)")
    suffix = Path(path).suffix.lower()
    if suffix in VENDOR_FORMATS:
        raise InputError(path, f"{VENDOR_FORMATS[suffix]}; export the pattern as two-column text (.xy)")
    if suffix in CIF_SUFFIXES:
        return "cif"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in PATTERN_SUFFIXES:
        return "pattern"
    raise InputError(
        path,
        f"unknown file type '{suffix or 'no extension'}' (expected a CIF, a two-column pattern "
        f"{'/'.join(PATTERN_SUFFIXES)} or an image {'/'.join(IMAGE_SUFFIXES)})",
    )


@dataclass
class Prepared:
    """One input as the model's image, with what we learnt on the way."""

    image: np.ndarray  # (size, size, 3) uint8 or float32 in 0-255
    kind: str
    reference: dict[str, str] = field(default_factory=dict)  # a CIF's own labels (spglib)
    notes: list[str] = field(default_factory=list)


class Preparer:
    """Turns files into model images with the training settings (one renderer per instance)."""

    def __init__(self, params: Params, image_size: int | None = None) -> None:
        from xrdvision.crystal.profile import grid
        from xrdvision.data.render import Renderer

        sim = params.simulate
        self.params = params
        self.size = int(image_size or params.render.size)
        if self.size != params.render.size:
            raise XrdVisionError(
                f"params: render.size: {params.render.size} px, but the model takes {self.size} px images"
            )
        self.grid = grid(sim.two_theta_min, sim.two_theta_max, sim.step)
        self.renderer = Renderer(
            params.render.size, params.render.line_width, (sim.two_theta_min, sim.two_theta_max)
        )

    def cif(self, path: Path) -> Prepared:
        from xrdvision.data.simulate import simulate_file

        with contextlib.redirect_stdout(sys.stderr):  # keep stdout clean for --json / --csv
            record = simulate_file(path, self.params.simulate, self.params.labels)
        assert record.pattern is not None and record.labels is not None
        ref = {"crystal_system": record.labels.crystal_system, "space_group": str(record.labels.space_group)}
        return Prepared(self.renderer.render(self.grid, record.pattern), "cif", ref)

    def pattern(
        self, path: Path, wavelength: float | None = None, default_wavelength: float | None = None
    ) -> Prepared:
        from xrdvision.serve.measured import read_pattern, to_training_grid

        pattern = read_pattern(path, wavelength)
        default = default_wavelength if default_wavelength is not None else self.params.measured.wavelength
        y = to_training_grid(pattern, self.params.simulate, default_wavelength=default)
        wl = pattern.wavelength if pattern.wavelength is not None else default
        notes = [f"wavelength {wl:g} A ({pattern.wavelength_from or 'default'})", *pattern.notes]
        return Prepared(self.renderer.render(self.grid, y), "pattern", notes=notes)

    def image(self, path: Path) -> Prepared:
        from xrdvision.models.features import load_image

        return Prepared(load_image(path, self.size), "image")

    def __call__(
        self, path: str | Path, wavelength: float | None = None, default_wavelength: float | None = None
    ) -> Prepared:
        path = Path(path)
        kind = input_kind(path)
        if kind != "pattern" and not path.is_file():
            raise InputError(path, "file not found")
        if kind == "cif":
            return self.cif(path)
        if kind == "image":
            return self.image(path)
        return self.pattern(path, wavelength, default_wavelength)


def _error_line(path: Path, exc: BaseException) -> str:
    """One line naming the file: an InputError already does; anything else gets the path prefixed."""
    if isinstance(exc, InputError):
        return str(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, XrdVisionError):
        return text if text.startswith(str(path)) else f"{path}: {text}"
    return f"{path}: {type(exc).__name__}: {text}"[:300]


# --------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """The result for one file: the top-k classes (best first) or an error line."""

    file: str
    kind: str
    top: list[tuple[str, float]] = field(default_factory=list)
    probabilities: np.ndarray | None = None  # all classes, in the model's class order
    error: str = ""
    reference: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    model: str = ""
    label_mode: str = ""
    warnings: list[str] = field(default_factory=list)  # about the model, shared by all files

    @property
    def ok(self) -> bool:
        return not self.error


def _top_k(probs: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [(classes[i], float(probs[i])) for i in order]


def predict_files(
    paths: list[str | Path],
    params: Params,
    model_uri: str | None = None,
    top_k: int = 3,
    batch_size: int = 16,
    *,
    wavelength: float | None = None,
    model: LoadedModel | None = None,
    progress: bool = True,
) -> list[Prediction]:
    """Predict every file; results in input order, a bad file as a :class:`Prediction` with ``error``.

    ``wavelength`` (Angstrom) applies to measured patterns and overrides their headers; without it a
    header's wavelength is used, else ``params.measured.wavelength``. ``model`` skips loading (reuse one
    :func:`load_model` across calls). Images are classified ``batch_size`` at a time as files are
    prepared, so memory stays flat however many files are given.
    """
    from tqdm import tqdm

    if top_k < 1:
        raise XrdVisionError(f"--top-k: must be >= 1 (got {top_k})")
    lm = model or load_model(params, model_uri)
    prep = Preparer(params, lm.image_size)
    k = min(top_k, len(lm.classes))
    results: list[Prediction] = []
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        probs = lm.predict(np.stack([img for _, img in pending]), batch_size)
        for (i, _), p in zip(pending, probs, strict=True):
            results[i].probabilities = p
            results[i].top = _top_k(p, lm.classes, k)
        pending.clear()

    for path in tqdm([Path(p) for p in paths], desc="predict", unit="file", disable=not progress):
        pred = Prediction(
            file=str(path), kind="", model=lm.uri, label_mode=lm.label_mode, warnings=lm.warnings
        )
        results.append(pred)
        try:
            pred.kind = input_kind(path)
            prepared = prep(path, wavelength)
        except Exception as exc:  # any failure of one file is reported on its line; the batch goes on
            pred.error = _error_line(path, exc)
            continue
        pred.reference, pred.notes = prepared.reference, prepared.notes
        pending.append((len(results) - 1, prepared.image))
        if len(pending) >= batch_size:
            flush()
    flush()
    return results


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def format_table(preds: list[Prediction]) -> str:
    """A plain-text table, one row per file: kind, the CIF's own label, then top-k ``class p%``.

    A failed file shows its error line in place of the classes. The last line names the model.
    """
    if not preds:
        return "no files"
    k = max((len(p.top) for p in preds), default=0)
    head = ["file", "kind", "label", *[_ordinal(i + 1) for i in range(k)]]
    cw = max((len(c) for p in preds for c, _ in p.top), default=0)
    rows = []
    for p in preds:
        label = p.reference.get(p.label_mode, "") if p.reference else ""
        if p.ok:
            rows.append([p.file, p.kind, label or "-", *[f"{c:<{cw}} {pr:6.1%}" for c, pr in p.top]])
        else:
            rows.append([p.file, p.kind or "-", "-", f"error: {p.error}"])
    widths = [len(h) for h in head]
    for r in rows:
        if not r[-1].startswith("error:"):  # an error line runs on; it does not widen the columns
            widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
        else:
            widths[:3] = [max(w, len(c)) for w, c in zip(widths[:3], r[:3], strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r[:3], widths[:3], strict=True)]
        if r[-1].startswith("error:"):
            cells.append(r[-1])
        else:
            cells += [c.ljust(w) for c, w in zip(r[3:], widths[3:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    n_bad = sum(not p.ok for p in preds)
    lines.append(
        f"{len(preds)} file(s), {n_bad} failed; model {preds[0].model} ({preds[0].label_mode}); "
        "label: the CIF's own symmetry (spglib)"
    )
    lines += [f"warning: {w}" for w in preds[0].warnings]
    return "\n".join(lines)


def _ordinal(n: int) -> str:
    return f"{n}{'st' if n == 1 else 'nd' if n == 2 else 'rd' if n == 3 else 'th'}"


def prediction_dict(p: Prediction) -> dict[str, Any]:
    """One file's result as plain JSON types."""
    return {
        "file": p.file,
        "kind": p.kind,
        "status": "ok" if p.ok else "error",
        "error": p.error or None,
        "top": [{"class": c, "probability": round(pr, 6)} for c, pr in p.top],
        "label": p.reference or None,
        "notes": p.notes,
    }


def to_json(preds: list[Prediction]) -> str:
    """``{"model", "label_mode", "files": [...]}`` as indented JSON (see :func:`prediction_dict`)."""
    first = preds[0] if preds else Prediction("", "")
    doc = {
        "model": first.model,
        "label_mode": first.label_mode,
        "warnings": first.warnings,
        "files": [prediction_dict(p) for p in preds],
    }
    return json.dumps(doc, indent=2)


def to_csv(preds: list[Prediction]) -> str:
    """One row per file: ``file, kind, status, label, class_1, p_1, ..., class_k, p_k, error``."""
    k = max((len(p.top) for p in preds), default=0)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "file",
            "kind",
            "status",
            "label",
            *[x for i in range(k) for x in (f"class_{i + 1}", f"p_{i + 1}")],
            "error",
        ]
    )
    for p in preds:
        label = p.reference.get(p.label_mode, "") if p.reference else ""
        cells = [x for c, pr in p.top for x in (c, f"{pr:.6f}")]
        cells += [""] * (2 * k - len(cells))
        w.writerow([p.file, p.kind, "ok" if p.ok else "error", label, *cells, p.error])
    return buf.getvalue()


def serving_payload(path: str | Path, params: Params, wavelength: float | None = None) -> dict[str, Any]:
    """The JSON body for ``mlflow models serve``'s ``/invocations``: ``{"inputs": [image]}``.

    The image is the one :func:`predict_files` would classify (CIF simulated and rendered, pattern
    converted and rendered, image as is), as float 0-255 RGB of shape (1, size, size, 3), since the
    served model carries VGG16's preprocessing itself.
    """
    prepared = Preparer(params)(path, wavelength)
    return {"inputs": prepared.image[None].astype(np.float32).tolist()}


# --------------------------------------------------------------------------------------------------
# The real-data check
# --------------------------------------------------------------------------------------------------


def _index_rows(folder: Path, index_name: str) -> list[dict[str, str]]:
    return read_table(
        folder / index_name,
        ["file", "crystal_system", "space_group"],
        "index of measured patterns",
        allow_empty=False,
    )


def _label(row: dict[str, str], mode: str) -> str:
    value = (row.get(mode) or "").strip()
    if mode == "space_group" and value:
        try:
            return str(int(float(value)))
        except ValueError:
            return ""
    return value


def _float_or_none(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and np.isfinite(value) and value > 0 else None


def _source_of(file: str) -> str:
    parts = Path(file).parts
    return parts[0] if len(parts) > 1 else "other"


def measured_metrics(
    probs: np.ndarray, y: np.ndarray, sources: list[str], classes: list[str], seed: int
) -> dict[str, Any]:
    """Overall figures (accuracy with a 95 % bootstrap CI, top-3, macro F1, loss), per source and per
    true class, plus the majority-class baseline (what always answering the commonest class scores)."""
    from xrdvision.models.evaluate import bootstrap_ci, classification_metrics

    pred = probs.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    out = classification_metrics(probs, y, classes, seed)
    out["n"] = out.pop("n_test")
    counts = np.bincount(y, minlength=len(classes))
    out["majority_baseline_accuracy"] = float(counts.max() / len(y))
    per_source: dict[str, Any] = {}
    for s in sorted(set(sources)):
        mask = np.array([x == s for x in sources])
        lo, hi = bootstrap_ci(correct[mask], seed)
        per_source[s] = {
            "n": int(mask.sum()),
            "accuracy": float(correct[mask].mean()),
            "accuracy_ci95_low": lo,
            "accuracy_ci95_high": hi,
        }
    per_class: dict[str, Any] = {}
    for c in np.flatnonzero(counts):
        mask = y == c
        per_class[classes[c]] = {
            "n": int(mask.sum()),
            "correct": int(correct[mask].sum()),
            "accuracy": float(correct[mask].mean()),
            "predicted_as_this": int((pred == c).sum()),
        }
    out["per_source"] = per_source
    out["per_class"] = per_class
    return out


def run_evaluate_measured(
    params: Params, model_uri_or_dir: str | Path, out_metrics: str | Path, out_dir: str | Path
) -> dict[str, Any]:
    """The model on ``params.measured.folder``/``index``: metrics for DVC, reports, MLflow.

    Every INDEX row with a label in the model's mode (crystal system, or space group for a space-group
    model) is predicted; unlabelled rows are counted and left out, unreadable files are listed in
    ``failures.csv`` and counted, and do not stop the run. The wavelength of each pattern is its file
    header's, else the INDEX ``wavelength_A`` column, else ``params.measured.wavelength``.

    Writes ``out_metrics`` (JSON) and, in ``out_dir``, ``predictions.csv`` (one row per pattern),
    ``confusion_matrix.csv`` and ``.png``, ``per_class.csv`` and ``failures.csv``. Figures are logged to
    the MLflow run that trained the model (``measured_*`` metrics, ``measured/`` artifacts, and
    ``measured_accuracy`` on the registered version) or, for a model with no known run, to a new
    ``evaluate-measured`` run. An empty ``measured.folder`` writes ``{"skipped": true, ...}`` only.
    """
    from tqdm import tqdm

    from xrdvision.models.evaluate import confusion, plot_confusion

    out_metrics, out_dir = Path(out_metrics), Path(out_dir)
    mp = params.measured
    if not mp.folder:
        metrics: dict[str, Any] = {"skipped": True, "reason": "params measured.folder is empty"}
        write_json(out_metrics, metrics)
        return metrics
    folder = Path(mp.folder)
    if not folder.is_dir():
        # A fresh clone without ../shared/ still runs `dvc repro` end to end: the check is reported as
        # skipped (printed, and recorded in the metrics file), never silently passed.
        metrics = {"skipped": True, "reason": f"measured.folder {folder} does not exist or is not a folder"}
        write_json(out_metrics, metrics)
        return metrics
    rows = _index_rows(folder, mp.index)
    lm = load_model(params, str(model_uri_or_dir))
    mode = lm.label_mode
    if mode not in ("crystal_system", "space_group"):
        raise XrdVisionError(
            f"{lm.uri}: classes are not a known label mode; cannot score against INDEX labels"
        )
    index_of = {c: i for i, c in enumerate(lm.classes)}
    prep = Preparer(params, lm.image_size)

    kept: list[dict[str, str]] = []
    images: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []
    n_unlabelled = n_unknown_class = 0
    for row in tqdm(rows, desc="measured", unit="pattern"):
        label = _label(row, mode)
        if not label:
            n_unlabelled += 1
            continue
        if label not in index_of:
            n_unknown_class += 1
            failures.append((row["file"], f"label {label!r} is not one of the model's classes"))
            continue
        path = folder / row["file"]
        try:
            prepared = prep(path, None, _float_or_none(row.get("wavelength_A")) or mp.wavelength)
        except Exception as exc:  # reported in failures.csv; the other patterns are still scored
            failures.append((row["file"], _error_line(path, exc)))
            continue
        kept.append(row)
        images.append(prepared.image)
    if not kept:
        raise XrdVisionError(f"{folder / mp.index}: no pattern could be scored ({len(failures)} failed)")

    probs = lm.predict(np.stack(images), progress=True)
    y = np.array([index_of[_label(r, mode)] for r in kept])
    sources = [_source_of(r["file"]) for r in kept]
    metrics = measured_metrics(probs, y, sources, lm.classes, params.seed)
    metrics = {
        "skipped": False,
        "label_mode": mode,
        "model": lm.uri,
        "folder": str(folder),
        "n_index": len(rows),
        "n_unlabelled": n_unlabelled,
        "n_failed": len(failures),
        **metrics,
        "warnings": lm.warnings,
    }
    pred = probs.argmax(axis=1)
    _write_measured_reports(out_dir, kept, probs, y, pred, sources, lm.classes, failures, metrics)
    present = sorted(set(y.tolist()) | set(pred.tolist()))
    names = [lm.classes[i] for i in present]
    matrix = confusion(y, pred, len(lm.classes))[np.ix_(present, present)]
    with atomic_open(out_dir / "confusion_matrix.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["true\\predicted", *names])
        for name, r in zip(names, matrix, strict=True):
            w.writerow([name, *r.tolist()])
    title = (
        f"measured patterns, {mode.replace('_', ' ')}: accuracy {metrics['accuracy']:.1%} "
        f"[{metrics['accuracy_ci95_low']:.0%}-{metrics['accuracy_ci95_high']:.0%}] (n={len(y)})"
    )
    plot_confusion(matrix, names, out_dir / "confusion_matrix.png", title)
    write_json(out_metrics, metrics)
    metrics["mlflow_run_id"] = _log_measured(params, lm, metrics, out_dir)
    return metrics


def _write_measured_reports(
    out_dir: Path,
    rows: list[dict[str, str]],
    probs: np.ndarray,
    y: np.ndarray,
    pred: np.ndarray,
    sources: list[str],
    classes: list[str],
    failures: list[tuple[str, str]],
    metrics: dict[str, Any],
) -> None:
    with atomic_open(out_dir / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "source", "actual", "predicted", "p_predicted", "p_actual", "top3", "correct"])
        for r, s, t, p, pr in zip(rows, sources, y, pred, probs, strict=True):
            top3 = ";".join(classes[i] for i in np.argsort(-pr, kind="stable")[:3])
            w.writerow(
                [r["file"], s, classes[t], classes[p], f"{pr[p]:.4f}", f"{pr[t]:.4f}", top3, int(t == p)]
            )
    with atomic_open(out_dir / "per_class.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["class", "n", "correct", "accuracy", "predicted_as_this"])
        for name, d in metrics["per_class"].items():
            w.writerow([name, d["n"], d["correct"], f"{d['accuracy']:.4f}", d["predicted_as_this"]])
    with atomic_open(out_dir / "failures.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "reason"])
        w.writerows(failures)


def _flat_figures(metrics: dict[str, Any]) -> dict[str, float]:
    """``measured_accuracy``, ``measured_rruff_agi_accuracy``, ... : the numbers MLflow takes."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            out[f"measured_{k}"] = float(v)
    for s, d in metrics.get("per_source", {}).items():
        for k, v in d.items():
            if np.isfinite(v):
                out[f"measured_{re.sub(r'[^A-Za-z0-9_]', '_', s)}_{k}"] = float(v)
    return out


def _log_measured(params: Params, lm: LoadedModel, metrics: dict[str, Any], out_dir: Path) -> str:
    """Log to the model's training run (or a new run); returns the run id."""
    import mlflow

    runs.setup(params.mlflow)
    client = mlflow.MlflowClient()
    figures = _flat_figures(metrics)
    run_id = lm.run_id
    if run_id is not None:
        try:
            client.get_run(run_id)
        except Exception:  # the run lives in another store: log a run of our own instead
            run_id = None
    if run_id is None:
        runs.use_experiment(params.mlflow)
        with mlflow.start_run(run_name="evaluate-measured") as run:
            mlflow.set_tags(
                {"model_uri": lm.uri, "label_mode": lm.label_mode, "git_commit": runs.git_commit()}
            )
            run_id = run.info.run_id
    for k, v in figures.items():
        client.log_metric(run_id, k, v)
    for name in (
        "predictions.csv",
        "per_class.csv",
        "failures.csv",
        "confusion_matrix.csv",
        "confusion_matrix.png",
    ):
        client.log_artifact(run_id, str(out_dir / name), "measured")
    if lm.registered is not None:
        name, version = lm.registered
        with contextlib.suppress(Exception):  # a version from another store: the run has the figures
            client.set_model_version_tag(name, version, "measured_accuracy", f"{metrics['accuracy']:.6f}")
            client.set_model_version_tag(name, version, "measured_n", str(metrics["n"]))
    return run_id
