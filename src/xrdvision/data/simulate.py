"""The simulate stage: a folder of CIFs -> labels + peak lists + profiled patterns, and a manifest.

Why a stage module apart from the physics: what one CIF becomes is decided in :mod:`xrdvision.crystal`
(labels: :mod:`~xrdvision.crystal.labels`, peak list: :mod:`~xrdvision.crystal.diffraction`, profile:
:mod:`~xrdvision.crystal.profile`); this module runs that over a whole folder the way a DVC stage must.
Every CIF gets a :class:`Record`, a success or a failure with a one-line reason, so one bad file never
stops the batch. CIFs run in worker processes with a hard per-CIF time limit
(:func:`xrdvision.data.pool.run_pool`), finished results go to a per-CIF cache (:class:`ResultCache`)
that makes an interrupted run resume where it stopped, and the outputs are the ``patterns.npz`` and
``manifest.csv`` of docs/dataflow.md (:mod:`xrdvision.formats.patterns`), written atomically and the
same bytes on every run (no per-run value in them; per-CIF times go to the summary line).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import LabelsParams, Params, SimulateParams
from xrdvision.crystal.diffraction import Peaks, simulate_peaks
from xrdvision.crystal.labels import (
    Labels,
    analyse_symmetry,
    declared_space_group,
    labels_from_analyzer,
    read_structure,
)
from xrdvision.crystal.profile import grid, profile_pattern
from xrdvision.crystal.structure import reopen_form_factor_db
from xrdvision.data.pool import TaskFailure, run_pool
from xrdvision.errors import InputError, XrdVisionError, one_line
from xrdvision.formats.patterns import MANIFEST_COLUMNS, Patterns, write_manifest, write_patterns

# Bump when the physics or the record layout changes: it is part of every cache key.
SIMULATE_VERSION = 1

DEFAULT_CACHE_DIR = Path("data/cache/simulate")
NO_REFLECTIONS = "no reflections in 2-theta range"
# What the forkserver imports once for all workers (the physics and this module, which workers run).
_PRELOAD = ("xrayutilities", "pymatgen.io.cif", "pymatgen.symmetry.analyzer", "xrdvision.data.simulate")


@dataclass
class Record:
    """Everything the simulate stage knows about one CIF (``pattern`` is None for a failure)."""

    cod_id: str
    file: str
    status: str  # "ok" or "failed"
    reason: str = ""
    labels: Labels | None = None
    n_atoms: int = 0
    peaks: Peaks | None = None
    pattern: np.ndarray | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_peaks(self) -> int:
        return len(self.peaks) if self.peaks is not None else 0

    def manifest_row(self) -> dict[str, Any]:
        lab = self.labels
        row: dict[str, Any] = dict.fromkeys(MANIFEST_COLUMNS, "")
        row.update(cod_id=self.cod_id, file=self.file, status=self.status, reason=self.reason)
        row.update(n_atoms=self.n_atoms or "", n_peaks=self.n_peaks if self.status == "ok" else "")
        if lab is not None:
            row.update(
                formula=lab.formula,
                reduced_formula=lab.reduced_formula,
                crystal_system=lab.crystal_system,
                space_group=lab.space_group,
                space_group_symbol=lab.space_group_symbol,
                declared_space_group="" if lab.declared_space_group is None else lab.declared_space_group,
                symmetry_mismatch=lab.symmetry_mismatch,
            )
        return row


def _peaks_record(path: str | Path, sim: SimulateParams, lab: LabelsParams) -> Record:
    """Labels + peak list of one CIF (no profile); a bad file raises :class:`InputError`."""
    path = Path(path)
    t0 = time.perf_counter()
    structure = read_structure(path)
    declared = declared_space_group(path)
    try:
        sga = analyse_symmetry(structure, lab.symprec, lab.angle_tolerance)
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
    labels = labels_from_analyzer(structure, sga, declared)
    try:
        peaks = simulate_peaks(
            structure,
            sim.wavelength,
            sim.two_theta_min,
            sim.two_theta_max,
            rotations=sga.get_symmetry_dataset().rotations,
        )
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
    if len(peaks) == 0:
        raise InputError(path, NO_REFLECTIONS)
    return Record(
        cod_id=path.stem,
        file=str(path),
        status="ok",
        labels=labels,
        n_atoms=len(structure),
        peaks=peaks,
        seconds=time.perf_counter() - t0,
    )


def profile_record(record: Record, sim: SimulateParams) -> np.ndarray:
    """The record's peak list on the stage's 2-theta grid (pseudo-Voigt, optional K-alpha2), max 1."""
    assert record.peaks is not None
    return profile_pattern(
        record.peaks.two_theta,
        record.peaks.intensity,
        grid(sim.two_theta_min, sim.two_theta_max, sim.step),
        sim.fwhm,
        sim.eta,
        kalpha2=sim.kalpha2,
        wavelength=sim.wavelength,
    )


def simulate_file(path: str | Path, sim: SimulateParams, lab: LabelsParams) -> Record:
    """Labels, peak list and profiled pattern of one CIF. Raises :class:`InputError` for a bad file
    (unreadable by pymatgen, no symmetry, an element without form factor, nothing in range)."""
    record = _peaks_record(path, sim, lab)
    record.pattern = profile_record(record, sim)
    return record


def _failure(path: Path, reason: str, seconds: float = 0.0, **extra: Any) -> Record:
    return Record(
        cod_id=path.stem, file=str(path), status="failed", reason=reason, seconds=seconds, extra=extra
    )


def simulate_task(path: str, sim: SimulateParams, lab: LabelsParams) -> dict[str, Any]:
    """What a worker runs for one CIF: its record as a payload; a bad file is a failed record, never an
    exception, so that only a timeout or a dead worker is left for the pool to report."""
    t0 = time.perf_counter()
    try:
        record = _peaks_record(path, sim, lab)
    except XrdVisionError as exc:
        reason = exc.reason if isinstance(exc, InputError) else str(exc)
        record = _failure(Path(path), reason, time.perf_counter() - t0)
    except MemoryError:
        record = _failure(Path(path), "out of memory", time.perf_counter() - t0)
    except Exception as exc:  # a bug or an odd file: report it on one line, keep the batch going
        record = _failure(Path(path), one_line(exc), time.perf_counter() - t0)
    return _to_payload(record)


# --------------------------------------------------------------------------------------------------
# The per-CIF result cache
# --------------------------------------------------------------------------------------------------


def cache_key(cif_bytes: bytes, sim: SimulateParams, lab: LabelsParams) -> str:
    """Content hash of a CIF + the settings its peak list and labels depend on (not the profile:
    step, width and K-alpha2 are applied when the stage's outputs are assembled)."""
    settings = {
        "version": SIMULATE_VERSION,
        "wavelength": sim.wavelength,
        "two_theta_min": sim.two_theta_min,
        "two_theta_max": sim.two_theta_max,
        "symprec": lab.symprec,
        "angle_tolerance": lab.angle_tolerance,
    }
    digest = hashlib.sha256(cif_bytes)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


class ResultCache:
    """Finished per-CIF payloads (see :func:`_to_payload`) by :func:`cache_key`, in a ``diskcache``.

    ``diskcache`` is an sqlite file with the locking, pickling and crash safety done: every result is
    committed as it comes (a killed run loses none). Two of its defaults are changed because this is a
    store of results, not a bounded cache: nothing is evicted (its default drops entries past 1 GB, and
    a batch of 10^5 CIFs holds ~2 GB), and every payload is a row of the one database file (its default
    writes values over 32 kB, 18 % of COD's, as one file each: 10^4 files for 10^5 CIFs).
    """

    def __init__(self, cache_dir: str | Path) -> None:
        import diskcache

        self.path = Path(cache_dir)
        self.db = diskcache.Cache(str(self.path), eviction_policy="none", disk_min_file_size=1 << 40)

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return self.db.get(key)
        except Exception:  # a payload from an incompatible version: recompute it
            return None

    def put(self, key: str, payload: dict[str, Any]) -> None:
        self.db.set(key, payload)

    def close(self) -> None:
        self.db.close()


def _to_payload(record: Record) -> dict[str, Any]:
    """A record as plain data (what the cache stores and workers send back): no profiled pattern."""
    out: dict[str, Any] = {
        "status": record.status,
        "reason": record.reason,
        "labels": asdict(record.labels) if record.labels is not None else None,
        "n_atoms": record.n_atoms,
        "seconds": record.seconds,
        "extra": record.extra,
    }
    if record.peaks is not None:
        p = record.peaks
        out["peaks"] = {
            "two_theta": p.two_theta.astype(np.float64),
            "intensity": p.intensity.astype(np.float64),
            "d": p.d.astype(np.float64),
            "hkl": p.hkl.astype(np.int32),
        }
    return out


def _from_payload(payload: dict[str, Any], path: Path) -> Record:
    peaks = Peaks(**payload["peaks"]) if payload.get("peaks") is not None else None
    labels = Labels(**payload["labels"]) if payload.get("labels") is not None else None
    return Record(
        cod_id=path.stem,
        file=str(path),
        status=payload["status"],
        reason=payload["reason"],
        labels=labels,
        n_atoms=payload.get("n_atoms", 0),
        peaks=peaks,
        seconds=payload.get("seconds", 0.0),
        extra=dict(payload.get("extra") or {}),
    )


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def reason_group(reason: str) -> str:
    """A failure reason without its particulars (numbers, quoted values, details in parentheses), to
    count failures by kind: ``"pymatgen: could not convert string to float: '?'"`` ->
    ``"pymatgen: could not convert string to float"``."""
    text = re.sub(r"\s*\(.*\)\s*$", "", reason)
    if text.startswith("timeout after"):
        return "timeout"
    text = re.sub(r":\s*'[^']*'$|:\s*\"[^\"]*\"$", "", text)
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return text.strip()


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the terminal: ``simulate: 850 ok, 2 failed (timeout: 1, ...) in 123 s``."""
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary["reasons"].items(), key=lambda kv: -kv[1]))
    failed = f"{summary['n_failed']} failed" + (f" ({reasons})" if reasons else "")
    cached = f", {summary['n_cached']} from cache" if summary.get("n_cached") else ""
    slowest = ", ".join(f"{c} {t:.1f} s" for c, t in summary.get("slowest", []))
    slow = f"; slowest: {slowest}" if slowest else ""
    return f"simulate: {summary['n_ok']} ok, {failed} in {summary['seconds']:.0f} s{cached}{slow}"


def run_simulate(
    params: Params,
    cif_dir: str | Path,
    out_dir: str | Path,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """The simulate stage: every ``*.cif`` of ``cif_dir`` -> ``out_dir/patterns.npz`` + ``manifest.csv``.

    Results already in the cache (same CIF bytes, same peak/label settings) are reused, so an
    interrupted run resumes where it stopped. A CIF that timed out is retried only with a longer
    ``timeout_s`` than the one it failed under. Returns ``{n_ok, n_failed, reasons, per_system,
    seconds, n_cached, n_computed, slowest}`` (see :func:`summary_line` for the one-line form).
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    sim, lab = params.simulate, params.labels
    cif_dir, out_dir = Path(cif_dir), Path(out_dir)
    if not cif_dir.is_dir():
        raise InputError(cif_dir, "CIF folder not found")
    paths = sorted(cif_dir.glob("*.cif"))
    if not paths:
        raise InputError(cif_dir, "no *.cif files")
    records: list[Record | None] = [None] * len(paths)
    keys = [cache_key(p.read_bytes(), sim, lab) for p in paths]
    cache = ResultCache(cache_dir)
    try:
        todo: list[int] = []
        for i, (path, key) in enumerate(zip(paths, keys, strict=True)):
            payload = cache.get(key)
            usable = payload is not None and not (
                payload.get("extra", {}).get("timeout") and payload["extra"]["timeout_s"] < sim.timeout_s
            )
            if usable:
                assert payload is not None
                records[i] = _from_payload(payload, path)
            else:
                todo.append(i)
        # Largest files first: the slow ones start early instead of leaving one worker busy at the end.
        todo.sort(key=lambda i: -paths[i].stat().st_size)
        n_cached = len(paths) - len(todo)
        bar = tqdm(total=len(paths), initial=n_cached, desc="simulate", unit="cif", disable=not progress)

        def on_result(index: int, result: dict[str, Any] | TaskFailure) -> None:
            path = paths[index]
            if isinstance(result, TaskFailure):
                extra = {"timeout": True, "timeout_s": sim.timeout_s} if result.timeout else {"crashed": True}
                record = _failure(path, result.reason, result.seconds, **extra)
            else:
                record = _from_payload(result, path)
            records[index] = record
            if not record.extra.get("crashed"):
                cache.put(keys[index], _to_payload(record))
            bar.update(1)

        try:
            run_pool(
                simulate_task,
                [(i, (str(paths[i]), sim, lab)) for i in todo],
                on_result,
                workers=sim.workers,
                timeout_s=sim.timeout_s,
                initializer=reopen_form_factor_db,
                preload=_PRELOAD,
            )
        finally:
            bar.close()
    finally:
        cache.close()
    done = [r for r in records if r is not None]
    computed = [r for i in todo if (r := records[i]) is not None]
    _write_outputs(done, sim, out_dir)
    ok = [r for r in done if r.status == "ok"]
    failed = [r for r in done if r.status != "ok"]
    per_system = Counter(r.labels.crystal_system for r in ok if r.labels is not None)
    return {
        "n_ok": len(ok),
        "n_failed": len(failed),
        "reasons": dict(Counter(reason_group(r.reason) for r in failed)),
        "per_system": dict(sorted(per_system.items())),
        "seconds": round(time.perf_counter() - t0, 2),
        "n_cached": n_cached,
        "n_computed": len(todo),
        # Per-CIF times go to the log, not the manifest: a data output must hash the same on every run.
        # Only this run's CIFs: a cached record's time is that of the run that computed it.
        "slowest": [(r.cod_id, round(r.seconds, 2)) for r in sorted(computed, key=lambda r: -r.seconds)[:3]],
    }


def _write_outputs(records: list[Record], sim: SimulateParams, out_dir: Path) -> None:
    """``manifest.csv`` (every CIF) and ``patterns.npz`` (the ok ones, manifest order), atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    two_theta = grid(sim.two_theta_min, sim.two_theta_max, sim.step)
    ok = [r for r in records if r.status == "ok" and r.peaks is not None]
    intensity = np.zeros((len(ok), two_theta.size), dtype=np.float32)
    for i, r in enumerate(ok):
        intensity[i] = profile_record(r, sim)
    peak_lists = [(r.peaks.two_theta, r.peaks.intensity, r.peaks.d) for r in ok if r.peaks is not None]
    ids = [r.cod_id for r in ok]
    write_patterns(
        out_dir / "patterns.npz",
        Patterns.from_peak_lists(ids, peak_lists, two_theta, intensity, sim.wavelength),
    )
    write_manifest(out_dir / "manifest.csv", [r.manifest_row() for r in records])
