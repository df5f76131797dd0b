"""PyXtal's random crystals: the peer the ``generate`` stage's generator is benchmarked against.

Why it is kept: the ``synthesize`` stage (random PyXtal crystals of the training split's space groups,
rendered as extra training images) is gone, replaced by the ``generate`` stage, because the README's study
found its 2 800 crystals added nothing to the image model, while crystals drawn from statistics of real
ones train the peak-list peer to 68.6 % on real COD without any real structure (58.2 % on real data).
``benchmarks/bench_generate.py`` still times that old route (this draw -> CIF -> the per-CIF simulator)
on the same space groups, so the draw lives on here, unchanged: for each element one or two Wyckoff
multiplicities of the group, at most ``max_atoms`` atoms, accepted only if PyXtal finds it compatible.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np


@functools.cache
def _group(space_group: int) -> Any:
    """PyXtal's Group (its Wyckoff table); built once per group, as it takes ~10 ms and a crystal may
    need several draws."""
    from pyxtal.symmetry import Group

    return Group(space_group)


def draw_stoichiometry(
    space_group: int, n_species: int, max_atoms: int, rng: np.random.Generator
) -> list[int] | None:
    """Atoms per element in the conventional cell: each a sum of 1-2 Wyckoff multiplicities of the
    group, in total at most ``max_atoms``, and compatible with the group (PyXtal's check)."""
    group = _group(space_group)
    mults = sorted({int(w.multiplicity) for w in group.Wyckoff_positions if w.multiplicity <= max_atoms})
    if not mults or mults[0] * n_species > max_atoms:
        return None
    for _ in range(20):
        counts = [int(sum(rng.choice(mults, size=rng.integers(1, 3)))) for _ in range(n_species)]
        if sum(counts) <= max_atoms and group.check_compatible(counts)[0]:
            return counts
    return None


def random_crystal(
    space_group: int, elements: tuple[str, ...], max_atoms: int, rng: np.random.Generator
) -> Any | None:
    """A random pymatgen Structure of ``space_group`` with these elements, or None if none was found."""
    from pyxtal import pyxtal

    counts = draw_stoichiometry(space_group, len(elements), max_atoms, rng)
    if counts is None:
        return None
    crystal = pyxtal()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            crystal.from_random(3, space_group, list(elements), counts, random_state=rng)
        except Exception:  # PyXtal signals "no arrangement found" in several ways; the caller redraws
            return None
    if not crystal.valid:
        return None
    return crystal.to_pymatgen()
