"""X-ray atomic form factors as plain arrays: xrayutilities' tables, read once per wavelength.

Why not call ``xrayutilities.materials.Atom.f(q, en)`` per structure, as the per-CIF simulator does?
Each call goes through a Python cache keyed on an md5 of the q array and an HDF5 lookup: fine for one
CIF, a bottleneck for 10^5 structures, and it needs xrayutilities objects on the hot path. The physics
is small: ``f(q, E) = f0(q) + f'(E) + i f''(E)`` with ``f0 = c + sum_i a_i exp(-b_i (q / 4 pi)^2)``
(4 or 5 Gaussians: the International Tables or Waasmaier-Kirfel coefficients) and the anomalous terms
f', f'' interpolated in energy. :func:`form_factor_table` reads every atom and ion xrayutilities knows
from its own database once, at the X-ray energy of the wavelength, into arrays; :func:`f0` then
evaluates the Gaussians for many species and q values in one numpy expression. Same numbers as
xrayutilities (same database, same formula, same energy conversion), no xrayutilities on the hot path.

Species names follow pymatgen's ``str(species)``: ``"Fe"``, ``"Fe3+"``, ``"O2-"``. An ion maps to
xrayutilities' ion form factor where it has one (``Fe3+`` -> ``Fe3p``), else to the neutral element,
as xrayutilities' own CIF reader and ``xrdvision.data.simulate.xu_atom`` do.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
from dataclasses import dataclass

import numpy as np

from xrdvision.crystal.bragg import CU_KA1

_SPECIES = re.compile(r"([A-Z][a-z]?)(?:(\d*(?:\.\d+)?)([+-]))?")
_ELEMENT = re.compile(r"[A-Z][a-z]?")
_ISOTOPES = {"D": "H", "T": "H"}  # X-rays see electrons: deuterium scatters as hydrogen
_N_GAUSS = 5  # Waasmaier-Kirfel has 5 Gaussians, the International Tables 4 (the 5th a = 0)


@dataclass(frozen=True)
class FormFactorTable:
    """Every atom/ion with a complete form factor, at one X-ray energy.

    ``names`` are xrayutilities' names (``Fe``, ``Fe3p``, ``O2m``); row ``i`` of ``c`` (M,), ``a``
    and ``b`` (M, 5) holds its f0 coefficients, ``f1``/``f2`` (M,) its f' and f'' at ``energy_ev``.
    """

    names: tuple[str, ...]
    atomic_number: np.ndarray  # (M,) int
    c: np.ndarray
    a: np.ndarray
    b: np.ndarray
    f1: np.ndarray
    f2: np.ndarray
    energy_ev: float
    index: dict[str, int]  # name -> row
    by_number: dict[int, int]  # atomic number -> row of the neutral element

    def lookup(self, species: str | int) -> int:
        """Row of a species (``"Fe3+"``, ``"O"``, ``26``); :class:`KeyError` naming it if unknown."""
        if isinstance(species, (int, np.integer)):
            row = self.by_number.get(int(species))
            if row is None:
                raise KeyError(f"no form factor for atomic number {species}")
            return row
        text = str(species).strip()
        match = _SPECIES.fullmatch(text)
        if match is None:
            raise KeyError(f"unknown element {text!r}")
        symbol, charge, sign = match.groups()
        symbol = _ISOTOPES.get(symbol, symbol)
        if sign and "." not in charge and int(charge or 1) > 0:  # "Na+" is Na1+
            ion = self.index.get(f"{symbol}{int(charge or 1)}{'p' if sign == '+' else 'm'}")
            if ion is not None:
                return ion
        row = self.index.get(symbol)
        if row is None:
            raise KeyError(f"unknown element {text!r}")
        return row


def energy_ev(wavelength: float) -> float:
    """X-ray energy (eV) of a wavelength (Angstrom), with the CODATA constants xrayutilities uses."""
    from scipy import constants as c

    return c.h * c.speed_of_light / (c.e * wavelength) * 1e10


@functools.lru_cache(maxsize=4)
def form_factor_table(wavelength: float = CU_KA1) -> FormFactorTable:
    """The table at ``wavelength`` (Angstrom), read from xrayutilities' database on first use.

    Atoms whose f0 or f'/f'' is missing at this energy are left out (xrayutilities would give NaN or
    fail for them), so looking them up fails with "unknown element" instead of a NaN pattern.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # the database prints for names it lacks
        from xrayutilities.materials import elements
        from xrayutilities.materials.atom import Atom, _db

        en = energy_ev(wavelength)
        names, numbers, cs, gauss_a, gauss_b, f1s, f2s = [], [], [], [], [], [], []
        for name in sorted(dir(elements)):
            atom = getattr(elements, name)
            if not isinstance(atom, Atom) or atom.basename == "Dummy":
                continue
            try:
                _db.SetMaterial(atom.basename)
                params = np.asarray(_db.f0_params[atom.ostate or "default"][()], dtype=np.float64)
                f1, f2 = float(_db.GetF1(en)), float(_db.GetF2(en))
            except (KeyError, TypeError, ValueError):
                continue
            if not (np.isfinite(params).all() and np.isfinite([f1, f2]).all()) or params.size % 2 == 0:
                continue
            pairs = params[1:].reshape(-1, 2)
            a = np.zeros(_N_GAUSS)
            b = np.zeros(_N_GAUSS)
            a[: len(pairs)], b[: len(pairs)] = pairs[:, 0], pairs[:, 1]
            names.append(name)
            numbers.append(atom.num)
            cs.append(params[0])
            gauss_a.append(a)
            gauss_b.append(b)
            f1s.append(f1)
            f2s.append(f2)
    return FormFactorTable(
        names=tuple(names),
        atomic_number=np.asarray(numbers, dtype=np.int64),
        c=np.asarray(cs),
        a=np.asarray(gauss_a),
        b=np.asarray(gauss_b),
        f1=np.asarray(f1s),
        f2=np.asarray(f2s),
        energy_ev=en,
        index={n: i for i, n in enumerate(names)},
        by_number={
            z: i for i, (n, z) in enumerate(zip(names, numbers, strict=True)) if _ELEMENT.fullmatch(n)
        },
    )


def f0(table: FormFactorTable, rows: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Non-resonant form factors f0 (R, S) of the species ``rows`` (S,) at ``s = 1/d`` (R,), 1/A.

    xrayutilities writes ``exp(-b (q / 4 pi)^2)`` with ``q = 2 pi s``, i.e. ``exp(-b (s / 2)^2)``.
    The Gaussians are evaluated in single precision (relative error ~1e-7, four times the speed of
    double: this was the largest single cost of a small structure's peak list) and summed in double.
    """
    k2 = (0.25 * np.asarray(s, dtype=np.float64) ** 2).astype(np.float32)
    terms = np.exp(np.multiply.outer(-k2, table.b[rows].astype(np.float32).ravel()))
    terms *= table.a[rows].astype(np.float32).ravel()
    return table.c[rows] + terms.reshape(len(k2), len(rows), -1).sum(axis=2, dtype=np.float64)
