"""Settings of the realistic synthetic-crystal generator (``generate:``): how many crystals, drawn
from which space-group prior, fitted on which training structures, and how sparse space groups pool.

Why a section of its own: the generator is a data source beside COD and the Materials Project, with its
own stage (``generate``); its size is the knob of the learning curve (``dvc exp run -S
generate.n_crystals=100000``).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from xrdvision.config.base import Int, Num, Str, _rule, _section

_SCHEDULER = re.compile(r"(tcp|tls)://[^\s/:]+:\d{1,5}")


@_section
class GenerateParams:
    """The synthetic crystals (``split.train_sources`` with ``synth`` uses them for training)."""

    n_crystals: Int = Field(1000, ge=0, le=10_000_000)  # 0 = off
    prior: Literal["uniform", "train"] = "train"  # space groups: uniform over 230, or training frequencies
    min_structures: Int = Field(20, ge=1)  # fewer training structures at a level: pool one level up
    max_atoms: Int = Field(200, ge=1, le=2000)  # atoms in the conventional cell, at most
    min_distance: Num = Field(1.0, ge=0, le=3)  # A between atoms (minimum image); 0 = no check
    mp_structures: Int = Field(0, ge=0)  # Materials Project structures the fit adds (seeded sample); 0 = none
    shard_size: Int = Field(500, ge=10, le=100_000)  # crystals per shard: the unit of resume and of a task
    scheduler: Str = "local"  # local (a process pool) or a Dask scheduler address tcp://host:8786
    workers: Int = Field(2, ge=1)  # processes when scheduler is local

    @model_validator(mode="after")
    def _rules(self) -> GenerateParams:
        ok = self.scheduler == "local" or _SCHEDULER.fullmatch(self.scheduler) is not None
        _rule(ok, "scheduler", f"{self.scheduler!r} is neither local nor a Dask address like tcp://host:8786")
        return self
