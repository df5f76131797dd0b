"""The peak lists a 1-D model trains and is scored on, from every source, as one table.

Why one table: training draws batches from COD's training split, the Materials Project shards
(``data/peaklists``) and generated crystals (``data/generated``) alike, and scoring renders COD's
validation and test structures the same way, so all of them are held as offset-indexed arrays with their
labels and compound (reduced formula), whatever file they came from.

COD structures are simulated here with the batch simulator (:mod:`xrdvision.data.cod_set`: the same
physics as the Materials Project and generated shards, with each line's plane normal for texture) and
kept in ``data/cache`` keyed by the CIFs' bytes and the settings: the CIFs are read once (about a minute
for 852 with pymatgen), not at every training run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xrdvision.config import Params
from xrdvision.crystal.powder import PowderSettings
from xrdvision.data.cod_set import CodSet, build_cod_set
from xrdvision.data.measurement import Lines, gather
from xrdvision.data.peaklists import powder_settings as peaklists_settings
from xrdvision.errors import InputError
from xrdvision.formats.peaklists import PeakListShard, read_shards
from xrdvision.formats.tables import read_split, read_table

log = logging.getLogger(__name__)

CACHE_DIR = Path("data/cache/cod_peaks")
SHARD_SOURCES = {"mp": "data/peaklists", "synth": "data/generated"}


@dataclass
class PeakTable:
    """Labelled peak lists; lines of structure ``i`` are ``offsets[i]:offsets[i + 1]``."""

    ids: np.ndarray  # str
    source: np.ndarray  # str: cod, mp, synth
    crystal_system: np.ndarray  # str
    space_group: np.ndarray  # int
    reduced_formula: np.ndarray  # str
    has_c_and_h: np.ndarray  # bool (False where unknown)
    offsets: np.ndarray
    two_theta: np.ndarray  # float32, degrees (K-alpha1 at ``wavelength``)
    intensity: np.ndarray  # float32, max 1 per structure
    normal: np.ndarray  # (P, 3) float16; zeros where a source has none (no texture then)
    wavelength: float

    def __len__(self) -> int:
        return len(self.ids)

    def lines(self, idx: np.ndarray) -> Lines:
        """The lines of structures ``idx`` for :mod:`xrdvision.data.measurement`."""
        return gather(self.offsets, self.two_theta, self.intensity, self.normal, np.asarray(idx, np.int64))

    def labels(self, mode: str) -> np.ndarray:
        """Label strings for ``labels.mode``: the crystal system, or the space-group number as text."""
        return self.crystal_system if mode == "crystal_system" else self.space_group.astype(str)

    def subset(self, idx: Sequence[int] | np.ndarray) -> PeakTable:
        idx = np.asarray(idx, dtype=np.int64)
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        counts = ends - starts
        pick = np.repeat(starts, counts) + (
            np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        )
        return PeakTable(
            self.ids[idx],
            self.source[idx],
            self.crystal_system[idx],
            self.space_group[idx],
            self.reduced_formula[idx],
            self.has_c_and_h[idx],
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            self.two_theta[pick],
            self.intensity[pick],
            self.normal[pick],
            self.wavelength,
        )


def concat(tables: Sequence[PeakTable]) -> PeakTable:
    """One table of several (same wavelength)."""
    tables = [t for t in tables if len(t)]
    if not tables:
        raise InputError("training data", "no peak lists in any training source")
    waves = {round(t.wavelength, 6) for t in tables}
    if len(waves) > 1:
        raise InputError("training data", f"peak lists at different wavelengths {sorted(waves)}")
    shifts = np.cumsum([0] + [len(t.two_theta) for t in tables[:-1]])
    return PeakTable(
        *(np.concatenate([getattr(t, k) for t in tables]) for k in ("ids", "source", "crystal_system")),
        np.concatenate([t.space_group for t in tables]),
        np.concatenate([t.reduced_formula for t in tables]),
        np.concatenate([t.has_c_and_h for t in tables]),
        np.concatenate([[0]] + [t.offsets[1:] + s for t, s in zip(tables, shifts, strict=True)]).astype(
            np.int64
        ),
        np.concatenate([t.two_theta for t in tables]),
        np.concatenate([t.intensity for t in tables]),
        np.concatenate([t.normal for t in tables]),
        tables[0].wavelength,
    )


def from_cod_set(cod: CodSet, wavelength: float) -> PeakTable:
    n = len(cod)
    normal = cod.normal if cod.normal is not None else np.zeros((len(cod.two_theta), 3))
    return PeakTable(
        np.asarray(cod.ids, dtype=str),
        np.full(n, "cod"),
        np.asarray(cod.crystal_system, dtype=str),
        np.asarray(cod.space_group, dtype=np.int64),
        np.asarray(cod.reduced_formula, dtype=str),
        np.asarray(cod.has_c_and_h, dtype=bool),
        np.asarray(cod.offsets, dtype=np.int64),
        np.asarray(cod.two_theta, dtype=np.float32),
        np.asarray(cod.intensity, dtype=np.float32),
        np.asarray(normal, dtype=np.float16),
        wavelength,
    )


def powder_settings(params: Params) -> PowderSettings:
    """The peaklists stage's settings (K-alpha1 on the simulate range, plane normals), with close atoms
    summed as they are: COD CIFs, as the per-CIF simulator reads them (see :mod:`xrdvision.data.cod_set`)."""
    return dataclasses.replace(peaklists_settings(params), min_distance=0.0)


def cod_table(params: Params, manifest_path: Path = Path("data/patterns/manifest.csv")) -> PeakTable:
    """Every COD structure the simulate stage read (``status`` ok), batch-simulated (cached)."""
    rows = read_table(manifest_path, ["cod_id", "file", "status"], "manifest")
    paths = sorted(Path(r["file"]) for r in rows if r["status"].strip() == "ok")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputError(missing[0], "CIF listed in the manifest is missing: run `dvc repro ingest`")
    settings = powder_settings(params)
    key = hashlib.sha256(
        json.dumps(
            [settings.__dict__, params.labels.symprec, params.labels.angle_tolerance], default=str
        ).encode()
    )
    for p in paths:
        key.update(p.name.encode() + hashlib.sha256(p.read_bytes()).digest())
    cache = CACHE_DIR / f"{key.hexdigest()[:16]}.npz"
    if cache.is_file():
        cod = CodSet.load(cache)
    else:
        log.info("peak lists: simulating %d COD structures with the batch simulator", len(paths))
        cod = build_cod_set(paths, params.labels.symprec, params.labels.angle_tolerance, settings=settings)
        for name, reason in cod.failed.items():
            log.warning("peak lists: %s: %s", name, reason)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cod.save(cache)
    return from_cod_set(cod, params.simulate.wavelength)


def shard_table(folder: str | Path, source: str) -> PeakTable:
    """All ``<source>-*.npz`` shards of ``folder`` (missing or corrupt: one line naming the file)."""
    shards = read_shards(folder, source)
    if not shards:
        raise InputError(
            folder, f"no {source} peak-list shards: run `dvc repro` with {source} in split.train_sources"
        )
    return concat([from_shard(s, source) for s in shards])


def from_shard(s: PeakListShard, source: str) -> PeakTable:
    """One peak-list shard as a table of ``source`` (``mp``, ``synth``)."""
    normal = s.normal if s.normal is not None else np.zeros((len(s.two_theta), 3), np.float16)
    return PeakTable(
        np.asarray(s.ids, dtype=str),
        np.full(len(s), source),
        np.asarray(s.crystal_system, dtype=str),
        np.asarray(s.space_group, dtype=np.int64),
        np.asarray(s.reduced_formula, dtype=str),
        np.array([_c_and_h(f) for f in s.reduced_formula], dtype=bool),
        np.asarray(s.offsets, dtype=np.int64),
        np.asarray(s.two_theta, dtype=np.float32),
        np.asarray(s.intensity, dtype=np.float32),
        np.asarray(normal, dtype=np.float16),
        s.wavelength,
    )


def _c_and_h(formula: str) -> bool:
    import re

    elements = set(re.findall(r"[A-Z][a-z]?", formula))
    return "C" in elements and "H" in elements


def split_ids(split_dir: Path, split: str) -> list[str]:
    """The structures of a split list, each once, in the list's order (its rows are images: a structure
    with augmented copies has several)."""
    return list(dict.fromkeys(r["cod_id"].strip() for r in read_split(Path(split_dir) / f"{split}.csv")))


def select(table: PeakTable, ids: Sequence[str]) -> PeakTable:
    """The structures ``ids`` of ``table`` in that order; an id it lacks is one error naming it."""
    where = {x: i for i, x in enumerate(table.ids.tolist())}
    lacking = [x for x in ids if x not in where]
    if lacking:
        raise InputError(
            "data/split", f"{len(lacking)} split structure(s) have no peak list, e.g. {lacking[0]}"
        )
    return table.subset([where[x] for x in ids])


def training_table(params: Params, cod: PeakTable, split_dir: Path = Path("data/split")) -> PeakTable:
    """The structures of every source in ``split.train_sources`` (COD: its training split only)."""
    parts = []
    for source in params.split.train_sources:
        if source == "cod":
            parts.append(select(cod, split_ids(split_dir, "train")))
        else:
            parts.append(shard_table(SHARD_SOURCES[source], source))
    table = concat(parts)
    log.info(
        "training structures: %d (%s)",
        len(table),
        ", ".join(f"{s} {int((table.source == s).sum())}" for s in params.split.train_sources),
    )
    return table


def holdout_mask(table: PeakTable, share: float, seed: int) -> np.ndarray:
    """Structures set aside for the synthetic held-out patterns: whole compounds (reduced formulas),
    chosen by a seeded hash, so no compound is both trained on and used for early stopping."""
    digest = np.array(
        [int(hashlib.md5(f"{seed}:{f}".encode()).hexdigest()[:8], 16) for f in table.reduced_formula.tolist()]
    )
    return digest < share * 16**8
