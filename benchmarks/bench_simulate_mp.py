"""The Materials Project half of bench_simulate.py: the batch simulator, pymatgen's ``XRDCalculator``
and xrayutilities on the same structures, and the whole set in shards.

Why a module of its own: bench_simulate.py keeps its COD comparison of the per-CIF simulator; this
holds what runs in worker processes (picklable top-level functions) for the issue-15 figures. Every
simulator builds its own structure object from the arrays inside the timed call (pymatgen a
``Structure``, xrayutilities a P1 ``SGLattice``), since that is what using it on this data costs.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import time
import warnings
from pathlib import Path
from typing import Any

from bench_simulate import pymatgen_peaks


def _quiet() -> None:
    warnings.simplefilter("ignore")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batch_chunk(records: list[dict[str, Any]]) -> tuple[int, float]:
    """One task of the batch simulator: (lines, this worker's peak RSS in MB)."""
    from xrdvision.crystal.powder import simulate_batch

    return len(simulate_batch(records).two_theta), _rss_mb()


def _mp_structure(rec: dict[str, Any]) -> Any:
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice.from_parameters(*rec["cell"]), rec["species"], rec["frac"])


def _pymatgen_record(rec: dict[str, Any]) -> tuple[int, float]:
    return len(pymatgen_peaks(_mp_structure(rec))[0]), _rss_mb()


def _xrayutilities_record(rec: dict[str, Any]) -> tuple[int, float]:
    from accuracy_powder import xrayutilities_lines

    return len(xrayutilities_lines(rec)[0]), _rss_mb()


def _warm_mp() -> None:
    _quiet()
    import pymatgen.analysis.diffraction.xrd  # noqa: F401
    import xrayutilities  # noqa: F401

    from xrdvision.crystal.form_factors import form_factor_table

    form_factor_table()


def _shard_task(path: str) -> dict[str, Any]:
    """A whole shard: decompress, parse, simulate; the seconds of each step and the peak RSS."""
    import lzma

    from xrdvision.crystal.powder import simulate_batch

    t0 = time.perf_counter()
    with lzma.open(path, "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    t1, c1 = time.perf_counter(), time.process_time()
    batch = simulate_batch(records, source=Path(path).name)
    t2, c2 = time.perf_counter(), time.process_time()
    return {
        "shard": Path(path).name,
        "n": len(records),
        "errors": list(batch.errors.values()),
        "lines": len(batch.two_theta),
        "read_s": t1 - t0,
        "simulate_s": t2 - t1,
        "simulate_cpu_s": c2 - c1,
        "rss_mb": _rss_mb(),
    }


def _pool(workers: int) -> Any:
    return multiprocessing.get_context("forkserver").Pool(workers, initializer=_warm_mp)


def mp_rates(records: list[dict[str, Any]], n_ref: int, workers: int) -> dict[str, Any]:
    """Structures/s of the three simulators on the same Materials Project records (see module doc)."""
    from xrdvision.crystal.powder import simulate_batch

    ref = records[:n_ref]
    simulate_batch(records[:5])
    serial: dict[str, float] = {}
    for name, fn, items in (
        ("batch", lambda r: simulate_batch(r), [records]),
        ("batch_same_as_reference", lambda r: simulate_batch(r), [ref]),
        ("pymatgen", _pymatgen_record, ref),
        ("xrayutilities", _xrayutilities_record, ref),
    ):
        fn(items[0])  # warm-up
        c0 = time.process_time()
        for item in items:
            fn(item)
        n = len(records) if name == "batch" else len(ref)
        serial[name] = n / (time.process_time() - c0)
    parallel: dict[str, float] = {}
    rss = {}
    chunks = [records[i : i + 25] for i in range(0, len(records), 25)]
    for name, fn, items, n in (
        ("batch", _batch_chunk, chunks, len(records)),
        ("pymatgen", _pymatgen_record, ref, len(ref)),
        ("xrayutilities", _xrayutilities_record, ref, len(ref)),
    ):
        with _pool(workers) as pool:
            pool.map(fn, items[:workers], chunksize=1)  # imports, form-factor tables, caches
            t0 = time.perf_counter()
            out = pool.map(fn, items, chunksize=1)
            parallel[name] = n / (time.perf_counter() - t0)
            rss[name] = max(r for _, r in out)
    return {
        "n": len(records),
        "n_reference": len(ref),
        "structures_per_s": parallel,
        "structures_per_cpu_s": serial,
        "peak_rss_mb_per_worker": rss,
        "batch_over_pymatgen": {
            "wall": parallel["batch"] / parallel["pymatgen"],
            "cpu_same_structures": serial["batch_same_as_reference"] / serial["pymatgen"],
        },
    }


def mp_all(shard_dir: Path, workers: int) -> dict[str, Any]:
    """All shards, one per task, biggest first; wall time, summed step times, peak RSS per worker."""
    shards = sorted(shard_dir.glob("structures-*.jsonl.xz"), key=lambda p: -p.stat().st_size)
    t0 = time.perf_counter()
    with _pool(workers) as pool:
        done = list(pool.imap_unordered(_shard_task, [str(p) for p in shards]))
    wall = time.perf_counter() - t0
    n = sum(d["n"] for d in done)
    errors = [e for d in done for e in d["errors"]]
    return {
        "n": n,
        "n_errors": len(errors),
        "errors": errors[:20],
        "lines": sum(d["lines"] for d in done),
        "wall_s": wall,
        "structures_per_s": n / wall,
        "read_s_total": sum(d["read_s"] for d in done),
        "simulate_s_total": sum(d["simulate_s"] for d in done),
        "simulate_cpu_s_total": sum(d["simulate_cpu_s"] for d in done),
        "peak_rss_mb_per_worker": max(d["rss_mb"] for d in done),
        "shards": sorted(done, key=lambda d: d["shard"]),
    }
