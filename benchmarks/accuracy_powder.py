"""Accuracy of the batch simulator (``xrdvision.crystal.powder``) against xrayutilities, line by line.

    nice -n 10 .venv/bin/python benchmarks/accuracy_powder.py [--mp 200] [--seed 0] [--cod-xu-max-sites 1000]

Why a script of its own: the issue's acceptance figure (line positions within 0.01 degree, relative
intensities within 2 % for every line above 1 % of the strongest) needs xrayutilities itself, which
takes minutes on a few hundred structures: too slow for the test suite, which checks a handful.

* Materials Project: ``--mp`` structures drawn with ``--seed`` from all 154,925 of ../shared/mp.
  Reference: xrayutilities' ``PowderDiffraction`` on an ``SGLattice`` in P1 built from the same
  arrays (Debye-Waller factors 0), Cu K-alpha1, 2-theta to 90 degrees.
* COD: the 852 CIFs of ../shared/cod, read once with pymatgen into arrays (partial occupancies and
  oxidation states kept, dummy atoms dropped, as ``simulate`` does). Reference: xrayutilities the
  same way for those with at most ``--cod-xu-max-sites`` atoms in P1, and for all of them the
  project's per-CIF ``simulate_peaks`` (itself tested against xrayutilities in tests/test_simulate.py).

COD records that the simulator's overlap check rejects (atoms closer than 0.5 A with occupancies above
1 in sum: 15 of 852) are listed, and compared with the check off (``min_distance=0``), since the
per-CIF simulator takes them as they are.

Both reference lists are merged at the simulator's 1e-3 degree (xrayutilities merges at a relative
1e-5 in q, which leaves near-coincident lines apart), cut to 5-90 degrees and scaled to a maximum of 1.
Every reference line above 1 % must have one of ours within 0.01 degree and within 0.02 in relative
intensity, and every line of ours above 1 % a reference line within 0.01 degree. Writes
benchmarks/results/accuracy_powder.json with the worst cases.

Two known deviations are xrayutilities' (measured with this script, seed 0): COD 9012705 (C, a
rhombohedral cell with 39.5-degree angles) has a line at 87.33 degrees (1.4 %) that xrayutilities
misses, because ``SGLattice.get_allowed_hkl`` fills the sphere of reflections by unit steps from the
origin and stops at its surface, which in so acute a cell does not reach every point; and in COD 2002617
(Ni2+ and Ni3+) xrayutilities gives every Ni the first ion's form factor (``Crystal._get_f`` caches
by atomic number), 1 % off on one line. The per-CIF simulator agrees with ours on both.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import lzma
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED = Path(os.environ.get("XRDVISION_SHARED", ROOT.parent / "shared"))
MP = SHARED / "mp"
COD = SHARED / "cod"
RESULTS = ROOT / "benchmarks" / "results" / "accuracy_powder.json"
PER_SHARD = 10_000  # ../shared/mp/README.md: 10,000 structures per shard, in INDEX.csv order
STRONG = 0.01  # lines above 1 % of the strongest are compared
POS_TOL = 0.01  # degrees
INT_TOL = 0.02  # relative intensity (fraction of the strongest line)


def mp_records(n: int, seed: int, shard_dir: Path = MP) -> list[dict[str, Any]]:
    """``n`` Materials Project records drawn at random (``seed``) from all shards, in INDEX order."""
    with open(shard_dir / "INDEX.csv", encoding="utf-8") as fh:
        ids = [row["id"] for row in csv.DictReader(fh)]
    picked = sorted(random.Random(seed).sample(range(len(ids)), min(n, len(ids))))
    by_shard: dict[int, list[int]] = {}
    for i in picked:
        by_shard.setdefault(i // PER_SHARD, []).append(i % PER_SHARD)
    out = []
    for shard, lines in sorted(by_shard.items()):
        wanted, last = set(lines), max(lines)
        with lzma.open(shard_dir / f"structures-{shard:02d}.jsonl.xz", "rt", encoding="utf-8") as fh:
            for j, line in enumerate(fh):
                if j in wanted:
                    out.append(json.loads(line))
                if j >= last:
                    break
    assert [r["id"] for r in out] == [ids[i] for i in picked], "INDEX.csv and the shards disagree"
    return out


def cod_structures(cod_dir: Path = COD) -> tuple[dict[str, Any], dict[str, str]]:
    """Every COD CIF read once with pymatgen (by COD id), and the unreadable ones with the reason."""
    from xrdvision.crystal.labels import read_structure

    structures, failed = {}, {}
    for path in sorted(cod_dir.glob("*.cif")):
        try:
            structures[path.stem] = read_structure(path)
        except Exception as exc:
            failed[path.stem] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return structures, failed


def xrayutilities_lines(record: dict[str, Any], wavelength: float = 1.5406) -> tuple[np.ndarray, np.ndarray]:
    """xrayutilities' own powder lines (2-theta, strength) of a record, built as a P1 lattice."""
    import xrayutilities as xu

    from xrdvision.crystal.form_factors import form_factor_table

    table = form_factor_table(wavelength)
    elements = xu.materials.elements
    atoms = [getattr(elements, table.names[table.lookup(s)]) for s in record["species"]]
    cell = np.asarray(record["cell"], dtype=float)
    if cell.shape == (3, 3):
        lengths = np.linalg.norm(cell, axis=1)
        cos = (
            [cell[1] @ cell[2], cell[0] @ cell[2], cell[0] @ cell[1]]
            / lengths[[1, 0, 0]]
            / lengths[[2, 2, 1]]
        )
        cell = np.concatenate([lengths, np.degrees(np.arccos(np.clip(cos, -1, 1)))])
    occ = record.get("occupancy") or [1.0] * len(atoms)
    with contextlib.redirect_stdout(io.StringIO()):
        lattice = xu.materials.SGLattice(
            1,
            *cell,
            atoms=atoms,
            pos=[("1a", tuple(p)) for p in record["frac"]],
            occ=occ,
            b=[0.0] * len(atoms),
        )
        crystal = xu.materials.Crystal(
            "s_" + "".join(c if c.isalnum() else "_" for c in record["id"]), lattice
        )
        powder = xu.simpack.PowderDiffraction(
            crystal, en=xu.utilities.lam2en(wavelength), tt_cutoff=90, enable_simulation=False
        )
    lines = np.array([(2 * v["ang"], v["r"]) for v in powder.data.values()]).reshape(-1, 2)
    return lines[:, 0], lines[:, 1]


def reference_list(two_theta: np.ndarray, strength: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A reference's lines merged at 1e-3 degree, cut to 5-90 degrees, scaled to a maximum of 1."""
    from xrdvision.crystal.powder import MERGE_TOL_DEG, merge_sorted

    order = np.argsort(two_theta, kind="stable")
    tt, inten, _ = merge_sorted(two_theta[order], strength[order], None, MERGE_TOL_DEG)
    keep = (tt >= 5.0) & (tt <= 90.0)
    tt, inten = tt[keep], inten[keep]
    return tt, inten / inten.max()


def compare(ours: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Worst position and intensity error over the reference lines above 1 %, and lines unmatched."""
    tt, inten = ours
    rtt, rint = ref
    strong = np.flatnonzero(rint > STRONG)
    near = np.abs(tt[None, :] - rtt[strong, None]).argmin(axis=1) if tt.size else np.zeros(0, int)
    dpos = np.abs(tt[near] - rtt[strong]) if tt.size else np.full(strong.size, np.inf)
    dint = np.abs(inten[near] - rint[strong]) if tt.size else np.ones(strong.size)
    mine = np.flatnonzero(inten > STRONG)
    back = np.abs(rtt[None, :] - tt[mine, None]).min(axis=1) if rtt.size else np.full(mine.size, np.inf)
    lonely = mine[back > POS_TOL]
    worst_pos = int(dpos.argmax()) if strong.size else -1
    worst_int = int(dint.argmax()) if strong.size else -1
    return {
        "n_lines": int(strong.size),
        "max_pos_dev": float(dpos.max()) if strong.size else 0.0,
        "pos_line": float(rtt[strong[worst_pos]]) if strong.size else None,
        "max_int_dev": float(dint.max()) if strong.size else 0.0,
        "int_line": float(rtt[strong[worst_int]]) if strong.size else None,
        "int_line_ref": float(rint[strong[worst_int]]) if strong.size else None,
        "max_rel_int_dev": float((dint / rint[strong]).max()) if strong.size else 0.0,
        "ours_unmatched": [[float(tt[i]), float(inten[i])] for i in lonely],
        "ok": bool((dpos <= POS_TOL).all() and (dint <= INT_TOL).all() and lonely.size == 0),
    }


def summarise(rows: dict[str, dict[str, Any]], label: str) -> dict[str, Any]:
    """Pass count and the five worst structures by position and by intensity."""
    good = {k: v for k, v in rows.items() if "error" not in v}
    by_pos = sorted(good, key=lambda k: -good[k]["max_pos_dev"])[:5]
    by_int = sorted(good, key=lambda k: -good[k]["max_int_dev"])[:5]
    out = {
        "n": len(rows),
        "n_compared": len(good),
        "n_pass": sum(v["ok"] for v in good.values()),
        "lines_compared": sum(v["n_lines"] for v in good.values()),
        "max_pos_dev_deg": max((v["max_pos_dev"] for v in good.values()), default=0.0),
        "max_int_dev": max((v["max_int_dev"] for v in good.values()), default=0.0),
        "median_int_dev": float(np.median([v["max_int_dev"] for v in good.values()])) if good else 0.0,
        "worst_pos": [{"id": k, **good[k]} for k in by_pos],
        "worst_int": [{"id": k, **good[k]} for k in by_int],
        "failed": [{k: v} for k, v in rows.items() if not v.get("ok", False)][:20],
    }
    print(
        f"{label}: {out['n_pass']}/{out['n_compared']} pass ({out['lines_compared']} lines > 1 %); "
        f"max |d2theta| {out['max_pos_dev_deg']:.2e} deg, max |dI| {out['max_int_dev']:.2e} "
        f"(median of per-structure max {out['median_int_dev']:.1e})"
    )
    for w in out["worst_int"][:3]:
        print(
            f"  worst intensity: {w['id']} line at {w['int_line']:.3f} deg (I_ref {w['int_line_ref']:.3f}): "
            f"|dI| {w['max_int_dev']:.2e}"
        )
    for w in out["worst_pos"][:3]:
        print(
            f"  worst position: {w['id']} line at {w['pos_line']:.3f} deg: |d2theta| {w['max_pos_dev']:.2e}"
        )
    return out


def run_against(records: list[dict[str, Any]], batch: Any, reference: Any) -> dict[str, dict[str, Any]]:
    """Compare each record's batch peaks with ``reference(record) -> (two_theta, strength)``."""
    rows: dict[str, dict[str, Any]] = {}
    for i, rec in enumerate(records):
        if i in batch.errors:
            rows[rec["id"]] = {"error": batch.errors[i]}
            continue
        p = batch.peaks(i)
        try:
            ref = reference(rec)
        except Exception as exc:  # the reference failed: say so, it is not our line
            rows[rec["id"]] = {"error": f"reference: {type(exc).__name__}: {exc}"}
            continue
        rows[rec["id"]] = compare((p.two_theta, p.intensity), reference_list(*ref))
    return rows


def _project_simulate_peaks() -> Any:
    try:  # the per-CIF simulator is moving from data/simulate.py to crystal/diffraction.py
        from xrdvision.crystal.diffraction import simulate_peaks
    except ImportError:
        from xrdvision.data.simulate import simulate_peaks
    return simulate_peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mp", type=int, default=200, help="random Materials Project structures")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cod", type=int, default=0, help="COD CIFs to use (0: all)")
    ap.add_argument(
        "--cod-xu-max-sites", type=int, default=1000, help="largest P1 cell sent to xrayutilities"
    )
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    from xrdvision.crystal.powder import PowderSettings, simulate_batch
    from xrdvision.data.cod_set import record_from_structure

    t0 = time.perf_counter()
    result: dict[str, Any] = {"seed": args.seed}
    mp = mp_records(args.mp, args.seed)
    rows = run_against(mp, simulate_batch(mp), xrayutilities_lines)
    result["mp_vs_xrayutilities"] = summarise(rows, f"MP {len(mp)} vs xrayutilities")

    structures, unreadable = cod_structures()
    cod = [record_from_structure(k, v) for k, v in structures.items()]
    if args.cod:
        cod = cod[: args.cod]
    # The overlap check rejects 1.8 % of COD as pymatgen reads it (duplicated atoms, disorder parts
    # with full occupancy); the per-CIF simulator sums such atoms as they are. Those records are
    # named below, and compared with the check off: the physics is the same either way.
    rejected = simulate_batch(cod).errors
    result["cod_rejected_by_default_checks"] = {cod[i]["id"]: e for i, e in rejected.items()}
    unchecked = PowderSettings(min_distance=0.0)
    batch = simulate_batch(cod, unchecked)
    sub = [r for r in cod if len(r["species"]) <= args.cod_xu_max_sites]
    rows = run_against(sub, simulate_batch(sub, unchecked), xrayutilities_lines)
    label = f"COD {len(sub)} (<= {args.cod_xu_max_sites} sites) vs xrayutilities"
    result["cod_vs_xrayutilities"] = summarise(rows, label)
    simulate_peaks = _project_simulate_peaks()

    def project(rec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        p = simulate_peaks(structures[rec["id"]])
        return p.two_theta, p.intensity

    rows = run_against(cod, batch, project)
    result["cod_vs_simulate_peaks"] = summarise(rows, f"COD {len(cod)} vs the project's simulate_peaks")
    result["cod_unreadable_by_pymatgen"] = unreadable
    result["cod_batch_errors_with_overlap_check_off"] = {cod[i]["id"]: e for i, e in batch.errors.items()}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
