"""Benchmark: our xrayutilities peak list vs pymatgen's XRDCalculator (and stock xrayutilities).

    .venv/bin/python benchmarks/bench_simulate.py [--n 60] [--workers 2] [--stock 20]

On the same seeded sample of COD CIFs (stratified over the 7 crystal systems), it times
(a) ``xrdvision.crystal.diffraction.simulate_peaks`` (including its own spglib call) and (b) pymatgen's
``XRDCalculator(wavelength=1.5406).get_pattern`` on the same parsed structure: per-CIF serial medians,
and patterns/s over ``--workers`` processes (CIF parse + peak list, the way the stage runs). A smaller
subset also runs stock xrayutilities (``Crystal.fromCIF`` + ``PowderDiffraction(...,
enable_simulation=False)``, with the name fix and the pymatgen CifWriter fallback from FINDINGS.md).
It prints a table, the ratio ours/pymatgen, and how well the peak positions agree (top 10 pymatgen
peaks matched to ours), and writes the figures to benchmarks/results/bench_simulate.json.

The batch simulator (``xrdvision.crystal.powder.simulate_batch``, issue 15) is measured in the same run
on ``--mp`` seeded Materials Project structures (arrays from ../shared/mp, no CIF): structures/s over
``--workers`` processes (wall clock) and per CPU-second in one process (what a busy shared machine
cannot blur), against pymatgen's ``XRDCalculator`` and xrayutilities' ``PowderDiffraction`` (P1 lattice
from the same arrays) on the first ``--mp-ref`` of them, each including building its own structure
object from the arrays. Peak RSS is the largest of the batch worker processes (which also import
pymatgen and xrayutilities for the references: about 240 MB of it). ``--all`` also runs all 154,925
structures, one shard of 10,000 per task (read, parse, simulate), and reports wall and CPU time.
``--skip-cod`` leaves out the COD part. Keys: ``batch_structures_per_s``, ``pymatgen_structures_per_s``,
``xrayutilities_structures_per_s``, ``peak_rss_mb`` (plus the ``mp`` and ``mp_all`` details).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
COD = Path(os.environ.get("XRDVISION_SHARED", ROOT.parent / "shared")) / "cod"
RESULTS = ROOT / "benchmarks" / "results" / "bench_simulate.json"
SYSTEMS = ("triclinic", "monoclinic", "orthorhombic", "tetragonal", "trigonal", "hexagonal", "cubic")
WAVELENGTH = 1.5406


def sample(n: int, seed: int, max_atoms: int) -> list[Path]:
    """``n`` CIFs, as even as possible over the 7 crystal systems (INDEX.csv), seeded."""
    with open(COD / "INDEX.csv", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["n_atoms_in_cell"]) <= max_atoms]
    rng = random.Random(seed)
    by_system = {s: sorted(r["cod_id"] for r in rows if r["crystal_system"] == s) for s in SYSTEMS}
    for ids in by_system.values():
        rng.shuffle(ids)
    picked: list[str] = []
    while len(picked) < n and any(by_system.values()):
        for s in SYSTEMS:
            if by_system[s] and len(picked) < n:
                picked.append(by_system[s].pop())
    return [COD / f"{i}.cif" for i in sorted(picked)]


def _quiet() -> None:
    warnings.simplefilter("ignore")


def read(path: Path) -> Any:
    from xrdvision.crystal.labels import read_structure

    return read_structure(path)


def ours(structure: Any) -> tuple[np.ndarray, np.ndarray]:
    from xrdvision.crystal.diffraction import simulate_peaks

    p = simulate_peaks(structure, WAVELENGTH, 5.0, 90.0)
    return p.two_theta, p.intensity


def pymatgen_peaks(structure: Any) -> tuple[np.ndarray, np.ndarray]:
    from pymatgen.analysis.diffraction.xrd import XRDCalculator

    pattern = XRDCalculator(wavelength=WAVELENGTH).get_pattern(structure, two_theta_range=(5, 90))
    return np.asarray(pattern.x), np.asarray(pattern.y) / 100


def stock_xrayutilities(path: Path) -> int:
    """xrayutilities' own route; returns the number of lines (raises if both readers fail)."""
    import xrayutilities as xu

    with contextlib.redirect_stdout(io.StringIO()):
        try:
            crystal = xu.materials.Crystal.fromCIF(str(path))
        except Exception:
            from pymatgen.io.cif import CifWriter

            text = str(CifWriter(read(path)))
            crystal = xu.materials.Crystal.fromCIF(text)  # CIF content as a string
        crystal.name = f"cod_{path.stem}"
        powder = xu.simpack.PowderDiffraction(
            crystal, en=xu.utilities.lam2en(WAVELENGTH), tt_cutoff=90, enable_simulation=False
        )
    return len(powder.data)


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def _end_to_end_ours(path: Path) -> int:
    try:
        return len(ours(read(path))[0])
    except ValueError:
        return 0


def _end_to_end_pymatgen(path: Path) -> int:
    try:
        return len(pymatgen_peaks(read(path))[0])
    except ValueError:
        return 0


def _warm(_: int) -> int:
    _quiet()
    import pymatgen.analysis.diffraction.xrd  # noqa: F401
    import xrayutilities  # noqa: F401

    from xrdvision.crystal import diffraction  # noqa: F401

    return os.getpid()


def throughput(fn: Any, paths: list[Path], workers: int) -> float:
    """Patterns per second over ``workers`` processes (start-up and imports not counted)."""
    ctx = multiprocessing.get_context("forkserver")
    with ctx.Pool(workers, initializer=_quiet) as pool:
        pool.map(_warm, range(workers * 2))
        pool.map(fn, paths[:workers])  # first-call caches (form-factor database, spglib)
        t0 = time.perf_counter()
        pool.map(fn, paths, chunksize=1)
        return len(paths) / (time.perf_counter() - t0)


def _merge(tt: np.ndarray, inten: np.ndarray, tol: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    from xrdvision.crystal.diffraction import merge_lines

    t, i, _ = merge_lines(tt.astype(float), inten.astype(float), np.zeros((tt.size, 3), int), tol)
    return t, i / i.max()


def agreement(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Max |2-theta| deviation of pymatgen's 10 strongest peaks from our nearest, and the intensity
    correlation of those pairs; both lists merged at 0.01 degree first (each calculator splits
    pseudo-equivalent lines its own way; at a 0.1-degree peak width they are one peak)."""
    tt, ii = _merge(*a)
    rt, ri = _merge(*b)
    top = np.argsort(-ri)[:10]
    idx = np.array([np.argmin(np.abs(tt - rt[k])) for k in top])
    dev = float(np.abs(tt[idx] - rt[top]).max())
    corr = float(np.corrcoef(ri[top], ii[idx])[0, 1]) if top.size >= 3 else 1.0
    return dev, corr


def mp_part(args: argparse.Namespace) -> dict[str, Any]:
    """The batch simulator against pymatgen and xrayutilities on Materials Project arrays."""
    from accuracy_powder import MP, mp_records
    from bench_simulate_mp import mp_all, mp_rates

    records = mp_records(args.mp, args.seed)
    res = mp_rates(records, args.mp_ref, args.workers)
    out: dict[str, Any] = {
        "batch_structures_per_s": res["structures_per_s"]["batch"],
        "pymatgen_structures_per_s": res["structures_per_s"]["pymatgen"],
        "xrayutilities_structures_per_s": res["structures_per_s"]["xrayutilities"],
        "peak_rss_mb": res["peak_rss_mb_per_worker"]["batch"],
        "mp": res,
    }
    print(
        f"{res['n']} Materials Project structures (seed {args.seed}); "
        f"pymatgen and xrayutilities on the first {res['n_reference']}"
    )
    print(f"{'':24s}{f'per s, {args.workers} processes':>24s}{'per CPU-second':>18s}{'peak RSS MB':>14s}")
    for name in ("batch", "pymatgen", "xrayutilities"):
        print(
            f"{name:24s}{res['structures_per_s'][name]:24.1f}{res['structures_per_cpu_s'][name]:18.1f}"
            f"{res['peak_rss_mb_per_worker'][name]:14.0f}"
        )
    ratio = res["batch_over_pymatgen"]
    print(
        f"batch / pymatgen: {ratio['wall']:.1f}x (wall), "
        f"{ratio['cpu_same_structures']:.1f}x (CPU time, same structures)"
    )
    if args.all:
        full = mp_all(MP, args.workers)
        out["mp_all"] = full
        out["peak_rss_mb"] = max(out["peak_rss_mb"], full["peak_rss_mb_per_worker"])
        print(
            f"all {full['n']} structures in {full['wall_s']:.0f} s ({full['structures_per_s']:.0f}/s, "
            f"{args.workers} processes; read {full['read_s_total']:.0f} s + simulate "
            f"{full['simulate_s_total']:.0f} s summed over processes; simulate CPU time "
            f"{full['simulate_cpu_s_total']:.0f} s), {full['n_errors']} errors, "
            f"peak RSS {full['peak_rss_mb_per_worker']:.0f} MB per process"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60, help="CIFs in the sample (default 60)")
    ap.add_argument("--workers", type=int, default=2, help="processes for the throughput run (default 2)")
    ap.add_argument("--stock", type=int, default=20, help="CIFs for stock xrayutilities (0: skip)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--max-atoms", type=int, default=1000, help="leave out bigger cells (pymatgen takes minutes on 6400)"
    )
    ap.add_argument(
        "--mp", type=int, default=500, help="Materials Project structures for the batch simulator"
    )
    ap.add_argument("--mp-ref", type=int, default=100, help="of them, for pymatgen and xrayutilities too")
    ap.add_argument("--all", action="store_true", help="also all 154,925 Materials Project structures")
    ap.add_argument("--skip-cod", action="store_true", help="only the Materials Project part")
    args = ap.parse_args()
    _quiet()
    res = {} if args.skip_cod else cod_part(args)
    res.update(mp_part(args))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    from xrdvision.formats.atomic import write_json

    write_json(RESULTS, res)
    print(f"wrote {RESULTS.relative_to(ROOT)}")


def cod_part(args: argparse.Namespace) -> dict[str, Any]:
    """The per-CIF simulator against pymatgen and stock xrayutilities on COD CIFs (see module doc)."""
    paths = sample(args.n, args.seed, args.max_atoms)
    structures = [read(p) for p in paths]
    ours(structures[0]), pymatgen_peaks(structures[0])  # warm-up: imports, database, caches

    t_ours, t_pmg, devs, corrs, rows, skipped = [], [], [], [], [], []
    for path, s in zip(paths, structures, strict=True):
        try:
            a_s, a = _timed(ours, s)
            b_s, b = _timed(pymatgen_peaks, s)
        except ValueError as exc:  # e.g. pymatgen has no scattering factors for a dummy atom "X"
            skipped.append(f"{path.stem}: {exc}")
            continue
        dev, corr = agreement(a, b)
        t_ours.append(a_s)
        t_pmg.append(b_s)
        devs.append(dev)
        corrs.append(corr)
        rows.append({"cod_id": path.stem, "n_atoms": len(s), "ours_s": a_s, "pymatgen_s": b_s, "dev": dev})

    stock_paths = [p for p, s in zip(paths, structures, strict=True) if len(s) <= 300][: args.stock]
    t_stock, t_ours_sub, stock_failed = [], [], 0
    for p, s in zip(paths, structures, strict=True):
        if p not in stock_paths:
            continue
        try:
            t_stock.append(_timed(stock_xrayutilities, p)[0])
            t_ours_sub.append(_timed(ours, s)[0])
        except Exception:
            stock_failed += 1

    tp_ours = throughput(_end_to_end_ours, paths, args.workers)
    tp_pmg = throughput(_end_to_end_pymatgen, paths, args.workers)

    med_o, med_p = statistics.median(t_ours), statistics.median(t_pmg)
    res: dict[str, Any] = {
        "n": len(paths),
        "skipped": skipped,
        "seed": args.seed,
        "max_atoms": args.max_atoms,
        "workers": args.workers,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "serial_median_s": {"ours": med_o, "pymatgen": med_p},
        "serial_total_s": {"ours": sum(t_ours), "pymatgen": sum(t_pmg)},
        "serial_p90_s": {
            "ours": float(np.percentile(t_ours, 90)),
            "pymatgen": float(np.percentile(t_pmg, 90)),
        },
        "ratio_ours_over_pymatgen": {"median": med_o / med_p, "total": sum(t_ours) / sum(t_pmg)},
        "patterns_per_s": {"ours": tp_ours, "pymatgen": tp_pmg, "note": "CIF parse + peak list per pattern"},
        "stock_xrayutilities": {
            "n": len(t_stock),
            "failed": stock_failed,
            "median_s": statistics.median(t_stock) if t_stock else None,
            "ours_median_s_same_cifs": statistics.median(t_ours_sub) if t_ours_sub else None,
        },
        "agreement_with_pymatgen": {
            "top10_position_dev_max_deg": max(devs),
            "top10_position_dev_median_deg": statistics.median(devs),
            "top10_intensity_corr_min": min(corrs),
            "top10_intensity_corr_median": statistics.median(corrs),
        },
        "per_cif": rows,
    }

    print(f"{len(paths)} COD CIFs (seed {args.seed}, <= {args.max_atoms} sites), {res['machine']}")
    for line in skipped:
        print(f"  left out of the serial comparison: {line}")
    print(f"{'':30s}{'ours':>12s}{'pymatgen':>12s}{'ours/pmg':>10s}")
    print(f"{'serial median (s/CIF)':30s}{med_o:12.4f}{med_p:12.4f}{med_o / med_p:10.2f}")
    p90o, p90p = res["serial_p90_s"]["ours"], res["serial_p90_s"]["pymatgen"]
    print(f"{'serial p90 (s/CIF)':30s}{p90o:12.4f}{p90p:12.4f}{p90o / p90p:10.2f}")
    print(f"{'serial total (s)':30s}{sum(t_ours):12.2f}{sum(t_pmg):12.2f}{sum(t_ours) / sum(t_pmg):10.2f}")
    print(
        f"{f'patterns/s, {args.workers} processes':30s}{tp_ours:12.1f}{tp_pmg:12.1f}{tp_pmg / tp_ours:10.2f}"
    )
    st = res["stock_xrayutilities"]
    if t_stock:
        print(
            f"stock xrayutilities on {st['n']} of them (<= 300 sites): median {st['median_s']:.4f} s/CIF "
            f"vs ours {st['ours_median_s_same_cifs']:.4f} s ({st['failed']} failed to read)"
        )
    ag = res["agreement_with_pymatgen"]
    print(
        f"peak positions vs pymatgen (top 10): max dev {ag['top10_position_dev_max_deg']:.2e} deg, "
        f"median {ag['top10_position_dev_median_deg']:.2e} deg; intensity corr min "
        f"{ag['top10_intensity_corr_min']:.4f}, median {ag['top10_intensity_corr_median']:.5f}"
    )
    return res


if __name__ == "__main__":
    main()
