"""Settings of the realistic synthetic-crystal generator (``generate:``): how many crystals, drawn
from which space-group prior, and how the fitted statistics pool sparse space groups.

Why a section of its own: the generator is a data source beside COD and the Materials Project, with its
own stage (``generate``); its size is the knob of the learning curve (``dvc exp run -S
generate.n_crystals=100000``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from xrdvision.config.base import Int, _section


@_section
class GenerateParams:
    """The synthetic crystals (``split.train_sources`` with ``synth`` uses them for training)."""

    n_crystals: Int = Field(1000, ge=0, le=10_000_000)  # 0 = off
    prior: Literal["uniform", "train"] = "train"  # space-group prior: uniform over 230, or training frequencies
    min_structures: Int = Field(20, ge=1)  # fewer training structures at a level: pool one level up
    max_atoms: Int = Field(200, ge=1, le=2000)  # atoms in the conventional cell, at most
    shard_size: Int = Field(2500, ge=10)  # crystals per output shard: the unit of resume and of a Dask task
    check_sample: Int = Field(1000, ge=0)  # crystals checked with spglib for the space-group mismatch rate
