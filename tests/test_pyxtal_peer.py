"""PyXtal's random crystals, kept as the peer that benchmarks/bench_generate.py times the generator against
(the synthesize stage that used them is gone): the crystal has the drawn symmetry or a supergroup of it."""

from __future__ import annotations

import numpy as np
import pytest

from xrdvision.crystal.labels import analyse_symmetry
from xrdvision.crystal.systems import CRYSTAL_SYSTEMS as SYSTEMS
from xrdvision.data.mp_source import crystal_system_of
from xrdvision.data.pyxtal_peer import draw_stoichiometry, random_crystal


@pytest.mark.parametrize("sg", [2, 14, 62, 139, 166, 194, 225])
def test_random_crystal_has_the_drawn_symmetry(sg):
    rng = np.random.default_rng(sg)
    s = None
    for _ in range(20):
        s = random_crystal(sg, ("Mg", "Si", "O"), 40, rng)
        if s is not None:
            break
    assert s is not None
    assert 1 <= len(s) <= 40 and {str(e) for e in s.composition.elements} <= {"Mg", "Si", "O"}
    found = analyse_symmetry(s).get_space_group_number()
    # spglib may find a supergroup of a random arrangement (same or higher system), never a lower one
    assert SYSTEMS.index(crystal_system_of(found)) >= SYSTEMS.index(crystal_system_of(sg))
    counts = draw_stoichiometry(sg, 2, 40, np.random.default_rng(0))
    assert counts is not None and sum(counts) <= 40
