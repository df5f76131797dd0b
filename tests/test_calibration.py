"""Temperature scaling, prior correction and the expected calibration error."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from xrdvision.errors import XrdVisionError
from xrdvision.models.calibration import (
    class_prior,
    correct_prior,
    coverage_curve,
    expected_calibration_error,
    fit_temperature,
    prior_from_spec,
)


def test_temperature_recovers_the_scale_of_overconfident_logits():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 1.5, (4000, 7))
    y = np.array([rng.choice(7, p=p) for p in softmax(true_logits, axis=1)])
    t = fit_temperature(3.0 * true_logits, y)  # a model three times too sure of itself
    assert t == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(softmax(3.0 * true_logits, axis=1), y)
    after = expected_calibration_error(softmax(3.0 * true_logits / t, axis=1), y)
    assert after < 0.03 < before


def test_ece_of_a_perfect_and_of_a_wrong_confident_classifier():
    y = np.array([0, 1, 2, 0])
    assert expected_calibration_error(np.eye(3)[y], y) == 0.0
    assert expected_calibration_error(np.eye(3)[(y + 1) % 3], y) == 1.0
    with pytest.raises(ValueError, match="need"):
        expected_calibration_error(np.ones(3), y)


def test_prior_correction_moves_probability_to_the_new_prior():
    probs = np.array([[0.5, 0.5], [0.9, 0.1]])
    out = correct_prior(probs, np.array([0.5, 0.5]), np.array([0.2, 0.8]))
    np.testing.assert_allclose(out[0], [0.2, 0.8])
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    same = correct_prior(probs, np.array([0.3, 0.7]), np.array([0.3, 0.7]))
    np.testing.assert_allclose(same, probs)


def test_prior_from_spec_words_and_file(tmp_path):
    classes = ["cubic", "hexagonal", "monoclinic"]
    train = class_prior(np.array([0, 0, 0, 2]), 3)
    assert train == [0.75, 0.0, 0.25]
    assert prior_from_spec("train", classes, train, "measured.prior") is None
    np.testing.assert_allclose(prior_from_spec("uniform", classes, train, "k"), [0.5, 0, 0.5])
    f = tmp_path / "p.csv"
    f.write_text("class,weight\nmonoclinic,3\ncubic,1\n")
    np.testing.assert_allclose(prior_from_spec(str(f), classes, train, "k"), [0.25, 0, 0.75])
    f.write_text("class,weight\nmonoclinic,-1\n")
    with pytest.raises(XrdVisionError, match="weight of 'monoclinic' must be a number >= 0"):
        prior_from_spec(str(f), classes, train, "k")
    f.write_text("class,weight\nhexagonal,1\n")  # only a class training never saw
    with pytest.raises(XrdVisionError, match="no positive weight on a class the model was trained on"):
        prior_from_spec(str(f), classes, train, "k")
    with pytest.raises(XrdVisionError, match=r"missing\.csv"):
        prior_from_spec(str(tmp_path / "missing.csv"), classes, train, "k")
    with pytest.raises(XrdVisionError, match="needs the model's training class frequencies"):
        prior_from_spec("uniform", classes, None, "measured.prior")


def test_uniform_prior_undoes_the_training_frequencies():
    """A model that learnt only the class frequencies gives, under a uniform prior, uniform answers."""
    train = np.array([0.6, 0.3, 0.1])
    probs = np.tile(train, (4, 1))
    out = correct_prior(probs, train, np.full(3, 1 / 3))
    np.testing.assert_allclose(out, np.full((4, 3), 1 / 3))


def test_coverage_curve_trades_answers_for_accuracy():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.55, 0.45], [0.2, 0.8]])
    y = np.array([0, 1, 0, 1])
    curve = {round(r["threshold"], 2): r for r in coverage_curve(probs, y)}
    assert curve[0.0] == {"threshold": 0.0, "coverage": 1.0, "accuracy": 0.75}
    assert curve[0.6]["coverage"] == 0.75 and curve[0.6]["accuracy"] == pytest.approx(2 / 3)
    assert curve[0.85] == {"threshold": 0.85, "coverage": 0.25, "accuracy": 1.0}
    assert np.isnan(curve[0.95]["accuracy"]) and curve[0.95]["coverage"] == 0.0
