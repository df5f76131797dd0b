"""Augmentation on the 1-D peak list, before profiling and rendering (the seed's recipe).

Everything that varies is physical, so an augmented copy is a pattern the same compound could really
give on another instrument or sample: peak areas (texture, counting statistics), peak positions
(a sample-height / zero offset that shifts every peak by the same angle, and an isotropic lattice strain
that scales every d-spacing, so high-angle peaks move more, as Bragg's law says), step and peak width
(instrument resolution), a smooth background (air scatter, fluorescence) and noise. Perturbing the
peak list rather than the image keeps the class-defining information (the d-spacing ratios) intact.

Every random choice comes from the ``rng`` passed in; :func:`copy_rng` builds it from
``(params.seed, cod_id, copy)`` so each copy is reproducible on its own, in any order and any process.
"""

from __future__ import annotations

import zlib

import numpy as np

from xrdvision.config import AugmentParams, SimulateParams
from xrdvision.crystal import bragg
from xrdvision.crystal.bragg import CU_KA1
from xrdvision.crystal.profile import grid, profile_pattern


def id_key(cod_id: str | int) -> int:
    """A stable non-negative integer for a structure id: the COD number itself, else a CRC32.

    User CIFs may be named anything (``quartz_a``); Python's ``hash()`` is salted per process, so a
    stable checksum is used to keep the seed of a copy the same across runs and machines.
    """
    text = str(cod_id).strip()
    if text.isdigit():
        return int(text)
    return zlib.crc32(text.encode("utf-8"))


def copy_rng(seed: int, cod_id: str | int, copy: int) -> np.random.Generator:
    """The generator for augmented copy ``copy`` of structure ``cod_id`` under ``params.seed``."""
    return np.random.default_rng([int(seed), id_key(cod_id), int(copy)])


def augment_peaks(
    two_theta: np.ndarray,
    intensity: np.ndarray,
    d: np.ndarray,
    rng: np.random.Generator,
    p: AugmentParams,
    wavelength: float = CU_KA1,
) -> tuple[np.ndarray, np.ndarray]:
    """Perturb one peak list: strain, then zero offset, then area jitter. Returns ``(two_theta, intensity)``.

    - strain ``e ~ U(-strain, strain)``: ``d -> d * (1 + e)`` and 2-theta recomputed with Bragg's law at
      ``wavelength`` (peaks pushed past 180 degrees are dropped, which cannot happen below ~170);
    - zero offset ``z ~ U(-zero_shift, zero_shift)`` added to every 2-theta;
    - area ``I -> I * exp(N(0, intensity_jitter))`` per peak (log-normal: areas stay positive and the
      jitter is relative), then rescaled to a maximum of 1 as stored in ``patterns.npz``.

    The draws come in a fixed order (e, z, then one per peak) so a copy does not change when an
    unrelated setting does. With all three amplitudes 0 the peaks come back unchanged. When ``d`` is
    missing (empty) it is recomputed from ``two_theta``.
    """
    tt = np.asarray(two_theta, dtype=np.float64)
    amp = np.asarray(intensity, dtype=np.float64)
    dd = np.asarray(d, dtype=np.float64)
    if dd.size != tt.size:
        dd = bragg.d_spacing(tt, wavelength)
    # Unit draws scaled afterwards: an amplitude of 0 gives exactly no change, and the stream of
    # draws is the same whatever the amplitudes are.
    e = float(rng.uniform(-1.0, 1.0)) * p.strain
    z = float(rng.uniform(-1.0, 1.0)) * p.zero_shift
    jitter = rng.standard_normal(tt.size) * p.intensity_jitter
    if e != 0.0:
        tt = bragg.two_theta(dd * (1 + e), wavelength)
    keep = np.isfinite(tt)
    tt = tt[keep] + z
    amp = amp[keep] * np.exp(jitter[keep])
    peak = amp.max() if amp.size else 0.0
    if peak > 0:
        amp = amp / peak
    return tt, amp


def smooth_background(x01: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A lab-like background on ``x01`` (the grid mapped to [0, 1]): decay from low angle plus a floor.

    ``a * ((1 - f) * exp(-x / tau) + f)`` with ``a ~ U(0, amplitude)``, ``tau ~ U(0.05, 0.5)`` and
    ``f ~ U(0, 0.5)``: air scatter and sample-holder scatter fall off from low angle, fluorescence
    adds a flat floor. Always draws three numbers, so the noise after it stays aligned across settings.
    """
    a, tau, f = rng.uniform(0, 1), rng.uniform(0.05, 0.5), rng.uniform(0, 0.5)
    return amplitude * a * ((1 - f) * np.exp(-x01 / tau) + f)


def augment_pattern(
    two_theta: np.ndarray,
    intensity: np.ndarray,
    d: np.ndarray,
    rng: np.random.Generator,
    p: AugmentParams,
    sim: SimulateParams,
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented pattern: :func:`augment_peaks`, a random step and FWHM, profile, background, noise.

    The step is drawn from ``p.steps`` and the FWHM from ``U(fwhm_range)``; the peaks are profiled with
    :func:`xrdvision.crystal.profile.profile_pattern` on the simulate 2-theta range (K-alpha2 as
    ``sim.kalpha2``, Lorentzian fraction ``sim.eta``), exactly as the simulated pattern was. Then
    ``p.background`` (a smooth curve, see :func:`smooth_background`) and Gaussian noise of sd
    ``p.noise`` are added, the result clipped at 0 and rescaled to a maximum of 1.
    Returns ``(grid, intensity)`` as float32.
    """
    tt, amp = augment_peaks(two_theta, intensity, d, rng, p, sim.wavelength)
    step = float(p.steps[int(rng.integers(len(p.steps)))])
    fwhm = float(rng.uniform(p.fwhm_range[0], p.fwhm_range[1]))
    g = grid(sim.two_theta_min, sim.two_theta_max, step)
    y = profile_pattern(tt, amp, g, fwhm, sim.eta, kalpha2=sim.kalpha2, wavelength=sim.wavelength)
    y = y.astype(np.float64)
    x01 = (g.astype(np.float64) - sim.two_theta_min) / (sim.two_theta_max - sim.two_theta_min)
    bg = smooth_background(x01, rng, p.background)
    if p.background > 0:
        y = y + bg
    if p.noise > 0:
        y = y + rng.normal(0.0, p.noise, y.size)
    y = np.clip(y, 0.0, None)
    peak = y.max() if y.size else 0.0
    if peak > 0:
        y = y / peak
    return g, y.astype(np.float32)


def augment_image(rgb: np.ndarray, rng: np.random.Generator, contrast: float, rotation: float) -> np.ndarray:
    """The seed's image-level augmentation of a rendered copy: a contrast change (the line's brightness
    times ``U(1 - contrast, 1 + contrast)``, clipped to 0-255) and a rotation by ``U(-rotation,
    rotation)`` degrees about the centre (black fill). A rotation tilts the 2-theta axis, mixing line
    positions with heights; it is off by default (README: measured). ``contrast = rotation = 0`` returns
    the image unchanged."""
    out = np.asarray(rgb)
    if contrast > 0:
        factor = float(rng.uniform(1.0 - contrast, 1.0 + contrast))
        out = np.clip(out.astype(np.float32) * factor, 0, 255).astype(np.uint8)
    if rotation > 0:
        from PIL import Image

        angle = float(rng.uniform(-rotation, rotation))
        out = np.asarray(Image.fromarray(out).rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0))
    return out
