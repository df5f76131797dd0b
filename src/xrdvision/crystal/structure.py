"""A pymatgen structure as the arrays the diffraction physics needs, and xrayutilities' atoms for it.

Why a module of its own: the structure comes from pymatgen's CIF reader (the one the labels use), but
the form factors come from xrayutilities, and joining the two is where the quirks sit. xrayutilities'
own CIF reader fails on ~10 % of COD files and spends most of its time identifying Wyckoff positions
(see ../shared/FINDINGS.md), so it is not used; instead each pymatgen species is mapped to the
xrayutilities atom its reader would have chosen (the ion where xrayutilities has its form factor, else
the neutral element), dummy sites are dropped, and partial occupancies become weights per atom type.
This module also owns the one piece of process state xrayutilities has: its HDF5 form-factor database.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import numpy as np


def xu() -> Any:
    """xrayutilities, imported on first use (it opens its form-factor database at import)."""
    import xrayutilities

    return xrayutilities


def xu_atom(species: Any) -> Any:
    """The xrayutilities atom for a pymatgen species: the ion (``Fe3p``) when xrayutilities has its
    form factor, else the neutral element, as xrayutilities' own CIF reader does (but silently)."""
    elements = xu().materials.elements
    symbol = getattr(species, "symbol", str(species))
    oxi = getattr(species, "oxi_state", None)
    if oxi and float(oxi).is_integer():
        name = f"{symbol}{abs(int(oxi))}{'p' if oxi > 0 else 'm'}"
        if hasattr(elements, name):
            return getattr(elements, name)
    if re.fullmatch(r"[A-Z][a-z]?", symbol) and hasattr(elements, symbol):
        return getattr(elements, symbol)
    raise ValueError(f"xrayutilities has no form factor for {species}")


def site_table(structure: Any) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Fractional coordinates (N, 3), occupancy per site and atom type (N, S), the S xrayutilities atoms.

    Dummy sites (pymatgen ``DummySpecies``: the ring centroids "M" or unassigned "X" some CIFs list)
    are left out: they are not atoms, and guessing an element for them would invent scattering.
    Raises ``ValueError`` for a species xrayutilities has no form factor for, or only dummy sites.
    """
    atoms: list[Any] = []
    index: dict[str, int] = {}
    rows: list[tuple[int, int, float]] = []
    for i, site in enumerate(structure):
        for species, occ in site.species.items():
            if type(species).__name__ == "DummySpecies":
                continue  # a CIF's dummy atom (ring centroid "M", unknown "X"): nothing to scatter
            atom = xu_atom(species)
            col = index.setdefault(atom.name, len(atoms))
            if col == len(atoms):
                atoms.append(atom)
            rows.append((i, col, float(occ)))
    weights = np.zeros((len(structure), len(atoms)), dtype=np.float32)
    for i, col, occ in rows:
        weights[i, col] += occ
    if not atoms:
        raise ValueError("no scattering atoms (only dummy sites)")
    return np.asarray(structure.frac_coords, dtype=np.float64), weights, atoms


def reopen_form_factor_db() -> None:
    """Give this process its own handle on xrayutilities' HDF5 database (a forked worker inherits the
    parent's open file, and HDF5 handles are not meant to be shared across processes)."""
    db = xu().materials.atom._db
    with contextlib.suppress(Exception):
        db.Close()
    db.matname = None
    db.Open()
