"""Statistics of real training crystals per space group: what the generator draws new crystals from.

Why fitted, and why hierarchical: random crystals with arbitrary Wyckoff choices and compositions add
nothing to a model trained on real data (README, the PyXtal ``synthesize`` stage); crystals drawn
from what real crystals of the same space group look like can (Schopmans et al., Digital Discovery
2023). Each training structure is described once (:func:`describe`, spglib on its arrays, no CIF round
trip): its space group, the Wyckoff letter and element of each occupied orbit, its element set, the
conventional cell and its density factor (cell volume over the summed atomic volumes). Those
descriptions are counted per space group (:func:`fit_statistics`):

* number of occupied orbits (a histogram), occupation counts of each Wyckoff letter, element sets
  (co-occurrence kept: a crystal draws a real crystal's set of elements), density-factor quantiles;
* most of the 230 groups have few or no training structures, so each group uses the first level with
  at least ``min_structures`` structures: space group -> point group -> crystal system -> all. Above
  the space group, letters do not carry over between groups, so the pooled statistic is the share of
  occupied orbits with 0, 1, 2 or 3 free coordinates, spread over the group's own positions;
* per element, the mean number of orbits it occupies in a structure that holds it (oxygen fills
  many orbits, a heavy cation few): how a drawn element set is spread over the drawn orbits;
* the lattice shape per crystal system as KDE samples of the free parameters (log axis ratios,
  angles), the system's constraints enforced by construction.

The statistics file says for every space group which level it used (``space_groups``). Only training
structures are described: the caller passes COD's training split and Materials Project structures
whose reduced formula is in no validation or test compound (:mod:`xrdvision.data.generate`).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from xrdvision.crystal.powder_input import cholesky_sym3, metric
from xrdvision.data.generator_tables import N_SPACE_GROUPS, group_tables
from xrdvision.data.mp_source import FALLBACK_SYMPREC

STATS_VERSION = 1
LEVELS = ("space_group", "point_group", "crystal_system", "all")
SYSTEMS = ("triclinic", "monoclinic", "orthorhombic", "tetragonal", "trigonal", "hexagonal", "cubic")
# The free lattice parameters per crystal system: log(b/a), log(c/a) and angles (degrees).
LATTICE_PARAMS = {
    "triclinic": ("log_b_a", "log_c_a", "alpha", "beta", "gamma"),
    "monoclinic": ("log_b_a", "log_c_a", "beta"),
    "orthorhombic": ("log_b_a", "log_c_a"),
    "tetragonal": ("log_c_a",),
    "trigonal": ("log_c_a",),
    "hexagonal": ("log_c_a",),
    "cubic": (),
}
QUANTILES = np.linspace(0.0, 1.0, 41)
MAX_LATTICE_SAMPLES = 5000  # per crystal system: enough for a KDE, small enough for a readable file
MAX_ELEMENT_SETS = 5000  # per statistics group, the most frequent
_ELEMENT = re.compile(r"[A-Z][a-z]?")
DEFAULT_RADIUS_A = 2.0  # for an element pymatgen has no van der Waals radius for


def _lattice_params(lattice: np.ndarray) -> list[float]:
    """``[a, b, c, alpha, beta, gamma]`` of a lattice matrix (rows a, b, c)."""
    a, b, c = (float(np.linalg.norm(v)) for v in lattice)

    def angle(u: np.ndarray, v: np.ndarray) -> float:
        cos = float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
        return math.degrees(math.acos(max(-1.0, min(1.0, cos))))

    return [
        a,
        b,
        c,
        angle(lattice[1], lattice[2]),
        angle(lattice[0], lattice[2]),
        angle(lattice[0], lattice[1]),
    ]


def _ordered(record: Mapping[str, Any]) -> tuple[list[str], np.ndarray]:
    """One species per position: where a disordered site lists several, the most occupied one."""
    frac = np.mod(np.asarray(record["frac"], dtype=np.float64), 1.0)
    occ = np.asarray(record.get("occupancy") or [1.0] * len(frac), dtype=np.float64)
    keys = [tuple(np.round(f, 4) % 1.0) for f in frac]
    best: dict[tuple[float, ...], int] = {}
    for i, k in enumerate(keys):
        if k not in best or occ[i] > occ[best[k]]:
            best[k] = i
    keep = sorted(best.values())
    return [element_of(str(record["species"][i])) for i in keep], frac[keep]


def element_of(species: str) -> str:
    """The element of a species name: ``Al3+`` -> ``Al``, ``O2-`` -> ``O``, deuterium -> ``H``."""
    m = _ELEMENT.match(species)
    symbol = m.group(0) if m else species
    return "H" if symbol in ("D", "T") else symbol


def describe(
    record: Mapping[str, Any], symprec: float = 0.01, angle_tolerance: float = 5.0
) -> dict[str, Any]:
    """What the statistics count of one structure (``cell``, ``species``, ``frac``, optional
    ``occupancy``); ``ValueError`` if its cell is impossible or spglib finds no space group."""
    os.environ.setdefault("SPGLIB_WARNING", "OFF")
    import spglib

    species, frac = _ordered(record)
    lattice = cholesky_sym3(metric(record["cell"]))
    kinds = {s: i + 1 for i, s in enumerate(dict.fromkeys(species))}
    numbers = np.array([kinds[s] for s in species], dtype=np.intc)
    dataset = None
    for prec in (symprec, *(p for p in FALLBACK_SYMPREC if p != symprec)):
        try:
            dataset = spglib.get_symmetry_dataset(
                (lattice, frac, numbers), symprec=prec, angle_tolerance=angle_tolerance
            )
        except Exception:  # spglib >= 2.5 may raise instead of returning None
            dataset = None
        if dataset is not None:
            break
    if dataset is None:
        raise ValueError(f"spglib found no space group at symprec {symprec} or {FALLBACK_SYMPREC}")
    orbits = sorted(set(int(i) for i in dataset.equivalent_atoms))
    std = np.asarray(dataset.std_lattice, dtype=np.float64)
    names = {v: k for k, v in kinds.items()}
    std_species = [names[int(t)] for t in dataset.std_types]
    return {
        "space_group": int(dataset.number),
        "sites": [[str(dataset.wyckoffs[i]), species[i]] for i in orbits],
        "elements": sorted(set(species)),
        "lattice": _lattice_params(std),
        "volume": abs(float(np.linalg.det(std))),
        "n_atoms": len(std_species),
        "std_species": sorted(Counter(std_species).items()),
    }


def atomic_volumes(elements: Iterable[str]) -> dict[str, float]:
    """Sphere volumes (A^3) from pymatgen's van der Waals radii (``DEFAULT_RADIUS_A`` where it has none).

    Van der Waals rather than atomic radii: on 300 COD structures the density factor (cell volume over
    the summed sphere volumes) spreads half as much with them (sd of its log 0.43 against 0.93: a
    hydrogen-rich cell is no longer ten times "emptier" than an oxide), so a factor drawn for one
    composition fits another."""
    import warnings

    from pymatgen.core.periodic_table import Element

    out = {}
    for el in sorted(set(elements)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                r = Element(el).van_der_waals_radius
            except ValueError:
                r = None
        radius = float(r) if r is not None else DEFAULT_RADIUS_A
        out[el] = round(4.0 / 3.0 * math.pi * radius**3, 4)
    return out


def _lattice_row(system: str, lat: list[float]) -> list[float]:
    a, b, c, al, be, ga = lat
    values = {"log_b_a": math.log(b / a), "log_c_a": math.log(c / a), "alpha": al, "beta": be, "gamma": ga}
    return [round(values[k], 5) for k in LATTICE_PARAMS[system]]


def _quantiles(values: list[float]) -> list[float]:
    return [round(float(q), 5) for q in np.quantile(np.asarray(values), QUANTILES)]


def _pooled(descs: list[dict[str, Any]], key: str, own_letters: bool) -> dict[str, Any]:
    """The statistics of one group of descriptions (a space group's own letters only if asked)."""
    tables = group_tables()
    n_sites = Counter(len(d["sites"]) for d in descs)
    dof = np.zeros(4)
    letters: Counter[str] = Counter()
    for d in descs:
        t = tables[d["space_group"]]
        for letter, _ in d["sites"]:
            dof[int(t.dof[t.index(letter)])] += 1
            letters[letter] += 1
    sets = Counter(" ".join(d["elements"]) for d in descs).most_common(MAX_ELEMENT_SETS)
    out: dict[str, Any] = {
        "key": key,
        "n_structures": len(descs),
        "n_sites": {str(k): v for k, v in sorted(n_sites.items())},
        "dof_share": [round(float(x), 5) for x in dof / max(dof.sum(), 1)],
        "element_sets": dict(sets),
        "density_factor": _quantiles([d["density_factor"] for d in descs]),
    }
    if own_letters:
        out["letters"] = dict(sorted(letters.items()))
    return out


def fit_statistics(
    descriptions: Iterable[Mapping[str, Any]], min_structures: int, sources: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """The statistics file's content (a JSON-ready dict) from structure descriptions; ``ValueError``
    when there are none (nothing to fit)."""
    descs = [dict(d) for d in descriptions]
    if not descs:
        raise ValueError("no training structures to fit the generator's statistics on")
    volumes = atomic_volumes(el for d in descs for el in d["elements"])
    for d in descs:
        d["density_factor"] = d["volume"] / sum(volumes[el] * n for el, n in d["std_species"])
    tables = group_tables()
    by: dict[str, list[dict[str, Any]]] = {"all": descs}
    for d in descs:
        t = tables[d["space_group"]]
        for k in (f"sg:{t.number}", f"pg:{t.point_group}", f"cs:{t.crystal_system}"):
            by.setdefault(k, []).append(d)
    groups: dict[str, dict[str, Any]] = {}
    space_groups: dict[str, dict[str, Any]] = {}
    for n in range(1, N_SPACE_GROUPS + 1):
        t = tables[n]
        keys = (f"sg:{n}", f"pg:{t.point_group}", f"cs:{t.crystal_system}", "all")
        k = next(k for k, key in enumerate(keys) if len(by.get(key, [])) >= min_structures or key == "all")
        level, key = LEVELS[k], keys[k]
        if key not in groups:
            groups[key] = _pooled(by[key], key, own_letters=level == "space_group")
        space_groups[str(n)] = {"level": level, "key": key, "n_own": len(by.get(f"sg:{n}", []))}
    lattice = {}
    for system in SYSTEMS:
        rows = [
            _lattice_row(system, d["lattice"])
            for d in descs
            if tables[d["space_group"]].crystal_system == system
        ]
        rng = np.random.default_rng(0)
        if len(rows) > MAX_LATTICE_SAMPLES:
            rows = [rows[i] for i in sorted(rng.choice(len(rows), MAX_LATTICE_SAMPLES, replace=False))]
        arr = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(LATTICE_PARAMS[system]))
        dims = arr.shape[1]
        sd = arr.std(axis=0) if len(arr) > 1 else np.zeros(dims)
        bandwidth = sd * max(len(arr), 1) ** (-1.0 / (dims + 4))  # Scott's rule per dimension
        lattice[system] = {
            "params": list(LATTICE_PARAMS[system]),
            "n_structures": len(rows),
            "bandwidth": [round(float(b), 5) for b in bandwidth],
            "samples": rows,
        }
    frequency = Counter(d["space_group"] for d in descs)
    orbits: Counter[str] = Counter(el for d in descs for _, el in d["sites"])
    holders: Counter[str] = Counter(el for d in descs for el in d["elements"])
    return {
        "version": STATS_VERSION,
        "n_structures": len(descs),
        "sources": dict(sources or {}),
        "min_structures": int(min_structures),
        "levels_used": dict(Counter(v["level"] for v in space_groups.values())),
        "space_group_frequency": {str(k): v for k, v in sorted(frequency.items())},
        "space_groups": space_groups,
        "groups": groups,
        "lattice": lattice,
        "atomic_volume": volumes,
        "element_orbits": {el: round(orbits[el] / holders[el], 4) for el in sorted(holders)},
    }
