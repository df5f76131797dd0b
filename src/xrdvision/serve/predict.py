"""Prediction on a scientist's files (CIFs, measured patterns, images) and its output formats.

:func:`predict_files` classifies the images :class:`~xrdvision.serve.inputs.Preparer` makes, in batches,
with a model from :func:`~xrdvision.serve.loading.load_model`. A bad file never stops the others: it
gets its own one-line error in the results. The results are shown as a plain-text table
(:func:`format_table`), JSON (:func:`to_json`) or CSV (:func:`to_csv`); :func:`serving_payload` builds
the body ``mlflow models serve`` takes for the same image.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.errors import XrdVisionError
from xrdvision.serve.inputs import Preparer, error_line, input_kind
from xrdvision.serve.loading import LoadedModel, load_model

logger = logging.getLogger(__name__)


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
    uncertain: bool = False  # top-1 probability under measured.uncertain_below
    calibration: str = ""  # the class prior and the uncertainty threshold used, in words
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
    params: Params | None,
    model_uri: str | None = None,
    top_k: int = 3,
    batch_size: int = 16,
    *,
    wavelength: float | None = None,
    model: LoadedModel | None = None,
    progress: bool | None = None,
) -> list[Prediction]:
    """Predict every file; results in input order, a bad file as a :class:`Prediction` with ``error``.

    Inputs are prepared with the settings stored with the model (:meth:`LoadedModel.input_params`);
    ``params`` (None: there is no ``params.yaml``) only says where the registry is, and is the fallback
    for an older model that stored none.

    Probabilities are the model's calibrated ones (a 1-D model carries its fitted temperature) under the
    class prior ``params.measured.prior``; a top-1 probability under ``measured.uncertain_below`` marks
    the file ``uncertain``.

    ``wavelength`` (Angstrom) applies to measured patterns and overrides their headers; without it a
    header's wavelength is used, else the model's ``measured.wavelength``. ``model`` skips loading (reuse one
    :func:`load_model` across calls). Images are classified ``batch_size`` at a time as files are
    prepared, so memory stays flat however many files are given. ``progress`` (a bar on stderr) defaults
    to whether this module logs at INFO, so the CLI's ``--quiet`` hides it.
    """
    from tqdm import tqdm

    if top_k < 1:
        raise XrdVisionError(f"--top-k: must be >= 1 (got {top_k})")
    show = logger.isEnabledFor(logging.INFO) if progress is None else progress
    lm = model or load_model(params, model_uri)
    settings = (params or Params()).measured
    reweight = lm.prior_correction(settings.prior)
    calibration = (
        f"class prior {settings.prior}; uncertain: top-1 probability under {settings.uncertain_below:.0%}"
    )
    prep = Preparer(lm.input_params(params), lm.image_size, lm.model_kind)
    k = min(top_k, len(lm.classes))
    results: list[Prediction] = []
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        probs = reweight(lm.predict(np.stack([img for _, img in pending]), batch_size))
        for (i, _), p in zip(pending, probs, strict=True):
            results[i].probabilities = p
            results[i].top = _top_k(p, lm.classes, k)
            results[i].uncertain = bool(p.max() < settings.uncertain_below)
        pending.clear()

    for path in tqdm([Path(p) for p in paths], desc="predict", unit="file", disable=not show):
        pred = Prediction(
            file=str(path),
            kind="",
            model=lm.uri,
            label_mode=lm.label_mode,
            warnings=lm.warnings,
            calibration=calibration,
        )
        results.append(pred)
        try:
            pred.kind = input_kind(path)
            prepared = prep(path, wavelength)
        except Exception as exc:  # any failure of one file is reported on its line; the batch goes on
            pred.error = error_line(path, exc)
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

    A failed file shows its error line in place of the classes; ``uncertain`` flags a top-1 probability
    under ``measured.uncertain_below``. The last line names the model.
    """
    if not preds:
        return "no files"
    k = max((len(p.top) for p in preds), default=0)
    head = ["file", "kind", "label", *[_ordinal(i + 1) for i in range(k)], "flag"]
    cw = max((len(c) for p in preds for c, _ in p.top), default=0)
    rows = []
    for p in preds:
        label = p.reference.get(p.label_mode, "") if p.reference else ""
        if p.ok:
            cells = [f"{c:<{cw}} {pr:6.1%}" for c, pr in p.top]
            rows.append([p.file, p.kind, label or "-", *cells, "uncertain" if p.uncertain else ""])
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
    if preds[0].calibration:
        lines.append(preds[0].calibration)
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
        "uncertain": p.uncertain if p.ok else None,
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
        "calibration": first.calibration,
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
            "uncertain",
            "error",
        ]
    )
    for p in preds:
        label = p.reference.get(p.label_mode, "") if p.reference else ""
        cells = [x for c, pr in p.top for x in (c, f"{pr:.6f}")]
        cells += [""] * (2 * k - len(cells))
        flag = ("yes" if p.uncertain else "no") if p.ok else ""
        w.writerow([p.file, p.kind, "ok" if p.ok else "error", label, *cells, flag, p.error])
    return buf.getvalue()


def serving_payload(
    path: str | Path,
    params: Params | None,
    wavelength: float | None = None,
    model: LoadedModel | None = None,
) -> dict[str, Any]:
    """The JSON body for ``mlflow models serve``'s ``/invocations``: ``{"inputs": [input]}``.

    The input is the one :func:`predict_files` would classify (CIF simulated and rendered, pattern
    converted and rendered, image as is), as float 0-255 RGB of shape (1, size, size, 3), since the
    served model carries VGG16's preprocessing itself; for a 1-D model the scaled pattern (1, points,
    1). With ``model`` the input is prepared with the
    settings stored with it, else with ``params``.
    """
    settings = model.input_params(params) if model is not None else params
    if settings is None:
        raise XrdVisionError("serving_payload: needs params or a loaded model to prepare the input")
    prepared = Preparer(settings)(path, wavelength)
    return {"inputs": prepared.image[None].astype(np.float32).tolist()}
