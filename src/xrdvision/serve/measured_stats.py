"""The ``measure_scans`` stage: what the measured patterns look like, beside what training draws.

Why: the training augmentation (``conditions:``) is only as good as its ranges, and those should cover
what diffractometers write. For every pattern of ``measured.folder`` this measures the 2-theta range and
step, the line widths (pseudo-Voigt doublet fits and a Caglioti law, :mod:`xrdvision.serve.peak_fit`),
K-alpha2, the noise, and the background (level, ends, amorphous hump), all relative to the strongest
line above the background; and it draws the same figures from the ``conditions:`` ranges, so one plot
shows both. The folder is read through params, not as a DVC dependency: a clone without it gets the
training side and ``"skipped": true`` for the measured side.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.config.patterns import ConditionsParams, PatternParams
from xrdvision.crystal.bragg import CU_KA1
from xrdvision.errors import InputError
from xrdvision.formats.atomic import write_json
from xrdvision.formats.scans import measured_range, read_pattern
from xrdvision.formats.tables import read_table, write_table
from xrdvision.serve import peak_fit
from xrdvision.serve.preprocess import background
from xrdvision.serve.zero_offset import CENTRING_OF_SG, CUBIC_SEEDS, fit_zero_offset, header_cell

logger = logging.getLogger(__name__)

ANGLES = (20.0, 40.0, 60.0, 80.0)  # where line widths are compared (degrees 2-theta)
QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
PLOT_QUANTILES = tuple(round(q, 2) for q in np.linspace(0.02, 0.98, 49))
TRAINING_DRAWS = 4000
SOURCES = ("rruff_agi", "rockjock", "other")  # the folders of ../shared/experimental (plot columns)
CACHE_FILE = Path("data/cache/measure_scans.json")  # per-pattern figures kept between runs (gitignored)
KALPHA2_PRESENT = 0.25  # a fitted K-alpha2/K-alpha1 ratio above this: the doublet is there
# The quantities compared with training, per pattern (the table's columns).
QUANTITIES = (
    *(f"fwhm_{a:.0f}" for a in ANGLES),
    "eta",
    "kalpha2_ratio",
    "noise",
    "background_level",
    "hump",
    "two_theta_min",
    "two_theta_max",
    "step",
    "zero_offset",
)


@dataclass
class ScanStats:
    """Figures of one measured pattern (intensities relative to its strongest line above background)."""

    file: str
    source: str
    crystal_system: str
    n_points: int = 0
    two_theta_min: float = math.nan
    two_theta_max: float = math.nan
    step: float = math.nan
    n_peaks: int = 0
    caglioti_u: float = math.nan
    caglioti_v: float = math.nan
    caglioti_w: float = math.nan
    fwhm_20: float = math.nan
    fwhm_40: float = math.nan
    fwhm_60: float = math.nan
    fwhm_80: float = math.nan
    fwhm_median: float = math.nan
    eta: float = math.nan
    kalpha2_ratio: float = math.nan
    noise: float = math.nan
    background_level: float = math.nan
    background_start: float = math.nan
    background_end: float = math.nan
    hump: float = math.nan
    zero_offset: float = math.nan  # degrees; cubic phases of known cell only (serve/zero_offset.py)
    cell_a: float = math.nan
    error: str = ""
    peaks: list[peak_fit.PeakFit] = field(default_factory=list, repr=False)


def _source_of(file: str) -> str:
    parts = Path(file).parts
    return parts[0] if len(parts) > 1 else "other"


def measure_scan(
    path: Path,
    file: str = "",
    crystal_system: str = "",
    wavelength: float | None = None,
    cell: tuple[float, str] | None = None,
) -> ScanStats:
    """All figures of one pattern; a file that cannot be read gets ``error`` (one line) and NaNs.
    ``cell`` (a cubic edge in A and its centring, F/I/P) adds the zero offset."""
    st = ScanStats(file or str(path), _source_of(file or path.name), crystal_system)
    try:
        pattern = read_pattern(path, wavelength)
    except InputError as exc:
        st.error = str(exc)
        return st
    lo, hi = measured_range(pattern)
    keep = (pattern.two_theta >= lo) & (pattern.two_theta <= hi)
    tt, y = pattern.two_theta[keep], pattern.intensity[keep]
    st.n_points, st.two_theta_min, st.two_theta_max = int(tt.size), lo, hi
    if tt.size < 20:
        st.error = f"{path}: only {tt.size} measured points"
        return st
    st.step = float(np.median(np.diff(tt)))
    bg = background(tt, y)  # the default of measured-input preprocessing
    net = y - bg
    top = float(net.max())
    if not top > 0:
        st.error = f"{path}: no peak above the background"
        return st
    sigma = peak_fit.noise_sigma(y)
    st.noise = sigma / top
    st.background_level = float(np.median(bg)) / top
    edge = max(1, round(2.0 / st.step))  # 2 degrees at each end
    st.background_start = float(np.mean(bg[:edge])) / top
    st.background_end = float(np.mean(bg[-edge:])) / top
    chord = np.interp(tt, [tt[0], tt[-1]], [np.mean(bg[:edge]), np.mean(bg[-edge:])])
    st.hump = max(0.0, float(np.max(bg - chord))) / top
    wl = pattern.wavelength or CU_KA1
    if abs(wl - CU_KA1) > 0.01:  # the doublet model places K-alpha2 for copper only
        st.error = f"{path}: wavelength {wl:g} A is not Cu K-alpha; line widths not fitted"
        return st
    fits, ratio = peak_fit.fit_peaks(tt, net, sigma)
    st.peaks, st.n_peaks, st.kalpha2_ratio = fits, len(fits), ratio
    if fits:
        at = np.array([f.two_theta for f in fits])
        widths = np.array([f.fwhm for f in fits])
        st.fwhm_median = float(np.median(widths))
        st.eta = float(np.median([f.eta for f in fits]))
        st.caglioti_u, st.caglioti_v, st.caglioti_w = peak_fit.fit_caglioti(at, widths)
        if np.isfinite(st.caglioti_u):
            law = peak_fit.caglioti_fwhm(np.array(ANGLES), st.caglioti_u, st.caglioti_v, st.caglioti_w)
            for a, v in zip(ANGLES, law, strict=True):  # no extrapolation far beyond the fitted lines
                if at.min() - 10 <= a <= at.max() + 10:
                    setattr(st, f"fwhm_{a:.0f}", float(v))
        if cell is not None:
            zero, edge, _ = fit_zero_offset(at, *cell)
            st.zero_offset, st.cell_a = zero, edge
    return st


def training_draws(cond: ConditionsParams, pat: PatternParams, n: int, seed: int) -> dict[str, np.ndarray]:
    """The same figures as :class:`ScanStats`, drawn from ``conditions:`` with the generator's own code
    (:mod:`xrdvision.data.measurement`): line widths from its ``line_fwhm`` (Caglioti + Scherrer in
    quadrature, U, V, W uniform, sizes log-uniform), backgrounds from its ``backgrounds`` (a cubic up to
    ``background`` plus a hump up to ``hump``) measured as the scans are (median level; highest rise
    above the chord between the 2-degree ends). Noise at the background: Gaussian sd uniform in
    ``noise``, or (share ``poisson``) sqrt(level x counts) / counts with counts log-uniform; a share
    ``range_cut`` of scans stops uniformly in [range_min, two_theta_max].
    """
    from xrdvision.data.measurement import backgrounds, line_fwhm

    rng = np.random.default_rng(seed)

    def uniform(r: list[float]) -> np.ndarray:
        return rng.uniform(r[0], r[1], n)

    def log_uniform(r: list[float]) -> np.ndarray:
        return np.exp(rng.uniform(math.log(r[0]), math.log(r[1]), n))

    u, v, w = uniform(cond.caglioti_u), uniform(cond.caglioti_v), uniform(cond.caglioti_w)
    size_nm = log_uniform(cond.crystallite_nm)
    out: dict[str, np.ndarray] = {}
    for a in ANGLES:
        out[f"fwhm_{a:.0f}"] = line_fwhm(np.full(n, a), u, v, w, size_nm, CU_KA1)
    out["eta"] = uniform(cond.eta)
    out["kalpha2_ratio"] = np.where(rng.random(n) < cond.kalpha2, 0.5, 0.0)
    x = np.arange(pat.two_theta_min, pat.two_theta_max + 1e-9, 0.05)
    bg = backgrounds(n, x, cond, rng).astype(np.float64)
    edge = round(2.0 / 0.05)
    start, end = bg[:, :edge].mean(axis=1), bg[:, -edge:].mean(axis=1)
    chord = start[:, None] + (end - start)[:, None] * (x - x[0])[None, :] / (x[-1] - x[0])
    level = np.median(bg, axis=1)
    out["background_level"] = level
    out["hump"] = np.clip((bg - chord).max(axis=1), 0.0, None)
    counts = log_uniform(cond.counts)
    poisson = np.sqrt(np.maximum(level, 1.0 / counts) * counts) / counts
    out["noise"] = np.where(rng.random(n) < cond.poisson, poisson, uniform(cond.noise))
    out["two_theta_min"] = np.full(n, pat.two_theta_min)
    cut = rng.random(n) < cond.range_cut
    out["two_theta_max"] = np.where(cut, rng.uniform(cond.range_min, pat.two_theta_max, n), pat.two_theta_max)
    out["step"] = np.full(n, pat.step)
    out["zero_offset"] = rng.uniform(-cond.zero_shift, cond.zero_shift, n)
    return out


def _quantiles(values: np.ndarray, qs: tuple[float, ...]) -> list[float | None]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return [float(x) for x in np.quantile(v, qs)] if v.size else [None] * len(qs)


def summarise(stats: list[ScanStats], train: dict[str, np.ndarray]) -> dict[str, Any]:
    """Quantiles of each quantity per source, over all measured patterns and over the training draws,
    and the share of measured patterns inside the training draws' 1-99 % range (``covered``)."""
    groups: dict[str, list[ScanStats]] = {"all_measured": [s for s in stats if s.n_points]}
    for s in stats:
        groups.setdefault(s.source, []).append(s)
    out: dict[str, Any] = {"quantiles": list(QUANTILES), "quantities": {}}
    for q in QUANTITIES:
        entry: dict[str, Any] = {}
        for g, members in groups.items():
            vals = np.array([getattr(s, q) for s in members], dtype=np.float64)
            entry[g] = {"n": int(np.isfinite(vals).sum()), "q": _quantiles(vals, QUANTILES)}
        tvals = train[q]
        entry["training"] = {"n": int(tvals.size), "q": _quantiles(tvals, QUANTILES)}
        lo, hi = np.quantile(tvals, [0.01, 0.99])
        meas = np.array([getattr(s, q) for s in groups["all_measured"]], dtype=np.float64)
        meas = meas[np.isfinite(meas)]
        entry["covered"] = float(np.mean((meas >= lo - 1e-12) & (meas <= hi + 1e-12))) if meas.size else None
        out["quantities"][q] = entry
    for c in ("caglioti_u", "caglioti_v", "caglioti_w", "fwhm_median", "n_peaks"):
        out["quantities"][c] = {
            g: {
                "n": int(np.isfinite(v := np.array([getattr(s, c) for s in m], dtype=np.float64)).sum()),
                "q": _quantiles(v, QUANTILES),
            }
            for g, m in groups.items()
        }
    ratios = np.array([s.kalpha2_ratio for s in groups["all_measured"]], dtype=np.float64)
    out["kalpha2"] = {
        g: {
            "n_measured": int(
                np.isfinite(r := np.array([s.kalpha2_ratio for s in m], dtype=np.float64)).sum()
            ),
            "share_present": float(np.mean(r[np.isfinite(r)] > KALPHA2_PRESENT))
            if np.isfinite(r).any()
            else None,
        }
        for g, m in groups.items()
    }
    out["kalpha2"]["training_share"] = float(np.mean(train["kalpha2_ratio"] > 0))
    out["n_ratio_measured"] = int(np.isfinite(ratios).sum())
    return out


TABLE_COLUMNS = [f for f in ScanStats.__dataclass_fields__ if f != "peaks"]


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return v


def write_outputs(out_dir: Path, stats: list[ScanStats], train: dict[str, np.ndarray]) -> None:
    """``scans.csv`` (one row per pattern), ``peaks.csv`` (one row per fitted line), and the plot CSVs:
    ``fwhm_<source>.csv`` (2-theta, FWHM) and ``quantiles_<quantity>.csv`` (quantile, one column per
    source and ``training``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(
        out_dir / "scans.csv", TABLE_COLUMNS, ([_fmt(asdict(s)[c]) for c in TABLE_COLUMNS] for s in stats)
    )
    write_table(
        out_dir / "peaks.csv",
        ["file", "source", "two_theta", "fwhm", "eta", "kalpha2_ratio", "height", "r2"],
        (
            [
                s.file,
                s.source,
                *(_fmt(float(x)) for x in (p.two_theta, p.fwhm, p.eta, p.ratio, p.height, p.r2)),
            ]
            for s in stats
            for p in s.peaks
        ),
    )
    sources = sorted(set(SOURCES) | {s.source for s in stats})  # fixed columns: the plots name them
    for src in sources:
        write_table(
            out_dir / f"fwhm_{src}.csv",
            ["two_theta", "fwhm"],
            ([_fmt(p.two_theta), _fmt(p.fwhm)] for s in stats if s.source == src for p in s.peaks),
        )
    rows = []
    k = min(300, next(iter(train.values())).size)
    for a in ANGLES:
        rows += [[f"{a:g}", _fmt(float(v))] for v in train[f"fwhm_{a:.0f}"][:k]]
    write_table(out_dir / "fwhm_training.csv", ["two_theta", "fwhm"], rows)
    for q in QUANTITIES:
        cols = {
            src: _quantiles(np.array([getattr(s, q) for s in stats if s.source == src]), PLOT_QUANTILES)
            for src in sources
        }
        cols["training"] = _quantiles(train[q], PLOT_QUANTILES)
        write_table(
            out_dir / f"quantiles_{q}.csv",
            ["quantile", *cols],
            (
                [f"{p:g}", *(_fmt(c[i]) if c[i] is not None else "" for c in cols.values())]
                for i, p in enumerate(PLOT_QUANTILES)
            ),
        )


def cubic_cell(path: Path, row: dict[str, str]) -> tuple[float, str] | None:
    """The seed cell of a cubic pattern: a handbook edge for the RockJock standards, else an edge its
    header states (``a = ... A``) with the centring of its INDEX space group; None otherwise."""
    if row["file"] in CUBIC_SEEDS:
        return CUBIC_SEEDS[row["file"]]
    try:
        sg = int(float(row.get("space_group") or 0))
    except ValueError:
        return None
    if sg not in CENTRING_OF_SG:
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            edge = header_cell(fh.read(2048))
    except OSError:
        return None
    return (edge, CENTRING_OF_SG[sg]) if edge else None


def _code_digest() -> str:
    """Digest of the code and libraries a pattern's figures depend on (not the conditions)."""
    import hashlib
    import inspect

    import pybaselines
    import scipy

    from xrdvision.formats import scan_readers, scans
    from xrdvision.serve import preprocess, zero_offset

    h = hashlib.sha256(f"{np.__version__} {scipy.__version__} {pybaselines.__version__}".encode())
    for m in (scans, scan_readers, peak_fit, preprocess, zero_offset):
        h.update(Path(str(m.__file__)).read_bytes())
    for f in (ScanStats, measure_scan, cubic_cell):  # this module's per-pattern part, not the draws
        h.update(inspect.getsource(f).encode())
    return h.hexdigest()[:16]


def _cached_measure(
    path: Path, row: dict[str, str], cache: dict[str, Any], digest: str
) -> tuple[ScanStats, str]:
    """:func:`measure_scan` of one INDEX row, from ``cache`` when the file's bytes, its cell and the code
    are the same (a change of ``conditions:`` then reruns in seconds, not minutes); and its cache key."""
    import hashlib

    cell = cubic_cell(path, row)
    try:
        key = f"{row['file']}|{hashlib.sha256(path.read_bytes()).hexdigest()}|{cell}|{digest}"
    except OSError:
        key = ""
    hit = cache.get(key)
    if hit is not None:
        return ScanStats(**{**hit, "peaks": [peak_fit.PeakFit(**p) for p in hit["peaks"]]}), key
    st = measure_scan(path, row["file"], row.get("crystal_system", ""), None, cell)
    if key:
        cache[key] = asdict(st)
    return st, key


def run_measure_scans(
    params: Params,
    out_metrics: str | Path,
    out_dir: str | Path,
    cache_file: str | Path | None = CACHE_FILE,
) -> dict[str, Any]:
    """Measure every pattern in ``measured.folder``/``index`` (see the module doc); write ``out_dir`` and
    ``out_metrics``. Unreadable files are listed with their one-line reason and the rest goes on.
    ``cache_file`` (JSON, outside the DVC outputs; None = none) keeps each pattern's figures between
    runs."""
    import json

    from tqdm import tqdm

    out_metrics, out_dir = Path(out_metrics), Path(out_dir)
    train = training_draws(params.conditions, params.pattern, TRAINING_DRAWS, params.seed)
    folder = Path(params.measured.folder) if params.measured.folder else None
    stats: list[ScanStats] = []
    if folder is None or not folder.is_dir():
        reason = (
            "params measured.folder is empty"
            if folder is None
            else f"measured.folder {folder} does not exist"
        )
        write_outputs(out_dir, stats, train)
        metrics: dict[str, Any] = {"skipped": True, "reason": reason, **summarise(stats, train)}
        write_json(out_metrics, metrics)
        return metrics
    rows = read_table(
        folder / params.measured.index, ["file", "crystal_system"], "index of measured patterns"
    )
    show = logger.isEnabledFor(logging.INFO)
    cache: dict[str, Any] = {}
    if cache_file and Path(cache_file).is_file():
        try:
            cache = json.loads(Path(cache_file).read_text())
        except (OSError, ValueError):  # a damaged cache is rebuilt
            cache = {}
    digest, used = _code_digest(), {}
    for row in tqdm(rows, desc="measure", unit="pattern", disable=not show):
        st, key = _cached_measure(folder / row["file"], row, cache, digest)
        if key:
            used[key] = cache[key]  # the cache keeps only what this run used
        if st.error:
            logger.warning("measure_scans: %s", st.error)
        stats.append(st)
    if cache_file:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_file, used)
    metrics = {
        "skipped": False,
        "folder": str(folder),
        "n_patterns": len(stats),
        "n_failed": sum(1 for s in stats if s.error and not s.n_points),
        "n_with_caglioti": sum(1 for s in stats if np.isfinite(s.caglioti_u)),
        "n_peaks_fitted": sum(s.n_peaks for s in stats),
        "failures": [s.error for s in stats if s.error],
        **summarise(stats, train),
    }
    write_outputs(out_dir, stats, train)
    write_json(out_metrics, metrics)
    return metrics


def summary_line(m: dict[str, Any], out_dir: str | Path) -> str:
    """One line for the CLI: patterns measured, widths fitted, K-alpha2 share, where the plots are."""
    if m.get("skipped"):
        return f"measure_scans: measured side skipped ({m['reason']}); training draws in {out_dir}"
    fw = m["quantities"]["fwhm_40"]["all_measured"]["q"]
    ka2 = m["kalpha2"]["all_measured"]["share_present"]
    return (
        f"measure_scans: {m['n_patterns']} patterns ({m['n_failed']} unreadable), "
        f"{m['n_peaks_fitted']} lines fitted, Caglioti law for {m['n_with_caglioti']}; "
        f"FWHM at 40 deg median {fw[3]:.3f} deg; "
        f"K-alpha2 in {ka2:.0%} of those measurable; plots in {out_dir}"
    )
