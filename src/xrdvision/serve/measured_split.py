"""The measured patterns split by mineral into a *tuning* and a *report* half (``data/measured_split.csv``).

Why: choosing augmentation ranges and preprocessing by looking at measured accuracy tunes on the
measured set; the report half is then only scored, never looked at while choosing. A mineral must not
sit in both halves (several RRUFF samples of one mineral, RockJock's three cherts and quartz), so
patterns are grouped first and whole groups are assigned:

- the same mineral name (``phase_name`` without the parenthesis and element prefixes such as ``Mg-``),
- the same formula (polymorphs such as quartz and cristobalite go together: stricter than needed),
- the same space group and similar line lists (cosine >= ``SIMILAR`` of fingerprints made of a
  Gaussian per line, weighted by the square root of its height): RRUFF ships no names, so its
  repeated minerals are found by their patterns.

Groups go, largest first, to the half that has fewer patterns of their crystal system (ties: fewer
patterns overall, then a coin flip with ``seed``), so both halves get each system in about equal parts.
The file is generated once and committed:
``python -m xrdvision.serve.measured_split ../shared/experimental data/measured_split.csv --seed 42``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np

from xrdvision.errors import InputError
from xrdvision.formats.scans import measured_range, read_pattern
from xrdvision.formats.tables import read_table, write_table
from xrdvision.serve.peak_fit import noise_sigma
from xrdvision.serve.preprocess import subtract_background

logger = logging.getLogger(__name__)

HALVES = ("tuning", "report")
SIMILAR = 0.7  # cosine of two fingerprints above which two patterns of one space group are one mineral
FINGERPRINT = (5.0, 90.0, 0.05)  # 2-theta grid of the fingerprints (degrees)
BROADEN_DEG = 0.1  # Gaussian sd of each line: small zero offsets do not separate a mineral
COLUMNS = ["file", "half", "group", "crystal_system", "space_group"]
_PREFIX = re.compile(r"^(?:fe|mg|ca|na|k|li|mn)-", re.IGNORECASE)
_UNNAMED = "unknown"


def mineral_name(phase_name: str) -> str:
    """``Kaolinite (disordered)`` -> ``kaolinite``; ``Mg-calcite`` -> ``calcite``; unnamed -> ``""``."""
    name = re.sub(r"\(.*?\)", "", phase_name or "").strip().lower()
    if not name or name.startswith(_UNNAMED):
        return ""
    first = name.split()[0]
    return _PREFIX.sub("", first)


def fingerprint(path: Path) -> np.ndarray | None:
    """A unit vector of the pattern on ``FINGERPRINT``'s grid: background removed, broadened, square root;
    None for a file that cannot be read."""
    try:
        pattern = read_pattern(path)
    except InputError as exc:
        logger.warning("measured_split: %s", exc)
        return None
    lo, hi = measured_range(pattern)
    keep = (pattern.two_theta >= lo) & (pattern.two_theta <= hi)
    tt = pattern.two_theta[keep]
    y = subtract_background(tt, pattern.intensity[keep], method="snip_hand")  # as when the split was made
    g = np.arange(FINGERPRINT[0], FINGERPRINT[1] + 1e-9, FINGERPRINT[2])
    at, height = _lines(tt, y)
    if at.size == 0:
        return None
    # Lines only (a noise floor would make every pair alike): Gaussians of sqrt(height) at each line.
    v = (np.sqrt(height)[:, None] * np.exp(-0.5 * ((g[None, :] - at[:, None]) / BROADEN_DEG) ** 2)).sum(0)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else None


def _lines(two_theta: np.ndarray, net: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions and heights of the lines above 2 % of the strongest and 5 noise sd."""
    from scipy.signal import find_peaks

    top = float(net.max()) if net.size else 0.0
    if not top > 0:
        return np.empty(0), np.empty(0)
    step = float(np.median(np.diff(two_theta)))
    floor = max(0.02 * top, 5 * noise_sigma(net))
    idx, _ = find_peaks(net, prominence=floor, distance=max(1, round(0.1 / step)))
    return two_theta[idx], net[idx]


class _Groups:
    """Union-find over row indices."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def group_minerals(rows: list[dict[str, str]], prints: list[np.ndarray | None]) -> list[int]:
    """A group number per row (numbered by first row): same name, formula, or space group + look-alike."""
    groups = _Groups(len(rows))
    first: dict[tuple[str, str], int] = {}
    for i, r in enumerate(rows):
        for key in (
            ("name", mineral_name(r.get("phase_name", ""))),
            ("formula", (r.get("formula") or "").strip()),
        ):
            if key[1]:
                groups.union(i, first.setdefault(key, i))
    by_sg: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        sg = (r.get("space_group") or "").strip()
        if sg and prints[i] is not None:
            by_sg.setdefault(sg, []).append(i)
    for members in by_sg.values():
        if len(members) < 2:
            continue
        m = np.stack([prints[i] for i in members])  # type: ignore[misc]
        sim = m @ m.T
        for a, b in zip(*np.nonzero(np.triu(sim, 1) >= SIMILAR), strict=True):
            groups.union(members[a], members[b])
    roots: dict[int, int] = {}
    return [roots.setdefault(groups.find(i), len(roots)) for i in range(len(rows))]


def assign_halves(systems: list[str], groups: list[int], seed: int) -> list[str]:
    """``tuning`` or ``report`` per row: whole groups, balanced per crystal system (see the module doc)."""
    rng = np.random.default_rng(seed)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    order = list(members)
    rng.shuffle(order)
    order.sort(key=lambda g: -len(members[g]))  # stable: equal sizes keep the seeded order
    per_system = {h: Counter() for h in HALVES}
    total = dict.fromkeys(HALVES, 0)
    half_of: dict[int, str] = {}
    for g in order:
        system = Counter(systems[i] for i in members[g]).most_common(1)[0][0]
        a, b = HALVES
        key_a = (per_system[a][system], total[a])
        key_b = (per_system[b][system], total[b])
        pick = a if key_a < key_b else b if key_b < key_a else HALVES[int(rng.integers(2))]
        half_of[g] = pick
        per_system[pick][system] += len(members[g])
        total[pick] += len(members[g])
    return [half_of[g] for g in groups]


def make_split(folder: Path, index: str, seed: int) -> list[list[str]]:
    """Rows of the split table (``COLUMNS``) for every pattern in ``folder/index``."""
    rows = read_table(folder / index, ["file", "crystal_system", "space_group"], "index of measured patterns")
    prints = [fingerprint(folder / r["file"]) for r in rows]
    groups = group_minerals(rows, prints)
    systems = [(r.get("crystal_system") or "").strip() for r in rows]
    halves = assign_halves(systems, groups, seed)
    return [
        [r["file"], h, str(g), s, (r.get("space_group") or "").strip()]
        for r, h, g, s in zip(rows, halves, groups, systems, strict=True)
    ]


def write_split(folder: Path, index: str, seed: int, out: Path) -> dict[str, int]:
    """Write the split table; returns counts per half (and groups)."""
    table = make_split(folder, index, seed)
    write_table(out, COLUMNS, table, lineterminator="\n")
    counts = Counter(r[1] for r in table)
    return {**{h: counts.get(h, 0) for h in HALVES}, "groups": len({r[2] for r in table})}


def read_split(path: Path) -> dict[str, str]:
    """{file: half} from a split table; a half other than ``tuning``/``report`` is an InputError."""
    out: dict[str, str] = {}
    for i, r in enumerate(read_table(path, ["file", "half"], "measured split"), start=2):
        if r["half"] not in HALVES:
            raise InputError(path, f"line {i}: half {r['half']!r} is not one of {', '.join(HALVES)}")
        out[r["file"]] = r["half"]
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m xrdvision.serve.measured_split FOLDER OUT [--index INDEX.csv] [--seed 42]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Split the measured patterns by mineral (run once, commit).")
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--index", default="INDEX.csv")
    parser.add_argument("--seed", type=int, default=42)
    a = parser.parse_args(argv)
    c = write_split(a.folder, a.index, a.seed, a.out)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("measured_split: %d tuning / %d report patterns in %d groups -> %s", *c.values(), a.out)


if __name__ == "__main__":
    main()
