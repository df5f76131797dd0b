"""The ``generate`` stage: realistic synthetic crystals as labelled peak-list shards (``source="synth"``).

Why a stage beside ``peaklists``: real structures are scarce where a model needs them most (rare space
groups, unseen structure types); crystals drawn from the statistics of real training crystals
(:mod:`xrdvision.data.generator_fit`, :mod:`xrdvision.data.generator_sample`) are not. The stage:

1. describes the training structures (spglib on arrays, two processes): COD's training split
   (``data/cifs`` + ``data/split/train.csv``) and, when ``generate.mp_structures`` > 0, a seeded sample
   of the Materials Project shards. The leakage rule is :func:`xrdvision.data.peaklists.cod_reference`'s:
   no structure whose reduced formula is that of a COD validation or test structure contributes;
2. fits the statistics and writes them to ``stats.json`` (readable; says which pooling level each
   space group used);
3. draws ``generate.n_crystals`` crystals in shards of ``generate.shard_size`` (each shard its own
   seeded stream, so the first 10^3 crystals of a 10^5 run are the 10^3 run's), simulates them with the
   batch simulator (:mod:`xrdvision.crystal.powder`, K-alpha1, plane normals) and labels every crystal
   with spglib at ``labels.symprec``: the label is the detected space group (relabel, never reject:
   special positions and lattice coincidences can raise the symmetry), the drawn one is kept as
   ``source_space_group``, and the share that differ is the mismatch rate in ``summary.json``;
4. writes shards as :mod:`xrdvision.formats.peaklists` files ``synth-00000.npz`` ... ; a crystal that is
   not generated (no draw fits ``max_atoms`` / ``min_distance``) or not simulated is listed in the
   shard's ``failed_ids`` / ``failed_reasons`` with one line, never dropped silently.

Resume: as ``peaklists``: shards are built in a work folder outside the DVC output and kept while their
``plan`` (digest of the statistics, settings, code and library versions) holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.crystal.powder import PowderSettings, simulate_batch
from xrdvision.data.generate_inputs import fit, training_sets
from xrdvision.data.generate_report import stage_metrics
from xrdvision.data.generator_sample import Sampler
from xrdvision.data.generator_tables import GroupTable, group_tables
from xrdvision.data.mp_source import mp_labels, reduced_formula
from xrdvision.data.peaklists import powder_settings
from xrdvision.data.peaklists_report import summarise
from xrdvision.data.shard_runner import run_tasks
from xrdvision.errors import XrdVisionError
from xrdvision.formats.atomic import write_json
from xrdvision.formats.peaklists import (
    SHARD_PATTERN,
    PeakListShard,
    shard_bytes,
    shard_plan,
    write_shard_bytes,
)

log = logging.getLogger(__name__)

SOURCE = "synth"
FORMAT_VERSION = 1
SEED_STREAM = 0x5359  # "SY": the generator's own random stream
_CONTENT_CODE = (
    "xrdvision.crystal.bragg",
    "xrdvision.crystal.form_factors",
    "xrdvision.crystal.powder",
    "xrdvision.crystal.powder_input",
    "xrdvision.data.generator_tables",
    "xrdvision.data.generator_sample",
    "xrdvision.data.generate",
    "xrdvision.data.mp_source",
    "xrdvision.formats.peaklists",
)


@dataclass(frozen=True)
class GenerateTask:
    """One output shard: crystals ``start .. start + count - 1`` of the run."""

    name: str
    index: int
    start: int
    count: int
    stats: str  # the statistics file's JSON text (each worker builds its own Sampler)
    settings: PowderSettings
    seed: int
    prior: str
    max_atoms: int
    min_distance: float
    symprec: float
    angle_tolerance: float
    plan: str
    # The Wyckoff tables (1.5 MB), built once by the caller: a fresh worker would spend 2-4 s of CPU on
    # PyXtal's import and Group objects. Not part of the plan (the code digest has PyXtal's version).
    tables: Mapping[int, GroupTable] | None = field(default=None, repr=False, compare=False)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def code_digest() -> str:
    """sha256 of the code that decides a shard's content and of the numpy, spglib, pyxtal versions."""
    import pyxtal
    import spglib

    h = hashlib.sha256()
    for name in _CONTENT_CODE:
        h.update(Path(str(importlib.import_module(name).__file__)).read_bytes())
    h.update(f"numpy {np.__version__} spglib {spglib.__version__} pyxtal {pyxtal.__version__}".encode())
    return h.hexdigest()


def plan_tasks(params: Params, stats_text: str) -> list[GenerateTask]:
    """The output shards of ``generate.n_crystals`` crystals, ``generate.shard_size`` at a time."""
    g, settings = params.generate, powder_settings(params)
    common = {
        "format": FORMAT_VERSION,
        "code": code_digest(),
        "stats": hashlib.sha256(stats_text.encode()).hexdigest(),
        "settings": [settings.wavelength, settings.two_theta_min, settings.two_theta_max, True],
        "seed": params.seed,
        "prior": g.prior,
        "max_atoms": g.max_atoms,
        "min_distance": g.min_distance,
        "labels": [params.labels.symprec, params.labels.angle_tolerance],
        "shard_size": g.shard_size,
    }
    tasks = []
    tables = group_tables()
    for index, start in enumerate(range(0, g.n_crystals, g.shard_size)):
        count = min(g.shard_size, g.n_crystals - start)
        name = SHARD_PATTERN.format(source=SOURCE, index=index).removesuffix(".npz")
        plan = _digest({**common, "index": index, "count": count})
        tasks.append(
            GenerateTask(
                name,
                index,
                start,
                count,
                stats_text,
                settings,
                params.seed,
                g.prior,
                g.max_atoms,
                g.min_distance,
                params.labels.symprec,
                params.labels.angle_tolerance,
                plan,
                tables,
            )
        )
    return tasks


def draw_crystals(sampler: Sampler, task: GenerateTask) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The task's crystals (records) and ``(id, reason)`` of those that could not be drawn."""
    rng = np.random.default_rng([task.seed, SEED_STREAM, task.index])
    prior = np.cumsum(sampler.space_group_prior(task.prior))
    groups = np.minimum(np.searchsorted(prior, rng.random(task.count) * prior[-1], side="right"), 229) + 1
    records, failed = [], []
    for k, sg in enumerate(groups):
        name = f"synth-{task.start + k:08d}"
        rec = sampler.crystal(int(sg), rng, name)
        if rec is None:
            failed.append((name, f"{name}: no draw of space group {sg} fits max_atoms and min_distance"))
        else:
            records.append(rec)
    return records, failed


def build_shard(task: GenerateTask) -> tuple[bytes, float]:
    """Worker: draw, simulate, label one shard; its file's bytes and the worker's peak RSS (MB)."""
    import resource

    sampler = Sampler(
        json.loads(task.stats), task.max_atoms, task.min_distance, source="stats.json", tables=task.tables
    )
    records, failed = draw_crystals(sampler, task)
    batch = simulate_batch(records, task.settings, source=SOURCE)
    keep, labels = [], []
    for i, rec in enumerate(records):
        reason = batch.errors.get(i)
        if reason is None:
            try:
                labels.append(mp_labels(rec, task.symprec, task.angle_tolerance))
                keep.append(i)
                continue
            except ValueError as exc:
                reason = f"{rec['id']}: {exc}"
        failed.append((rec["id"], reason))
    failed.sort()
    counts = np.diff(batch.offsets)[keep] if keep else np.zeros(0, np.int64)
    parts = [np.arange(batch.offsets[i], batch.offsets[i + 1]) for i in keep]
    idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    shard = PeakListShard(
        ids=[records[i]["id"] for i in keep],
        reduced_formula=[reduced_formula(records[i]["species"]) for i in keep],
        crystal_system=[cs for _, cs in labels],
        space_group=np.array([sg for sg, _ in labels], dtype=np.int16),
        source_space_group=np.array([records[i]["sg"] for i in keep], dtype=np.int16),
        icsd=np.zeros(len(keep), dtype=bool),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        two_theta=batch.two_theta[idx].astype(np.float32),
        intensity=batch.intensity[idx].astype(np.float32),
        failed_ids=[f[0] for f in failed],
        failed_reasons=[f[1] for f in failed],
        source=SOURCE,
        wavelength=float(task.settings.wavelength),
        plan=task.plan,
        normal=batch.normal[idx] if batch.normal is not None else None,
    )
    return shard_bytes(shard), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _clean(folder: Path, keep: set[str]) -> None:
    """Remove a killed run's temp files and shards that are not in the plan."""
    for p in folder.glob(".*.tmp"):
        p.unlink(missing_ok=True)
    for p in folder.glob(f"{SOURCE}-*.npz"):
        if p.name not in keep:
            p.unlink()


def run_generate(
    params: Params,
    cif_dir: Path,
    split_dir: Path,
    patterns_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    plots_dir: Path,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/{stats.json, synth-NNNNN.npz, manifest.csv, summary.json}``, the realism check
    (``metrics_path``, ``plots_dir/<quantity>.csv``); returns the summary.

    Shards are built in ``work_dir`` (default ``out_dir``) and moved in when all are there: the CLI's
    ``data/cache/generate`` survives ``dvc exp run`` clearing an output its lock does not know yet, so
    an interrupted experiment resumes.
    """
    out_dir, work_dir = Path(out_dir), Path(work_dir) if work_dir is not None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = params.generate
    base: dict[str, Any] = {
        "source": SOURCE,
        "format": FORMAT_VERSION,
        "params": {
            "seed": params.seed,
            "split.train_sources": list(params.split.train_sources),
            "generate": _asdict(g),
        },
    }
    if g.n_crystals == 0:
        _clean(out_dir, set())
        (out_dir / "stats.json").unlink(missing_ok=True)
        summary = {**base, "enabled": False, "reason": "generate.n_crystals is 0", "n_structures": 0}
        write_json(out_dir / "summary.json", summary)
        write_json(metrics_path, {"n_crystals": 0})
        return summary
    t0 = time.perf_counter()
    chunks, info = training_sets(params, Path(cif_dir), Path(split_dir), Path(patterns_dir) / "manifest.csv")
    stats = fit(params, chunks, info)
    stats_text = json.dumps(stats, indent=1) + "\n"
    Sampler(stats, g.max_atoms, g.min_distance, source=str(out_dir / "stats.json"))  # fails early if unusable
    fit_s = time.perf_counter() - t0
    log.info(
        "generate: statistics fitted on %s structures in %.0f s; levels %s",
        stats["sources"],
        fit_s,
        stats["levels_used"],
    )
    tasks = plan_tasks(params, stats_text)
    files = {t.name: out_dir / f"{t.name}.npz" for t in tasks}
    built = {t.name: work_dir / f"{t.name}.npz" for t in tasks}
    names = {p.name for p in files.values()}
    _clean(out_dir, names)
    work_dir.mkdir(parents=True, exist_ok=True)
    _clean(work_dir, names)
    todo = [t for t in tasks if t.plan not in (shard_plan(files[t.name]), shard_plan(built[t.name]))]
    if len(todo) < len(tasks):
        log.info("generate: resuming: %d of %d shards already done", len(tasks) - len(todo), len(tasks))
    t1 = time.perf_counter()
    peak_rss = _run(params, todo, built, len(tasks))
    gen_s = time.perf_counter() - t1
    for t in tasks:
        if built[t.name] != files[t.name] and built[t.name].exists() and shard_plan(built[t.name]) == t.plan:
            os.replace(built[t.name], files[t.name])
    if work_dir != out_dir:
        with contextlib.suppress(OSError):
            work_dir.rmdir()
    from xrdvision.formats.atomic import write_text

    write_text(out_dir / "stats.json", stats_text)
    counts = {
        "n_drawn": g.n_crystals,
        "fit": {"sources": stats["sources"], "levels_used": stats["levels_used"]},
    }
    summary = summarise(out_dir, [files[t.name] for t in tasks], base, counts, [])
    summary["mismatch_rate"] = summary.get("labels", {}).get("disagreement_rate")
    write_json(out_dir / "summary.json", summary)
    metrics = stage_metrics(
        params, stats, summary, [files[t.name] for t in tasks], Path(patterns_dir), split_dir, plots_dir
    )
    write_json(metrics_path, metrics)
    summary["timing"] = {
        "fit_s": round(fit_s, 1),
        "generate_s": round(gen_s, 1),
        "n_built": sum(t.count for t in todo),
        "peak_rss_mb": round(peak_rss),
    }
    return summary


def _asdict(section: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(section)


def _run(params: Params, todo: list[GenerateTask], files: dict[str, Path], n_tasks: int) -> float:
    """Build the shards; write each as it arrives; fail at the end if any failed. Returns peak RSS (MB)."""
    if not todo:
        return 0.0
    g = params.generate
    total, done, t0, peak = sum(t.count for t in todo), 0, time.perf_counter(), 0.0
    failures: list[str] = []
    outcomes = run_tasks(
        build_shard,
        todo,
        scheduler=g.scheduler,
        workers=g.workers,
        key=lambda t: f"xrdvision-generate-{t.name}-{t.plan[:16]}",
    )
    for task, result, error in outcomes:
        if error is not None:
            failures.append(f"{task.name}: {error}")
            log.warning("generate: %s failed: %s", task.name, error)
            continue
        data, rss = result
        peak = max(peak, rss)
        write_shard_bytes(files[task.name], data)
        done += task.count
        elapsed = time.perf_counter() - t0
        log.info(
            "generate: %s written; %d/%d crystals, %.0f s, %.0f crystals/s, ~%.0f s left",
            task.name,
            done,
            total,
            elapsed,
            done / elapsed,
            elapsed / done * (total - done),
        )
    if failures:
        raise XrdVisionError(
            f"generate: {len(failures)} of {len(todo)} shards failed ({failures[0]}); the others are written "
            "and a rerun builds only the missing ones"
        )
    return peak


def summary_line(s: dict[str, Any]) -> str:
    """The CLI's one line about a run."""
    if not s.get("enabled"):
        return f"generate: off ({s['reason']})"
    t = s.get("timing", {})
    return (
        f"generate: {s['n_structures']} of {s['n_drawn']} crystals simulated in {len(s['shards'])} shards "
        f"({s['bytes'] / 1e6:.1f} MB), {s['n_failed']} failed; spglib's space group differs from the drawn "
        f"one for {s['mismatch_rate']:.2%} (relabelled); fit on {s['fit']['sources']} structures, levels "
        f"{s['fit']['levels_used']}; fit {t.get('fit_s', 0):.0f} s, {t.get('n_built', 0)} built in "
        f"{t.get('generate_s', 0):.0f} s"
    )
