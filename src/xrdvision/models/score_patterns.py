"""The 1-D model's inputs for real structures, and its scores on COD beyond the test split.

Why: the test split (72-86 structures, +-11 points) is the official figure, comparable to every earlier
run; but a model trained on other sources can be scored on every COD structure whose compound no
training structure shares (all 852 when training uses no COD structure: +-3 points), and the organic and
metal-organic structures (C and H), which the Materials Project lacks, apart from the rest. A simulated
real structure is rendered noiselessly with the simulate stage's profile (:func:`clean_batch`), as the
test images show it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.crystal.labels import class_names
from xrdvision.data import measurement
from xrdvision.data.peak_table import PeakTable, cod_table, select, split_ids, training_table


def clean_batch(table: PeakTable, idx: np.ndarray, params: Params, x: np.ndarray) -> np.ndarray:
    """Scaled noiseless patterns (B, G, 1) of structures ``idx``."""
    y = measurement.draw_patterns(table, idx, params, x, None)
    return measurement.scale_intensity(y, params.pattern.scale)[..., None]


def clean_pattern(
    record: dict[str, Any], settings: Any, params: Params, x: np.ndarray, name: str
) -> np.ndarray:
    """One structure (a batch-simulator record) as the 1-D model's input (points, 1), rendered as
    :func:`clean_batch` renders the test structures; a structure that gives no peak list is an
    :class:`~xrdvision.errors.InputError` naming ``name``."""
    from xrdvision.crystal.powder import simulate_batch
    from xrdvision.errors import InputError

    batch = simulate_batch([record], settings, source=name)
    if batch.errors:
        raise InputError(name, batch.errors[0].split(": ", 1)[-1])
    s = params.simulate
    lines = measurement.Lines(
        np.zeros(len(batch.two_theta), np.int64), batch.two_theta, batch.intensity, None
    )
    y = measurement.clean_patterns(lines, 1, x, s.fwhm, s.eta, s.kalpha2, settings.wavelength)
    return measurement.scale_intensity(y, params.pattern.scale)[0][:, None]


def pattern_probabilities(model: Any, table: PeakTable, params: Params, batch_size: int = 256) -> np.ndarray:
    """Class probabilities of every structure of ``table``, rendered ``batch_size`` at a time."""
    x = measurement.grid(params.pattern)
    out = []
    for start in range(0, len(table), batch_size):
        idx = np.arange(start, min(len(table), start + batch_size))
        out.append(np.asarray(model.predict_on_batch(clean_batch(table, idx, params, x))))
    return np.concatenate(out) if out else np.zeros((0, len(class_names(params.labels.mode))))


def test_split_inputs(params: Params, split_dir: Path) -> tuple[PeakTable, list[str]]:
    """The COD test split's structures (in the split's order) and their ids."""
    ids = split_ids(split_dir, "test")
    return select(cod_table(params), ids), ids


def unseen_mask(cod: PeakTable, seen: set[str]) -> np.ndarray:
    """Which structures of ``cod`` have a compound (reduced formula) outside ``seen``."""
    return np.array([f not in seen for f in cod.reduced_formula.tolist()], dtype=bool)


def training_formulas(params: Params, cod: PeakTable, split_dir: Path) -> set[str]:
    """The compounds of the training sources of ``params`` (the evaluate stage's view)."""
    return set(training_table(params, cod, split_dir).reduced_formula.tolist())
