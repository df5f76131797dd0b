"""The ``peaklists`` stage: Materials Project structures as labelled training peak lists, in shards.

What it does, when ``split.train_sources`` has ``mp`` (otherwise it writes an empty manifest and a
summary saying so, in a second, so the default pipeline costs nothing more):

1. reads every shard of ``mp.folder`` (:mod:`xrdvision.data.mp_source`; bad lines reported), keeping
   only what filtering and sampling need (id, reduced formula, ICSD flag, atoms; ~20 s for all 155k);
2. filters (``mp.icsd_only``, ``mp.max_sites``) and drops every structure whose compound (reduced
   formula) is in COD's validation or test split, or in any COD structure when training uses no COD
   (``split.train_sources: [mp]``: then all of COD is an honest external test); then a seeded sample
   of ``mp.max_structures`` (0: all);
3. cuts the selection into tasks of ``mp.shard_size`` structures (never across input shards), each
   with a *plan* digest of its inputs (input shard's sha256, its lines, the physics settings);
4. runs the tasks (:mod:`xrdvision.data.shard_runner`: a local process pool, or a Dask cluster at
   ``mp.scheduler``): each reads its lines, simulates them with the batch simulator
   (:func:`xrdvision.crystal.powder.simulate_batch`, K-alpha1 as ``patterns.npz``), labels them (spglib
   at ``labels.symprec``) and returns the bytes of its shard (:mod:`xrdvision.formats.peaklists`);
   this process writes each one atomically as it arrives and logs progress;
5. writes ``manifest.csv`` (one row per structure, failures too), ``leakage.csv`` (the dropped ones)
   and ``summary.json`` (counts, label disagreement with the shard's ``sg``, shard sizes).

Resume: a rerun plans again (the same inputs give the same plan) and skips every shard on disk whose
stored plan matches; stale shards and leftover temp files are removed. The outputs hold no time, path
or scheduler, so the same params give the same bytes whether run locally or on a cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.crystal.powder import PowderSettings, simulate_batch
from xrdvision.data.mp_source import Entry, catalogue, eligible, mp_labels, mp_shards, read_lines, sample
from xrdvision.data.peaklists_report import MANIFEST_COLUMNS, summarise
from xrdvision.data.shard_runner import run_tasks
from xrdvision.errors import InputError, XrdVisionError
from xrdvision.formats.atomic import file_digest, write_json
from xrdvision.formats.peaklists import (
    SHARD_PATTERN,
    PeakListShard,
    shard_bytes,
    shard_plan,
    write_shard_bytes,
)
from xrdvision.formats.tables import read_split, read_table, write_table

log = logging.getLogger(__name__)

SOURCE = "mp"
FORMAT_VERSION = 2  # part of every plan: a change of what a shard holds invalidates old shards


@dataclass(frozen=True)
class ShardTask:
    """One output shard: which lines of which input shard, and everything its content depends on."""

    name: str  # mp-00000
    input_path: str  # absolute, where the worker reads it
    input_name: str  # structures-03.jsonl.xz
    lines: tuple[int, ...]
    settings: PowderSettings
    symprec: float
    angle_tolerance: float
    plan: str


def powder_settings(params: Params) -> PowderSettings:
    """The batch simulator's settings from ``simulate``: K-alpha1 only (a profile adds K-alpha2)."""
    s = params.simulate
    return PowderSettings(
        wavelength=s.wavelength,
        two_theta_min=s.two_theta_min,
        two_theta_max=s.two_theta_max,
        with_normals=True,  # for March-Dollase texture in the training patterns
    )


def cod_reference(params: Params, split_dir: Path, manifest_path: Path) -> tuple[set[str], dict[str, Any]]:
    """The COD compounds no Materials Project structure may share: validation and test, or every COD
    structure when training uses none of COD. Returns the reduced formulas and a description."""
    rows = read_table(manifest_path, ["cod_id", "status", "reduced_formula"], "manifest")
    formula = {r["cod_id"].strip(): r["reduced_formula"].strip() for r in rows if r["status"].strip() == "ok"}
    if "cod" in params.split.train_sources:
        ids = {r["cod_id"].strip() for s in ("val", "test") for r in read_split(split_dir / f"{s}.csv")}
        what = "COD validation and test splits"
    else:
        ids = set(formula)
        what = "every COD structure (training uses none of COD: all of it is an honest external test)"
    unknown = sorted(ids - set(formula))
    if unknown:
        raise InputError(manifest_path, f"no ok row for split structure(s) {', '.join(unknown[:5])}")
    formulas = {formula[i] for i in ids if formula[i]}
    info = {"reference": what, "n_cod_structures": len(ids), "n_cod_formulas": len(formulas)}
    return formulas, info


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# The modules whose code decides what a shard holds: a change to any of them invalidates every shard (DVC
# reruns the stage for it; without this the rerun would keep shards that the old code wrote).
_CONTENT_CODE = (
    "xrdvision.crystal.bragg",
    "xrdvision.crystal.form_factors",
    "xrdvision.crystal.powder",
    "xrdvision.crystal.powder_input",
    "xrdvision.data.mp_source",
    "xrdvision.data.peaklists",
    "xrdvision.formats.peaklists",
)


def code_digest() -> str:
    """sha256 of the source of :data:`_CONTENT_CODE` and of the numpy, spglib, xrayutilities versions."""
    import spglib
    import xrayutilities

    h = hashlib.sha256()
    for name in _CONTENT_CODE:
        h.update(name.encode())
        h.update(Path(str(importlib.import_module(name).__file__)).read_bytes())
    h.update(f"numpy {np.__version__} spglib {spglib.__version__} xu {xrayutilities.__version__}".encode())
    return h.hexdigest()


def plan_tasks(params: Params, selected: list[Entry], shard_dir: Path) -> list[ShardTask]:
    """The output shards of a selection (in shard and line order), ``mp.shard_size`` at a time."""
    settings = powder_settings(params)
    physics = {
        "format": FORMAT_VERSION,
        "code": code_digest(),
        "wavelength": settings.wavelength,
        "two_theta": [settings.two_theta_min, settings.two_theta_max],
        "symprec": params.labels.symprec,
        "angle_tolerance": params.labels.angle_tolerance,
    }
    by_input: dict[str, list[int]] = {}
    for e in selected:
        by_input.setdefault(e.shard, []).append(e.line)
    tasks: list[ShardTask] = []
    size = params.mp.shard_size
    for input_name, lines in by_input.items():
        path = (shard_dir / input_name).resolve()
        sha = file_digest(path)
        for start in range(0, len(lines), size):
            chunk = tuple(lines[start : start + size])
            plan = _digest({**physics, "input": input_name, "sha256": sha, "lines": chunk})
            name = SHARD_PATTERN.format(source=SOURCE, index=len(tasks)).removesuffix(".npz")
            tol = (params.labels.symprec, params.labels.angle_tolerance)
            tasks.append(ShardTask(name, str(path), input_name, chunk, settings, *tol, plan=plan))
    return tasks


def build_shard(task: ShardTask) -> bytes:
    """A task's shard (runs on a worker): read, simulate, label; the file's bytes."""
    errors: list[str] = []
    records = read_lines(Path(task.input_path), task.lines, errors)
    batch = simulate_batch(records, task.settings, source=task.input_name)
    keep: list[int] = []
    labels: list[tuple[int, str]] = []
    failed_ids, failed_reasons = [], []
    for i, rec in enumerate(records):
        reason = batch.errors.get(i)
        if reason is None:
            try:
                labels.append(mp_labels(rec, task.symprec, task.angle_tolerance))
                keep.append(i)
                continue
            except ValueError as exc:
                reason = str(InputError(f"{task.input_name}:{rec['id']}", str(exc)))
        failed_ids.append(str(rec["id"]))
        failed_reasons.append(reason)
    for line in errors:  # lines that were readable when planned but are not now
        failed_ids.append(task.input_name)
        failed_reasons.append(line)
    counts = np.diff(batch.offsets)[keep] if keep else np.zeros(0, np.int64)
    parts = [np.arange(batch.offsets[i], batch.offsets[i + 1]) for i in keep]
    idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    shard = PeakListShard(
        ids=[str(records[i]["id"]) for i in keep],
        reduced_formula=[records[i]["reduced_formula"] for i in keep],
        crystal_system=[cs for _, cs in labels],
        space_group=np.array([sg for sg, _ in labels], dtype=np.int16),
        source_space_group=np.array([records[i]["sg"] or 0 for i in keep], dtype=np.int16),
        icsd=np.array([records[i]["icsd"] for i in keep], dtype=bool),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        two_theta=batch.two_theta[idx].astype(np.float32),
        intensity=batch.intensity[idx].astype(np.float32),
        failed_ids=failed_ids,
        failed_reasons=failed_reasons,
        source=SOURCE,
        wavelength=float(task.settings.wavelength),
        plan=task.plan,
        normal=batch.normal[idx] if batch.normal is not None else None,
    )
    return shard_bytes(shard)


def build_shard_measured(task: ShardTask) -> tuple[bytes, float]:
    """:func:`build_shard` and the worker's peak RSS so far (MB), for the log (never the outputs)."""
    import resource

    data = build_shard(task)
    return data, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _clean(out_dir: Path, keep: set[str]) -> None:
    """Remove leftover temp files (a killed run's) and shards that are not in the plan."""
    for p in out_dir.glob(".*.tmp"):
        p.unlink(missing_ok=True)
    for p in out_dir.glob(f"{SOURCE}-*.npz"):
        if p.name not in keep:
            log.info("peaklists: removing %s (not in this plan)", p.name)
            p.unlink()


def _params_used(params: Params) -> dict[str, Any]:
    m = params.mp
    return {
        "seed": params.seed,
        "split.train_sources": list(params.split.train_sources),
        "mp": {
            k: getattr(m, k) for k in ("folder", "max_structures", "icsd_only", "max_sites", "shard_size")
        },
        "simulate": {
            k: getattr(params.simulate, k) for k in ("wavelength", "two_theta_min", "two_theta_max")
        },
        "labels": {"symprec": params.labels.symprec, "angle_tolerance": params.labels.angle_tolerance},
    }


def run_peaklists(
    params: Params, split_dir: Path, manifest_path: Path, out_dir: Path, work_dir: Path | None = None
) -> dict[str, Any]:
    """Write ``out_dir/{mp-NNNNN.npz, manifest.csv, leakage.csv, summary.json}``; returns the summary.

    Shards are built in ``work_dir`` (default: ``out_dir`` itself) and moved into ``out_dir`` once all
    are there. The CLI's ``data/cache/peaklists`` lies outside the DVC output, because ``dvc exp run``
    clears an output that its lock file does not know yet: the finished shards of an interrupted
    experiment survive there, and the rerun picks them up.
    """
    split_dir, manifest_path, out_dir = Path(split_dir), Path(manifest_path), Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    base: dict[str, Any] = {"source": SOURCE, "format": FORMAT_VERSION, "params": _params_used(params)}
    if SOURCE not in params.split.train_sources:
        _clean(out_dir, set())
        write_table(out_dir / "manifest.csv", MANIFEST_COLUMNS, [])
        write_table(out_dir / "leakage.csv", ("id", "reduced_formula"), [])
        summary = {**base, "enabled": False, "reason": "split.train_sources has no mp", "n_structures": 0}
        write_json(out_dir / "summary.json", summary)
        return summary

    formulas, reference = cod_reference(params, split_dir, manifest_path)
    t0 = time.perf_counter()
    read_errors: list[str] = []
    shards = mp_shards(params.mp.folder, read_errors)
    entries: list[Entry] = []
    for path in shards:
        before = len(entries)
        entries.extend(catalogue([path], read_errors))  # type: ignore[arg-type]
        log.info("peaklists: read %s: %d structures", path.name, len(entries) - before)
    m = params.mp
    not_icsd = sum(1 for e in entries if m.icsd_only and not e.icsd)
    too_big = sum(
        1 for e in entries if (e.icsd or not m.icsd_only) and not eligible(e, max_sites=m.max_sites)
    )
    candidates = [e for e in entries if eligible(e, icsd_only=m.icsd_only, max_sites=m.max_sites)]
    dropped = [e for e in candidates if e.reduced_formula in formulas]
    selected = sample(
        [e for e in candidates if e.reduced_formula not in formulas], m.max_structures, params.seed
    )
    log.info(
        "peaklists: %d structures read in %.0f s; %d filtered out, %d dropped for leakage (%s), %d selected",
        len(entries),
        time.perf_counter() - t0,
        not_icsd + too_big,
        len(dropped),
        reference["reference"],
        len(selected),
    )
    tasks = plan_tasks(params, selected, Path(params.mp.folder))
    files = {t.name: out_dir / f"{t.name}.npz" for t in tasks}
    built = {t.name: work_dir / f"{t.name}.npz" for t in tasks}
    names = {p.name for p in files.values()}
    _clean(out_dir, names)
    work_dir.mkdir(parents=True, exist_ok=True)
    _clean(work_dir, names)
    todo = [t for t in tasks if t.plan not in (shard_plan(files[t.name]), shard_plan(built[t.name]))]
    if len(todo) < len(tasks):
        log.info("peaklists: resuming: %d of %d shards already done", len(tasks) - len(todo), len(tasks))
    _run(params, todo, built, len(tasks))
    if work_dir != out_dir:
        for t in tasks:
            if built[t.name].exists() and shard_plan(built[t.name]) == t.plan:
                os.replace(built[t.name], files[t.name])  # same file system: an atomic rename
        with contextlib.suppress(OSError):
            work_dir.rmdir()  # empty now; left alone if anything else is in it

    write_table(
        out_dir / "leakage.csv", ("id", "reduced_formula"), [(e.id, e.reduced_formula) for e in dropped]
    )
    counts = {
        "n_records_read": len(entries),
        "filtered_out": {"icsd_only": not_icsd, "max_sites": too_big},
        "leakage": {
            **reference,
            "n_mp_dropped": len(dropped),
            "n_mp_formulas_dropped": len({e.reduced_formula for e in dropped}),
        },
        "n_selected": len(selected),
        "plan": _digest([t.plan for t in tasks]),
    }
    summary = summarise(out_dir, [files[t.name] for t in tasks], base, counts, read_errors)
    write_json(out_dir / "summary.json", summary)
    return summary


def _run(params: Params, todo: list[ShardTask], files: dict[str, Path], n_tasks: int) -> None:
    """Run the tasks; write each shard as it arrives; log progress; fail at the end if any failed."""
    if not todo:
        return
    total = sum(len(t.lines) for t in todo)
    t0, done, done_structures = time.perf_counter(), 0, 0
    failures: list[str] = []
    where = (
        params.mp.scheduler if params.mp.scheduler != "local" else f"{params.mp.workers} local process(es)"
    )
    log.info("peaklists: %d shards (%d structures) to build on %s", len(todo), total, where)
    outcomes = run_tasks(
        build_shard_measured,
        todo,
        scheduler=params.mp.scheduler,
        workers=params.mp.workers,
        key=lambda t: f"xrdvision-peaklists-{t.name}-{t.plan[:16]}",
    )
    peak_rss = 0.0
    for task, result, error in outcomes:
        done += 1
        if error is not None:
            failures.append(f"{task.name} ({task.input_name}): {error}")
            log.warning("peaklists: %s failed: %s", task.name, error)
            continue
        data, rss = result
        peak_rss = max(peak_rss, rss)
        size = write_shard_bytes(files[task.name], data)
        done_structures += len(task.lines)
        elapsed = time.perf_counter() - t0
        left = elapsed / done_structures * (total - done_structures)
        log.info(
            "peaklists: %s written (%d structures, %.1f MB); %d/%d shards, %d/%d structures, "
            "%.0f s, ~%.0f s left",
            task.name,
            len(task.lines),
            size / 1e6,
            done + n_tasks - len(todo),
            n_tasks,
            done_structures,
            total,
            elapsed,
            left,
        )
    log.info(
        "peaklists: built %d shards in %.0f s (%.0f structures/s); largest worker peak RSS %.0f MB",
        done - len(failures),
        time.perf_counter() - t0,
        done_structures / max(time.perf_counter() - t0, 1e-9),
        peak_rss,
    )
    if failures:
        raise XrdVisionError(
            f"peaklists: {len(failures)} of {len(todo)} shards failed ({failures[0]}); the others are "
            "written and a rerun builds only the missing ones"
        )
