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

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.crystal.powder import PowderSettings, simulate_batch
from xrdvision.crystal.systems import CRYSTAL_SYSTEMS
from xrdvision.data.mp_source import Entry, catalogue, eligible, mp_labels, mp_shards, read_lines, sample
from xrdvision.data.shard_runner import run_tasks
from xrdvision.errors import InputError, XrdVisionError
from xrdvision.formats.atomic import file_digest, write_json
from xrdvision.formats.peaklists import (
    SHARD_PATTERN,
    PeakListShard,
    read_shard,
    shard_bytes,
    shard_plan,
    write_shard_bytes,
)
from xrdvision.formats.tables import read_split, read_table, write_table

log = logging.getLogger(__name__)

SOURCE = "mp"
FORMAT_VERSION = 1  # part of every plan: a change of what a shard holds invalidates old shards
MANIFEST_COLUMNS = (
    "id",
    "shard",
    "source",
    "reduced_formula",
    "crystal_system",
    "space_group",
    "source_space_group",
    "icsd",
    "n_peaks",
    "status",
    "reason",
)
_KEEP_LINES = 50  # error lines quoted in summary.json (all are in manifest.csv / the log)


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
        wavelength=s.wavelength, two_theta_min=s.two_theta_min, two_theta_max=s.two_theta_max
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


def plan_tasks(params: Params, selected: list[Entry], shard_dir: Path) -> list[ShardTask]:
    """The output shards of a selection (in shard and line order), ``mp.shard_size`` at a time."""
    settings = powder_settings(params)
    physics = {
        "format": FORMAT_VERSION,
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
    )
    return shard_bytes(shard)


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


def run_peaklists(params: Params, split_dir: Path, manifest_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir/{mp-NNNNN.npz, manifest.csv, leakage.csv, summary.json}``; returns the summary."""
    split_dir, manifest_path, out_dir = Path(split_dir), Path(manifest_path), Path(out_dir)
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
    _clean(out_dir, {p.name for p in files.values()})
    todo = [t for t in tasks if shard_plan(files[t.name]) != t.plan]
    if len(todo) < len(tasks):
        log.info("peaklists: resuming: %d of %d shards already done", len(tasks) - len(todo), len(tasks))
    _run(params, todo, files, len(tasks))

    write_table(
        out_dir / "leakage.csv", ("id", "reduced_formula"), [(e.id, e.reduced_formula) for e in dropped]
    )
    leakage = {
        **reference,
        "n_mp_dropped": len(dropped),
        "n_mp_formulas_dropped": len({e.reduced_formula for e in dropped}),
    }
    summary = _summarise(
        base, tasks, files, out_dir, read_errors, leakage, len(entries), not_icsd, too_big, m
    )
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
        build_shard,
        todo,
        scheduler=params.mp.scheduler,
        workers=params.mp.workers,
        key=lambda t: f"xrdvision-peaklists-{t.name}-{t.plan[:16]}",
    )
    for task, data, error in outcomes:
        done += 1
        if error is not None:
            failures.append(f"{task.name} ({task.input_name}): {error}")
            log.warning("peaklists: %s failed: %s", task.name, error)
            continue
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
    if failures:
        raise XrdVisionError(
            f"peaklists: {len(failures)} of {len(todo)} shards failed ({failures[0]}); the others are "
            "written and a rerun builds only the missing ones"
        )


def _reason_kind(line: str) -> str:
    """``structures-03.jsonl.xz:mp-1: overlapping atoms: ...`` -> ``overlapping atoms``."""
    reason = line.split(": ", 1)[1] if ": " in line else line
    return reason.split(":")[0].split("(")[0].strip()[:60]


def _summarise(
    base: dict[str, Any],
    tasks: list[ShardTask],
    files: dict[str, Path],
    out_dir: Path,
    read_errors: list[str],
    leakage: dict[str, Any],
    n_read: int,
    not_icsd: int,
    too_big: int,
    m: Any,
) -> dict[str, Any]:
    rows: list[list[Any]] = []
    per_system: Counter[str] = Counter()
    failures: list[str] = []
    shards_info = []
    n_ok = n_disagree = n_lines = 0
    for task in tasks:
        shard: PeakListShard = read_shard(files[task.name])
        counts = np.diff(shard.offsets)
        for i, sid in enumerate(shard.ids):
            sg, src = int(shard.space_group[i]), int(shard.source_space_group[i])
            n_disagree += bool(src) and src != sg
            per_system[shard.crystal_system[i]] += 1
            icsd = str(bool(shard.icsd[i])).lower()
            row = [sid, task.name, SOURCE, shard.reduced_formula[i], shard.crystal_system[i], sg, src or ""]
            rows.append([*row, icsd, int(counts[i]), "ok", ""])
        for sid, reason in zip(shard.failed_ids, shard.failed_reasons, strict=True):
            rows.append([sid, task.name, SOURCE, "", "", "", "", "", 0, "failed", reason])
        failures.extend(shard.failed_reasons)
        n_ok += len(shard)
        n_lines += len(shard.two_theta)
        size = files[task.name].stat().st_size
        shards_info.append(
            {
                "name": files[task.name].name,
                "n_structures": len(shard),
                "n_failed": len(shard.failed_ids),
                "bytes": size,
            }
        )
    write_table(out_dir / "manifest.csv", MANIFEST_COLUMNS, rows)
    return {
        **base,
        "enabled": True,
        "n_records_read": n_read,
        "n_read_errors": len(read_errors),
        "read_errors": read_errors[:_KEEP_LINES],
        "filtered_out": {"icsd_only": not_icsd, "max_sites": too_big},
        "leakage": leakage,
        "n_selected": sum(len(t.lines) for t in tasks),
        "n_structures": n_ok,
        "n_failed": len(failures),
        "failure_kinds": dict(
            sorted(Counter(map(_reason_kind, failures)).items(), key=lambda kv: (-kv[1], kv[0]))
        ),
        "failures": failures[:_KEEP_LINES],
        "labels": {
            "method": "spglib on the shard's arrays at labels.symprec (fallbacks 0.1, 0.001)",
            "n_disagree_with_source_sg": n_disagree,
            "disagreement_rate": round(n_disagree / n_ok, 6) if n_ok else 0.0,
            "per_crystal_system": {c: per_system[c] for c in CRYSTAL_SYSTEMS},
        },
        "honest_external_test": "cod" not in base["params"]["split.train_sources"],
        "n_peaks": n_lines,
        "shards": shards_info,
        "bytes": sum(s["bytes"] for s in shards_info),
        "plan": _digest([t.plan for t in tasks]),
    }


def summary_line(s: dict[str, Any]) -> str:
    """The CLI's one line about a run."""
    if not s.get("enabled"):
        return f"peaklists: off ({s['reason']}); empty manifest written"
    leak, lab = s["leakage"], s["labels"]
    return (
        f"peaklists: {s['n_structures']} Materials Project structures in {len(s['shards'])} shards "
        f"({s['bytes'] / 1e6:.1f} MB), {s['n_failed']} failed, {s['n_read_errors']} unreadable; "
        f"{leak['n_mp_dropped']} dropped for leakage ({leak['n_cod_structures']} COD structures: "
        f"{leak['reference'].split(' (')[0]}); labels differ from the shard's sg for "
        f"{lab['disagreement_rate']:.2%}"
    )
