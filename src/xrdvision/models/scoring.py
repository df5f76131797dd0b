"""A registered model version scored on the test split: the figures ``promote`` compares.

:func:`test_split_scorer` returns the scoring function that ``xrdvision promote`` hands to
:func:`xrdvision.tracking.registry.promote`; the registry itself never loads a model (it sits in a
layer below this one). Both versions are scored now, on the same test structures (images for VGG16,
their peak lists on the model's grid for a 1-D model: so the better kind wins), with the evaluate
stage's metrics (:func:`xrdvision.models.evaluate.classification_metrics`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.crystal.labels import class_names
from xrdvision.errors import XrdVisionError, one_line
from xrdvision.formats.tables import read_split
from xrdvision.models.evaluate import classification_metrics, named, predict_images
from xrdvision.models.train import encode_labels
from xrdvision.tracking import runs


def load_test_split(params: Params, split_dir: Path, image_dir: Path) -> tuple[list[Path], np.ndarray, str]:
    """Image paths, class indices and the md5 of ``test.csv`` (recorded with the decision)."""
    path = Path(split_dir) / "test.csv"
    rows = read_split(path)
    if not rows:
        raise XrdVisionError(f"{path}: the test split is empty")
    mode = params.labels.mode
    y = encode_labels(np.array([r[mode] for r in rows]), class_names(mode), str(path))
    md5 = runs.file_md5(path)  # the digest the evaluate stage tags runs and versions with
    return [Path(image_dir) / r["image"] for r in rows], y, md5


def evaluate_version(uri: str, paths: list[Path], y: np.ndarray, params: Params) -> dict[str, Any]:
    """Load a registered version (``models:/<name>/<version>``) and score it on the images: ``test_*``.

    ``mlflow.tensorflow.load_model`` reads both the TensorFlow flavour the train stage logs and the Keras
    flavour of versions registered before.
    """
    import mlflow

    try:
        model = mlflow.tensorflow.load_model(uri)
    except Exception as exc:  # missing artifacts, wrong flavour, corrupt archive: several types
        raise XrdVisionError(f"{uri}: cannot load the registered model ({one_line(exc)})") from None
    classes = class_names(params.labels.mode)
    n_out = int(model.output_shape[-1])
    if n_out != len(classes):
        raise XrdVisionError(
            f"{uri}: model has {n_out} outputs, labels.mode={params.labels.mode} has {len(classes)} classes"
        )
    if len(model.input_shape) == 3:  # a 1-D model: the test structures' peak lists on its own grid
        probs = _pattern_probs(uri, model, paths, params)
    else:
        probs = predict_images(model, paths)
    return named(classification_metrics(probs, y, classes, params.seed), "test")


def _pattern_probs(uri: str, model: Any, paths: list[Path], params: Params) -> np.ndarray:
    """A 1-D model's probabilities for the test structures (named by their images' COD ids, in the
    split's order), prepared with the grid and profile stored with the model."""
    import dataclasses

    import mlflow

    from xrdvision.data.peak_table import cod_table, select
    from xrdvision.models.score_patterns import pattern_probabilities

    meta = (mlflow.models.get_model_info(uri).metadata or {}).get("preprocessing") or {}
    stored = {k: v for k, v in (meta.get("pattern") or {}).items() if hasattr(params.pattern, k)}
    sim = {k: v for k, v in (meta.get("simulate") or {}).items() if hasattr(params.simulate, k)}
    p = dataclasses.replace(
        params,
        pattern=dataclasses.replace(params.pattern, **stored),
        simulate=dataclasses.replace(params.simulate, **sim),
    )
    ids = [path.stem.rsplit("_", 1)[0] for path in paths]
    return pattern_probabilities(model, select(cod_table(p), ids), p)


def test_split_scorer(params: Params, split_dir: Path, image_dir: Path) -> Callable[[str], dict[str, Any]]:
    """``score(model_uri) -> test_* figures`` on the test split, with ``n_test`` and ``test_split_md5``.

    The split is read on the first call, not here: ``promote`` checks the registry first, so a
    registry without a challenger is reported before a missing split is, and nothing is loaded twice.
    """
    split: tuple[list[Path], np.ndarray, str] | None = None

    def score(uri: str) -> dict[str, Any]:
        nonlocal split
        if split is None:
            split = load_test_split(params, split_dir, image_dir)
        paths, y, md5 = split
        return {**evaluate_version(uri, paths, y, params), "test_split_md5": md5}

    return score
