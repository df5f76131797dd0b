"""Peak-list shards (``data/peaklists/mp-00000.npz``): the simulated training structures of other sources.

Why a format of its own rather than ``patterns.npz``? 10^5 structures do not fit one file that is
rewritten whole, and a profiled pattern per structure (4 250 floats) is 30 times its peak list. So the
``peaklists`` stage stores only peak lists (images and profiles are made from them when a model needs
them), in shards of a few thousand structures that are each written once, atomically: a killed run
leaves whole shards and a rerun skips those whose ``plan`` (a digest of their inputs) still holds.

A shard is a zip of ``.npy`` members, readable with ``numpy.load``, written so that the same content
gives the same bytes on every run and machine: fixed member order, a fixed date (1980-01-01), fixed
permissions, deflate at level 6, no pickles. Members (N structures, P lines):

- ``ids`` (N, str), ``reduced_formula`` (N, str), ``crystal_system`` (N, str), ``space_group`` (N,
  int16): the project's labels (spglib at ``labels.symprec``); ``source_space_group`` (N, int16): the
  source's own (the shard field ``sg``; 0 if none); ``icsd`` (N, bool);
- ``offsets`` (N+1, int64), ``two_theta`` (P, float32, degrees), ``intensity`` (P, float32, max 1 per
  structure): lines of structure i are ``offsets[i]:offsets[i+1]``, K-alpha1 only (as ``patterns.npz``;
  d follows from ``wavelength`` by Bragg's law, :meth:`PeakListShard.d`);
- ``failed_ids``, ``failed_reasons`` (F, str): records that gave no peak list, one line each;
- ``source`` (str, e.g. ``mp``), ``wavelength`` (float64, A), ``plan`` (str): the digest that decides
  whether a rerun may keep the shard;
- optional ``normal`` (P, 3, float16): each line's unit plane normal (its strongest reflection's, in
  an orthonormal frame of the structure; :func:`xrdvision.crystal.powder.plane_normals`), what a
  March-Dollase preferred orientation needs. Shards without it give patterns without texture.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.crystal.bragg import d_spacing
from xrdvision.errors import InputError
from xrdvision.formats.atomic import atomic_path

SHARD_PATTERN = "{source}-{index:05d}.npz"
MEMBERS = (
    "ids",
    "reduced_formula",
    "crystal_system",
    "space_group",
    "source_space_group",
    "icsd",
    "offsets",
    "two_theta",
    "intensity",
    "failed_ids",
    "failed_reasons",
    "source",
    "wavelength",
    "plan",
)
OPTIONAL_MEMBERS = ("normal",)
_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: no run's clock gets into the bytes
_LEVEL = 6


@dataclass
class PeakListShard:
    """The content of one shard (see the module doc for the members)."""

    ids: list[str]
    reduced_formula: list[str]
    crystal_system: list[str]
    space_group: np.ndarray
    source_space_group: np.ndarray
    icsd: np.ndarray
    offsets: np.ndarray
    two_theta: np.ndarray
    intensity: np.ndarray
    failed_ids: list[str]
    failed_reasons: list[str]
    source: str
    wavelength: float
    plan: str
    normal: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def peaks(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(two_theta, intensity)`` of structure ``i``."""
        sl = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        return self.two_theta[sl], self.intensity[sl]

    def d(self) -> np.ndarray:
        """d-spacings (A, float64) of all lines, from ``two_theta`` and ``wavelength``."""
        return d_spacing(self.two_theta.astype(np.float64), self.wavelength)


def _arrays(shard: PeakListShard) -> dict[str, np.ndarray]:
    def text(values: Sequence[str]) -> np.ndarray:
        return np.array(list(values), dtype=str) if len(values) else np.zeros(0, dtype="<U1")

    return {
        "ids": text(shard.ids),
        "reduced_formula": text(shard.reduced_formula),
        "crystal_system": text(shard.crystal_system),
        "space_group": np.asarray(shard.space_group, dtype=np.int16),
        "source_space_group": np.asarray(shard.source_space_group, dtype=np.int16),
        "icsd": np.asarray(shard.icsd, dtype=bool),
        "offsets": np.asarray(shard.offsets, dtype=np.int64),
        "two_theta": np.asarray(shard.two_theta, dtype=np.float32),
        "intensity": np.asarray(shard.intensity, dtype=np.float32),
        "failed_ids": text(shard.failed_ids),
        "failed_reasons": text(shard.failed_reasons),
        "source": np.array(shard.source, dtype=str),
        "wavelength": np.array(shard.wavelength, dtype=np.float64),
        "plan": np.array(shard.plan, dtype=str),
    } | ({} if shard.normal is None else {"normal": np.asarray(shard.normal, dtype=np.float16)})


def check_shard(shard: PeakListShard) -> None:
    """``ValueError`` if the members do not fit together (lengths, offsets, failed lists)."""
    n = len(shard.ids)
    per = {k: len(getattr(shard, k)) for k in ("reduced_formula", "crystal_system", "space_group")}
    per |= {k: len(getattr(shard, k)) for k in ("source_space_group", "icsd")}
    wrong = [f"{k} has {v}" for k, v in per.items() if v != n]
    if wrong:
        raise ValueError(f"{n} ids but {', '.join(wrong)}")
    off = np.asarray(shard.offsets)
    if off.shape != (n + 1,) or off[0] != 0 or (np.diff(off) < 0).any():
        raise ValueError(f"offsets must be N+1 = {n + 1} non-decreasing values from 0, got shape {off.shape}")
    if off[-1] != len(shard.two_theta) or len(shard.two_theta) != len(shard.intensity):
        raise ValueError(
            f"offsets end at {off[-1]} but there are {len(shard.two_theta)} two_theta and "
            f"{len(shard.intensity)} intensity values"
        )
    if shard.normal is not None and np.shape(shard.normal) != (len(shard.two_theta), 3):
        raise ValueError(f"normal has shape {np.shape(shard.normal)}, need ({len(shard.two_theta)}, 3)")
    if len(shard.failed_ids) != len(shard.failed_reasons):
        raise ValueError(f"{len(shard.failed_ids)} failed ids but {len(shard.failed_reasons)} reasons")


def shard_bytes(shard: PeakListShard) -> bytes:
    """The shard as the bytes of its file: the same content always gives the same bytes."""
    check_shard(shard)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=_LEVEL) as zf:
        for name, array in _arrays(shard).items():
            member = io.BytesIO()
            np.lib.format.write_array(member, array, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3
            zf.writestr(info, member.getvalue(), compresslevel=_LEVEL)
    return buf.getvalue()


def write_shard_bytes(path: str | Path, data: bytes) -> int:
    """Write a shard's bytes atomically (temp file, then rename); returns their number."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return len(data)


def _load(path: Path, members: Sequence[str], optional: Sequence[str] = ()) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [m for m in members if m not in npz.files]
            if missing:
                raise InputError(path, f"not a peak-list shard: lacks {', '.join(missing)}")
            return {m: npz[m] for m in (*members, *optional) if m in npz.files}
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(path, "peak-list shard not found") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(path, f"unreadable peak-list shard ({type(exc).__name__}: {exc})") from None


def read_shard(path: str | Path) -> PeakListShard:
    """A shard file, checked; :class:`InputError` naming the file for a missing, damaged or
    inconsistent one."""
    path = Path(path)
    a = _load(path, MEMBERS, OPTIONAL_MEMBERS)
    shard = PeakListShard(
        ids=a["ids"].tolist(),
        reduced_formula=a["reduced_formula"].tolist(),
        crystal_system=a["crystal_system"].tolist(),
        space_group=a["space_group"],
        source_space_group=a["source_space_group"],
        icsd=a["icsd"],
        offsets=a["offsets"],
        two_theta=a["two_theta"],
        intensity=a["intensity"],
        failed_ids=a["failed_ids"].tolist(),
        failed_reasons=a["failed_reasons"].tolist(),
        source=str(a["source"]),
        wavelength=float(a["wavelength"]),
        plan=str(a["plan"]),
        normal=a.get("normal"),
    )
    try:
        check_shard(shard)
    except ValueError as exc:
        raise InputError(path, f"inconsistent peak-list shard: {exc}") from None
    return shard


def shard_plan(path: str | Path) -> str | None:
    """The ``plan`` digest of an existing shard, or None if there is none or it cannot be read."""
    try:
        return str(_load(Path(path), ("plan",))["plan"])
    except InputError:
        return None


def read_shards(folder: str | Path, source: str = "mp") -> list[PeakListShard]:
    """Every ``<source>-*.npz`` shard of ``folder`` in name order (a training set's peak lists)."""
    return [read_shard(p) for p in sorted(Path(folder).glob(f"{source}-*.npz"))]
