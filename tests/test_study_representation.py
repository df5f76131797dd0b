"""benchmarks/study_representation.py: its figures are only worth quoting if folds are grouped, the extra
(synthetic) data never reaches a tested fold, and each rendering puts the lines where it says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from helpers_patterns import SMALL_CIFS, build_patterns
from xrdvision.formats.patterns import load_patterns

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "study_representation.py"
_spec = importlib.util.spec_from_file_location("study_representation", _PATH)
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


def _nearest_neighbour():
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(1)


def test_folds_keep_each_compound_group_out_of_its_own_training() -> None:
    # 40 groups of 3 identical copies, labels random per group: a leaked copy makes 1-NN perfect.
    rng = np.random.default_rng(0)
    labels = rng.choice(list("abcd"), size=40)
    X = np.repeat(rng.normal(size=(40, 5)), 3, axis=0)
    y = np.repeat(labels, 3)
    groups = np.repeat([f"g{i}" for i in range(40)], 3)
    grouped = study.cross_validate(X, y, groups, _nearest_neighbour)
    leaky = study.cross_validate(X, y, np.arange(len(y)).astype(str), _nearest_neighbour)
    assert leaky["accuracy"] == 1.0  # the same data split by row, not by group
    assert grouped["accuracy"] < 0.6  # chance is ~0.25-0.3 here


def test_extra_data_trains_every_fold_but_is_never_scored() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 3))
    y = np.array(["a", "b"] * 25)
    groups = np.arange(50).astype(str)
    # the extra rows are the tested rows' twins with a class the real data never has
    extra = (X.copy(), np.array(["synthetic"] * 50))
    with_extra = study.cross_validate(X, y, groups, _nearest_neighbour, extra)
    assert with_extra["accuracy"] == 0.0  # 1-NN now answers "synthetic" for every real structure
    assert with_extra["log_loss"] == pytest.approx(-np.log(1e-9))  # the true class got probability 0
    assert study.cross_validate(X, y, groups, _nearest_neighbour)["accuracy"] < 1.0


@pytest.fixture(scope="module")
def patterns(cod_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("patterns")
    npz, _ = build_patterns([cod_dir / f"{i}.cif" for i in SMALL_CIFS], out)
    return load_patterns(npz)


def _first_lit_column(image: np.ndarray) -> int:
    """Leftmost column lit above the bottom row (the zero line runs along the whole bottom row)."""
    return int(np.flatnonzero(image[:-1, :, 0].max(axis=0) > 128)[0])


@pytest.mark.needs_shared("cod")
def test_d1_over_d_puts_the_first_line_at_one(patterns) -> None:
    images = study.render_all(patterns, list(range(len(patterns.ids))), "d1_over_d", 1.5406)
    expected = round((1.0 - 0.9) / (4.0 - 0.9) * 224)  # x = 1 on the 0.9-4.0 axis
    for image in images:
        assert abs(_first_lit_column(image) - expected) <= 2


@pytest.mark.needs_shared("cod")
def test_renderings_differ_and_peak_features_are_scale_free(patterns) -> None:
    keep = list(range(len(patterns.ids)))
    linear = study.render_all(patterns, keep, "2theta", 1.5406)
    root = study.render_all(patterns, keep, "2theta_sqrt", 1.5406)
    assert linear.shape == root.shape == (len(keep), 224, 224, 3)
    assert (root > 128).sum() > (linear > 128).sum()  # weak lines rise above the noise of the axis
    feats = study.peak_features(patterns, keep)
    assert feats.shape == (len(keep), 40 + 44 + 1)
    assert np.allclose(feats[:, 0], 1.0)  # each structure's first ratio is its first line over itself
    assert np.all(np.diff(feats[:, :5], axis=1) >= 0)
