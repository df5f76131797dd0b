"""The generator's faster placement (data/generator_sample.py): ``Sampler._place`` measures from one atom
per orbit and stops a clashing fixed position early, and must make exactly the one-orbit-at-a-time
loop's decisions and random draws (``place_reference``); a pool worker given the Wyckoff tables with its
task writes the same shard bytes as one that builds them.

Inputs are real: statistics fitted on the embedded COD CIFs, sites and cells drawn by the sampler."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from test_generate import _stats
from xrdvision.config import parse_params
from xrdvision.data import generate
from xrdvision.data.generate import plan_tasks
from xrdvision.data.generator_sample import Sampler, place_reference

# triclinic, monoclinic, orthorhombic, tetragonal, trigonal (hexagonal axes), hexagonal, cubic P/F/I
GROUPS = (2, 14, 62, 139, 148, 166, 194, 221, 225, 229)


@pytest.fixture(scope="module")
def stats(embedded_cifs: dict[str, Path]) -> dict[str, Any]:
    return _stats(embedded_cifs)  # the statistics test_generate fits: 12 embedded COD structures


def _inputs(sampler: Sampler, sg: int, rng: np.random.Generator, volume_factor: float) -> tuple[Any, ...]:
    """A real draw's sites and a cell of ``volume_factor`` A^3 per atom (small: crowded, many clashes)."""
    t = sampler._stats_of(sg)[2]
    n = int(rng.integers(1, 12))
    sites = sorted(sampler._positions(n, sampler.position_prob(sg), t, rng), key=lambda j: t.dof[j])
    cell = sampler._cell(t.crystal_system, volume_factor * float(t.multiplicity[sites].sum()), rng)
    return t, sites, cell


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


@pytest.mark.parametrize("min_distance", [1.0, 1.8])
def test_place_makes_the_loops_decisions_and_draws(stats: dict[str, Any], min_distance: float) -> None:
    sampler = Sampler(stats, max_atoms=200, min_distance=min_distance)
    rng = np.random.default_rng(11)
    placed = failed = 0
    for sg in GROUPS:
        for volume_factor in (4.0, 9.0, 18.0):
            t, sites, cell = _inputs(sampler, sg, rng, volume_factor)
            seed = int(rng.integers(1 << 31))
            fast, slow = np.random.default_rng(seed), np.random.default_rng(seed)
            got = sampler._place(t, sites, cell, fast)
            want = place_reference(t, sites, cell, slow, min_distance)
            assert _same(got, want), (sg, sites, cell)
            assert fast.random() == slow.random(), "the same number of draws"
            placed += want is not None
            failed += want is None
    assert placed and failed  # both outcomes were compared


def test_a_tiny_cell_takes_the_reference_path(stats: dict[str, Any]) -> None:
    """Under twice min_distance across the cell the rounded difference need not be the nearest image:
    every atom is measured then, as before."""
    sampler = Sampler(stats, max_atoms=200, min_distance=1.0)
    t = sampler.tables[221]
    cell = [1.5, 1.5, 1.5, 90.0, 90.0, 90.0]
    sites = [t.index("a"), t.index("b"), 0]  # the general position cannot fit: 20 draws, then None
    fast, slow = np.random.default_rng(5), np.random.default_rng(5)
    assert _same(sampler._place(t, sites, cell, fast), place_reference(t, sites, cell, slow, 1.0))
    assert fast.random() == slow.random()


def test_a_cell_without_the_groups_symmetry_takes_the_reference_path(stats: dict[str, Any]) -> None:
    """A hexagonal group in a cell with gamma 90: its operations are no isometries, so one atom per
    orbit would not speak for the others; every atom is measured."""
    sampler = Sampler(stats, max_atoms=200, min_distance=1.0)
    t = sampler.tables[194]
    rng = np.random.default_rng(2)
    sites, cell = [t.index("c"), 0, 0], [4.0, 4.0, 6.5, 90.0, 90.0, 90.0]
    for _ in range(10):
        seed = int(rng.integers(1 << 31))
        fast, slow = np.random.default_rng(seed), np.random.default_rng(seed)
        assert _same(sampler._place(t, sites, cell, fast), place_reference(t, sites, cell, slow, 1.0))
        assert fast.random() == slow.random()


def test_a_worker_given_the_tables_writes_the_same_shard(stats: dict[str, Any]) -> None:
    p = parse_params({"generate": {"workers": 1, "shard_size": 15, "n_crystals": 15}})
    task = plan_tasks(p, json.dumps(stats))[0]
    assert task.tables is not None and task.tables[225].number == 225
    assert generate.build_shard(task)[0] == generate.build_shard(replace(task, tables=None))[0]
