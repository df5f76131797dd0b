"""Temperature scaling, prior correction and the expected calibration error."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from xrdvision.models.calibration import correct_prior, expected_calibration_error, fit_temperature


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
