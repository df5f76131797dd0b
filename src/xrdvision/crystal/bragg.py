"""Bragg's law and the X-ray wavelengths the project uses: the one home of ``d = lambda / (2 sin theta)``.

Simulation, K-alpha2 companions, lattice-strain augmentation and the conversion of a measured scan to the
training wavelength all go through these functions, so the three ways of writing the same law cannot
drift apart. Angles are 2-theta in degrees, d-spacings and wavelengths in Angstrom.
"""

from __future__ import annotations

import numpy as np

CU_KA1 = 1.5406  # Angstrom, the wavelength the model is trained on
CU_KA2 = 1.54439  # Angstrom; K-alpha2 has half the intensity of K-alpha1
CU_KA_AVERAGE = 1.5418  # the weighted K-alpha1/K-alpha2 mean many instruments write in their headers


def d_spacing(two_theta: np.ndarray, wavelength: float = CU_KA1) -> np.ndarray:
    """d (Angstrom) of reflections seen at ``two_theta`` (degrees) with ``wavelength``."""
    return wavelength / (2 * np.sin(np.radians(np.asarray(two_theta)) / 2))


def two_theta_from_sin(sin_theta: np.ndarray) -> np.ndarray:
    """2-theta (degrees) from sin(theta); NaN where ``sin theta > 1`` (the reflection cannot occur)."""
    s = np.asarray(sin_theta, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(s <= 1, 2 * np.degrees(np.arcsin(np.minimum(s, 1.0))), np.nan)


def two_theta(d: np.ndarray, wavelength: float = CU_KA1) -> np.ndarray:
    """2-theta (degrees) of d-spacings ``d`` (Angstrom); NaN where ``lambda / 2d > 1`` (no reflection)."""
    return two_theta_from_sin(wavelength / (2 * np.asarray(d, dtype=np.float64)))


def convert_wavelength(two_theta_deg: np.ndarray, source: float, target: float) -> np.ndarray:
    """2-theta at ``target`` of the same d-spacings measured at ``source``; NaN where impossible there."""
    tt = np.asarray(two_theta_deg, dtype=np.float64)
    if source == target:
        return tt.copy()
    return two_theta_from_sin(np.sin(np.radians(tt) / 2) * (target / source))
