"""The seven crystal systems, in the order the models' outputs use (lowest symmetry first)."""

from __future__ import annotations

CRYSTAL_SYSTEMS = (
    "triclinic",
    "monoclinic",
    "orthorhombic",
    "tetragonal",
    "trigonal",
    "hexagonal",
    "cubic",
)
