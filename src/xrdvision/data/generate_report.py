"""Are the generated crystals like the real ones? The ``generate`` stage's realism check.

Why: a generator can be fast and still teach nothing, if its crystals are unlike real ones in what a
pattern shows. Each quantity is compared between the real training crystals (never validation or test)
and the generated ones by the two-sample Kolmogorov-Smirnov statistic (0: same distribution, 1:
disjoint), and drawn as two histograms on common bins (``plots/generate/<quantity>.csv``, columns
``bin, real, generated``, shares):

* from the cells: volume per atom, b/a and c/a of the conventional cell (real: every fitted structure,
  kept in ``stats.json``; generated: a fresh draw of up to ``CELL_SAMPLE`` crystals, same sampler);
* from the peak lists (K-alpha1, lines of at least ``MIN_LINE`` of the strongest): the number of lines in
  the 2-theta range, the first line's position, and the share of the intensity in the 10 strongest
  lines (real: COD's training structures' peak lists from ``data/patterns/patterns.npz``; generated:
  the shards, the first ``20 000`` crystals);
* the crystal-system and space-group frequencies (systems in their order triclinic..cubic, groups by
  number: KS on the ordinal, and the histograms).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.crystal.systems import CRYSTAL_SYSTEMS
from xrdvision.data.generator_sample import Sampler
from xrdvision.data.mp_source import crystal_system_of
from xrdvision.formats.atomic import atomic_path
from xrdvision.formats.patterns import load_patterns
from xrdvision.formats.peaklists import read_shard
from xrdvision.formats.tables import read_split

CELL_SAMPLE = 2000
MIN_LINE = 0.01  # lines weaker than 1 % of the strongest are not counted (not seen in a measurement)
_BINS = 40


def ks(a: Sequence[float], b: Sequence[float]) -> float | None:
    """The two-sample Kolmogorov-Smirnov statistic (None if either sample is empty)."""
    from scipy.stats import ks_2samp

    if len(a) == 0 or len(b) == 0:
        return None
    return round(float(ks_2samp(np.asarray(a, float), np.asarray(b, float)).statistic), 4)


def peak_quantities(lists: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, list[float]]:
    """Per peak list ``(two_theta, intensity)``: lines, first line (degrees), top-10 intensity share."""
    n, first, top = [], [], []
    for tt, amp in lists:
        amp = np.asarray(amp, dtype=np.float64)
        if amp.size == 0 or not amp.max() > 0:
            continue
        seen = amp >= MIN_LINE * amp.max()
        n.append(int(seen.sum()))
        first.append(float(np.min(np.asarray(tt)[seen])))
        top.append(float(np.sort(amp)[::-1][:10].sum() / amp.sum()))
    return {"n_lines": n, "first_line": first, "top10_share": top}


def generated_cells(sampler: Sampler, prior: str, n: int, seed: int) -> dict[str, list[float]]:
    """Volume per atom, b/a, c/a of ``n`` freshly drawn crystals (a stream of their own)."""
    rng = np.random.default_rng([seed, 0x5245])  # "RE": realism
    prob = sampler.space_group_prior(prior)
    out: dict[str, list[float]] = {"volume_per_atom": [], "b_over_a": [], "c_over_a": []}
    for sg in rng.choice(len(prob), size=n, p=prob) + 1:
        rec = sampler.crystal(int(sg), rng, "realism")
        if rec is None:
            continue
        a, b, c, al, be, ga = rec["cell"]
        ca, cb, cg = np.cos(np.radians([al, be, ga]))
        vol = a * b * c * np.sqrt(1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg)
        out["volume_per_atom"].append(float(vol / len(rec["species"])))
        out["b_over_a"].append(b / a)
        out["c_over_a"].append(c / a)
    return out


def real_peak_lists(patterns_path: Path, split_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """The COD training structures' peak lists ``(two_theta, intensity)`` from ``patterns.npz``."""
    train = {r["cod_id"].strip() for r in read_split(Path(split_dir) / "train.csv")}
    p = load_patterns(patterns_path)
    return [p.peaks(i)[:2] for i, x in enumerate(p.ids) if x in train]


def _histogram(real: Sequence[float], gen: Sequence[float], edges: np.ndarray) -> list[list[Any]]:
    r = np.histogram(np.asarray(real, float), bins=edges)[0]
    g = np.histogram(np.asarray(gen, float), bins=edges)[0]
    r, g = r / max(r.sum(), 1), g / max(g.sum(), 1)
    return [
        [round(float(e), 4), round(float(x), 5), round(float(y), 5)]
        for e, x, y in zip(edges[:-1], r, g, strict=True)
    ]


def _write_csv(path: Path, header: str, rows: list[list[Any]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(header + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))


def realism(
    real: dict[str, list[Any]], generated: dict[str, list[Any]], plots_dir: Path | None = None
) -> dict[str, float | None]:
    """``ks_<quantity>`` for every quantity both sides have; the histograms into ``plots_dir``."""
    out: dict[str, float | None] = {}
    for key in sorted(set(real) & set(generated)):
        a, b = real[key], generated[key]
        if key == "crystal_system":
            index = {s: i for i, s in enumerate(CRYSTAL_SYSTEMS)}
            a, b = [index[x] for x in a], [index[x] for x in b]
            edges = np.arange(len(CRYSTAL_SYSTEMS) + 1) - 0.5
        elif key == "space_group":
            edges = np.arange(0.5, 231.5, 1.0)
        else:
            both = np.concatenate([np.asarray(a, float), np.asarray(b, float)])
            lo, hi = np.quantile(both, [0.005, 0.995]) if both.size else (0.0, 1.0)
            edges = np.linspace(lo, hi if hi > lo else lo + 1, _BINS + 1)
        out[f"ks_{key}"] = ks(a, b)
        if plots_dir is not None:
            rows = _histogram(a, b, edges)
            if key == "crystal_system":
                rows = [[CRYSTAL_SYSTEMS[i], *row[1:]] for i, row in enumerate(rows)]
            if key == "space_group":
                rows = [[int(row[0] + 0.5), *row[1:]] for row in rows]
            _write_csv(Path(plots_dir) / f"{key}.csv", "bin,real,generated", rows)
    return out


def shard_quantities(files: Sequence[Path], most: int = 20_000) -> dict[str, list[Any]]:
    """Peak-list quantities and labels of the generated crystals in ``files`` (the first ``most``)."""
    lists, systems, groups = [], [], []
    for path in files:
        if len(lists) >= most:
            break
        shard = read_shard(path)
        lists.extend(shard.peaks(i) for i in range(len(shard)))
        systems.extend(shard.crystal_system)
        groups.extend(int(x) for x in shard.space_group)
    return {**peak_quantities(lists), "crystal_system": systems, "space_group": groups}


def stage_metrics(
    params: Params,
    stats: dict[str, Any],
    summary: dict[str, Any],
    files: list[Path],
    patterns_dir: Path,
    split_dir: Path,
    plots_dir: Path,
) -> dict[str, Any]:
    """``metrics/generate.json``: counts, mismatch rate, the realism KS statistics (plots written)."""
    g = params.generate
    sampler = Sampler(stats, g.max_atoms, g.min_distance)
    real = {k: v for k, v in stats["real"].items()}
    real["crystal_system"] = [crystal_system_of(x) for x in real["space_group"]]
    real |= peak_quantities(real_peak_lists(patterns_dir / "patterns.npz", split_dir))
    generated = generated_cells(sampler, g.prior, min(g.n_crystals, CELL_SAMPLE), params.seed)
    generated |= shard_quantities(files)
    Path(plots_dir).mkdir(parents=True, exist_ok=True)
    n_failed = summary.get("n_failed", 0)
    return {
        "n_crystals": g.n_crystals,
        "n_simulated": summary.get("n_structures", 0),
        "n_failed": n_failed,
        "failed_rate": round(n_failed / max(g.n_crystals, 1), 4),
        "space_group_mismatch_rate": summary.get("mismatch_rate"),
        "n_fit_structures": stats["n_structures"],
        **{f"fit_levels_{k}": v for k, v in stats["levels_used"].items()},
        **realism(real, generated, plots_dir),
    }
