"""Draw synthetic crystals from the fitted statistics (:mod:`xrdvision.data.generator_fit`).

Why its own module: this is the inner loop of 10^5 crystals, so it works on plain arrays only. A
:class:`Sampler` turns the statistics file into arrays once (probabilities per position, element
sets, density-factor quantiles, lattice KDE samples); a crystal is then a few draws and one affine
map per occupied orbit (:mod:`xrdvision.data.generator_tables`), with no pymatgen, PyXtal or CIF
object. One crystal of space group ``sg``:

1. the number of occupied orbits from the group's histogram; a Wyckoff position per orbit (by the
   letter counts at the space-group level, or by the share of 0-3 free coordinates above it); a
   fixed position (no free coordinate) holds one orbit at most;
2. a real training crystal's element set, each element on at least one orbit when there are orbits
   enough; a uniform random generating point per orbit;
3. the cell: its shape from the crystal system's KDE (log axis ratios and angles; the system's
   constraints by construction), its volume = the summed atomic volumes x a density factor drawn
   from the group's quantiles.

A draw over ``max_atoms`` atoms in the conventional cell is drawn again (up to ``MAX_TRIES`` times,
then the crystal is counted as not generated). Each orbit's generating point is drawn again (up to
``MAX_TRIES`` times) while an atom of it comes closer than ``min_distance`` to another
(:meth:`Sampler._place`; 0 turns the check off, and the batch simulator still fails a crystal whose
atoms are closer than 0.5 A). The check is most of the sampling time, so it measures from one atom per
orbit, which gives the all-atoms loop's answers (:func:`place_reference`, kept as the tests' reference).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.crystal.powder_input import cholesky_sym3, metric
from xrdvision.data.generator_fit import LATTICE_PARAMS, QUANTILES, STATS_VERSION, SYSTEMS
from xrdvision.data.generator_tables import N_SPACE_GROUPS, GroupTable, group_tables
from xrdvision.errors import InputError

MAX_TRIES = 20
_TOP = (
    "version",
    "space_groups",
    "groups",
    "lattice",
    "atomic_volume",
    "space_group_frequency",
    "element_orbits",
)


class _Group:
    """One statistics group as arrays."""

    def __init__(self, g: Mapping[str, Any]) -> None:
        n = {int(k): int(v) for k, v in g["n_sites"].items()}
        self.n_values = np.array(list(n), dtype=np.int64)
        self.n_cum = np.cumsum(_normalised(list(n.values())))
        sets = g["element_sets"]
        self.sets = [tuple(s.split()) for s in sets]
        self.set_cum = np.cumsum(_normalised(list(sets.values())))
        self.density = np.asarray(g["density_factor"], dtype=np.float64)
        self.dof_share = np.asarray(g["dof_share"], dtype=np.float64)
        self.letters = {str(k): float(v) for k, v in g.get("letters", {}).items()}
        if len(self.density) != len(QUANTILES) or not (self.density > 0).all() or not self.sets:
            raise ValueError(f"group {g.get('key')}: density_factor or element_sets malformed")


def _draw(cum: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """``size`` indices drawn with the weights whose cumulative sum is ``cum``."""
    return np.minimum(np.searchsorted(cum, rng.random(size) * cum[-1], side="right"), len(cum) - 1)


def _normalised(weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or (w < 0).any() or not w.sum() > 0:
        raise ValueError("empty or negative weights")
    return w / w.sum()


class Sampler:
    """Crystals from a statistics dict (as :func:`~xrdvision.data.generator_fit.fit_statistics`
    writes it); ``source`` names the file in errors: a malformed file is an :class:`InputError`.
    ``tables``: the Wyckoff tables (:func:`~xrdvision.data.generator_tables.group_tables`, built here
    if not given; a pool worker gets them with its task instead of spending seconds on PyXtal)."""

    def __init__(
        self,
        stats: Mapping[str, Any],
        max_atoms: int,
        min_distance: float = 1.0,
        source: str = "statistics",
        tables: Mapping[int, GroupTable] | None = None,
    ) -> None:
        self.source, self.max_atoms, self.min_distance = source, int(max_atoms), float(min_distance)
        try:
            missing = [k for k in _TOP if k not in stats]
            if missing:
                raise ValueError(f"lacks {', '.join(missing)}")
            if stats["version"] != STATS_VERSION:
                raise ValueError(f"version {stats['version']}, this code reads {STATS_VERSION}")
            self.groups = {k: _Group(g) for k, g in stats["groups"].items()}
            self.space_groups = {int(k): (v["level"], v["key"]) for k, v in stats["space_groups"].items()}
            unknown = sorted({key for _, key in self.space_groups.values()} - set(self.groups))
            if unknown:
                raise ValueError(f"space groups refer to group {unknown[0]!r}, which it lacks")
            self.volume = {str(k): float(v) for k, v in stats["atomic_volume"].items()}
            self.lattice = {
                s: (
                    np.asarray(v["samples"], dtype=np.float64).reshape(
                        len(v["samples"]), len(LATTICE_PARAMS[s])
                    ),
                    np.asarray(v["bandwidth"], dtype=np.float64),
                )
                for s, v in stats["lattice"].items()
                if s in SYSTEMS
            }
            self.frequency = {int(k): int(v) for k, v in stats["space_group_frequency"].items()}
            self.orbits = {str(k): float(v) for k, v in stats["element_orbits"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(
                source, f"not a generator statistics file: {type(exc).__name__}: {exc}"
            ) from None
        self.tables = tables if tables is not None else group_tables()  # a worker may be given them
        self._position_prob: dict[int, np.ndarray] = {}

    def space_group_prior(self, prior: str) -> np.ndarray:
        """Probabilities (230,) of space groups 1-230: ``uniform`` or ``train`` (training frequencies)."""
        if prior == "uniform":
            return np.full(N_SPACE_GROUPS, 1.0 / N_SPACE_GROUPS)
        if prior == "train":
            w = np.array([self.frequency.get(n, 0) for n in range(1, N_SPACE_GROUPS + 1)], dtype=np.float64)
            if not w.sum() > 0:
                raise InputError(
                    self.source, "space_group_frequency is empty: prior 'train' has nothing to draw from"
                )
            return w / w.sum()
        raise InputError(self.source, f"unknown space-group prior {prior!r} (uniform or train)")

    def _stats_of(self, sg: int) -> tuple[str, _Group, GroupTable]:
        if sg not in self.space_groups:
            raise InputError(
                self.source,
                f"space group {sg} has no statistics at any level "
                "(space group, point group, crystal system, all)",
            )
        level, key = self.space_groups[sg]
        return level, self.groups[key], self.tables[sg]

    def position_prob(self, sg: int) -> np.ndarray:
        """Probabilities over the group's Wyckoff positions (PyXtal's order)."""
        if sg in self._position_prob:
            return self._position_prob[sg]
        level, g, t = self._stats_of(sg)
        if level == "space_group" and g.letters:
            w = np.array([g.letters.get(x, 0.0) for x in t.letters])
        else:
            per_dof = np.bincount(t.dof, minlength=4).astype(np.float64)
            w = g.dof_share[t.dof] / per_dof[t.dof]
        if not w.sum() > 0:
            w = np.ones(len(t.letters))
        self._position_prob[sg] = w / w.sum()
        return self._position_prob[sg]

    def _positions(self, n: int, prob: np.ndarray, t: GroupTable, rng: np.random.Generator) -> list[int]:
        """``n`` positions, a fixed one (no free coordinate) at most once."""
        out: list[int] = []
        p = prob
        for _ in range(4):
            need = n - len(out)
            if need <= 0 or not p.sum() > 0:
                break
            for j in _draw(np.cumsum(p), rng, need):
                if t.dof[j] == 0:
                    if p[j] == 0:
                        continue  # a fixed position already taken
                    p = p.copy() if p is prob else p
                    p[j] = 0.0
                out.append(int(j))
        return out

    def _cell(self, system: str, volume: float, rng: np.random.Generator) -> list[float]:
        """``[a, b, c, alpha, beta, gamma]`` of the system's shape (KDE) and the given volume."""
        samples, bw = self.lattice.get(system, (np.zeros((0, 0)), np.zeros(0)))
        names = LATTICE_PARAMS[system]
        for _ in range(MAX_TRIES):
            if len(samples):
                v = dict(
                    zip(
                        names,
                        samples[rng.integers(len(samples))] + rng.normal(0.0, 1.0, len(names)) * bw,
                        strict=True,
                    )
                )
            else:  # no training crystal of this system: a broad default shape
                v = {k: (rng.normal(0, 0.3) if k.startswith("log") else rng.uniform(80, 110)) for k in names}
            angles = [
                v.get("alpha", 90.0),
                v.get("beta", 90.0),
                v.get("gamma", 120.0 if system in ("trigonal", "hexagonal") else 90.0),
            ]
            ca, cb, cg = np.cos(np.radians(angles))
            shape = 1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg
            if min(angles) > 30 and max(angles) < 150 and shape > 0.05:
                break
        else:
            angles, shape = [90.0, 90.0, 90.0], 1.0
        rb, rc = math.exp(v.get("log_b_a", 0.0)), math.exp(v.get("log_c_a", 0.0))
        if system in ("tetragonal", "trigonal", "hexagonal"):
            rb = 1.0
        a = (volume / (rb * rc * math.sqrt(shape))) ** (1.0 / 3.0)
        return [a, a * rb, a * rc, *angles]

    def _place(
        self, t: GroupTable, sites: list[int], cell: list[float], rng: np.random.Generator
    ) -> np.ndarray | None:
        """The orbits' coordinates, each generating point drawn again (up to ``MAX_TRIES`` times) while
        an atom of it is closer than ``min_distance`` to another (minimum image); None if one never fits.

        The decisions and random draws of :func:`place_reference`, with less work per try: when
        ``min_distance`` is under half the lattice's smallest singular value, a rounded fractional
        difference closer than it is the true nearest image, so the check is symmetric under the
        space group (whose operations are isometries of the cell, :func:`_isometries`), which maps each
        orbit and the placed atoms onto themselves: every atom of an orbit has the same nearest
        neighbours as its first one, and only that atom is measured. Otherwise the reference runs. A fixed
        position (no free coordinate) that clashes once clashes on every try: its remaining tries'
        points are drawn at once and the draw fails, as the loop would."""
        if self.min_distance <= 0:
            return np.concatenate([t.orbit(j, rng.random(3)) for j in sites])
        lattice = cholesky_sym3(metric(cell))
        if not (
            self.min_distance < 0.5 * np.linalg.svd(lattice, compute_uv=False)[-1] and _isometries(t, lattice)
        ):
            return place_reference(t, sites, cell, rng, self.min_distance)
        limit = self.min_distance**2
        mult = t.multiplicity[sites]
        placed = np.empty((int(mult.sum()), 3))
        n = 0  # atoms placed so far: placed[:n]
        for j, m in zip(sites, mult.tolist(), strict=True):
            maps = t.ops[t.offsets[j] : t.offsets[j + 1]]
            rot, shift = maps[:, :, :3], maps[:, :, 3]
            for k in range(MAX_TRIES):
                new = np.mod(rot @ rng.random(3) + shift, 1.0)
                placed[n : n + m] = new
                delta = new[0] - placed[: n + m]
                delta -= np.rint(delta)  # np.round's numbers (it is rint at 0 decimals), less overhead
                cart = delta @ lattice
                d2 = np.einsum("ij,ij->i", cart, cart)
                d2[n] = np.inf  # the atom itself
                if d2.min() >= limit:
                    break
                if t.dof[j] == 0:  # the same atoms on every try
                    rng.random((MAX_TRIES - 1 - k, 3))
                    return None
            else:
                return None
            n += m
        return placed

    def _kinds(self, elements: tuple[str, ...], n: int, rng: np.random.Generator) -> list[str]:
        """An element per orbit: each of the set once (if there are orbits enough), the rest in
        proportion to the elements' mean orbits per real structure; in random order."""
        w = np.array([self.orbits.get(el, 1.0) for el in elements])
        if n < len(elements):
            return [elements[i] for i in rng.choice(len(elements), size=n, replace=False, p=w / w.sum())]
        extra = _draw(np.cumsum(w), rng, n - len(elements))
        kinds = list(elements) + [elements[i] for i in extra]
        return [kinds[i] for i in rng.permutation(n)]

    def crystal(self, sg: int, rng: np.random.Generator, name: str) -> dict[str, Any] | None:
        """One crystal as a batch-simulator record (``id``, ``cell``, ``species``, ``frac``, ``sg``),
        or None when no draw fits ``max_atoms``."""
        _, g, t = self._stats_of(sg)
        prob = self.position_prob(sg)
        for _ in range(MAX_TRIES):
            n = int(g.n_values[_draw(g.n_cum, rng, 1)[0]])
            sites = sorted(self._positions(n, prob, t, rng), key=lambda j: t.dof[j])  # fixed ones first
            mult = t.multiplicity[sites]
            if not sites or mult.sum() > self.max_atoms:
                continue
            elements = g.sets[_draw(g.set_cum, rng, 1)[0]]
            kinds = self._kinds(elements, len(sites), rng)
            species = [el for el, m in zip(kinds, mult, strict=True) for _ in range(int(m))]
            atoms = sum(self.volume.get(el, 14.0) * int(m) for el, m in zip(kinds, mult, strict=True))
            factor = float(np.interp(rng.random(), QUANTILES, g.density))
            cell = self._cell(t.crystal_system, atoms * factor, rng)
            frac = self._place(t, sites, cell, rng)
            if frac is not None:
                return {"id": name, "cell": cell, "species": species, "frac": frac, "sg": sg}
        return None


_ROTATIONS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _rotations(t: GroupTable) -> tuple[np.ndarray, np.ndarray]:
    """The group's distinct rotation parts ``R`` (its general position's, centring removed) and their
    transposes; once per group and process."""
    if t.number not in _ROTATIONS:
        rot = np.unique(t.ops[t.offsets[0] : t.offsets[1], :, :3], axis=0)
        _ROTATIONS[t.number] = rot, rot.transpose(0, 2, 1).copy()
    return _ROTATIONS[t.number]


def _isometries(t: GroupTable, lattice: np.ndarray) -> bool:
    """Whether the group's operations keep distances in this cell (``R^T G R = G`` for the metric ``G``
    and every rotation part ``R``): the crystal system's constraints hold, as :meth:`Sampler._cell` makes
    them."""
    g = lattice @ lattice.T
    rot, rot_t = _rotations(t)
    return float(np.abs(rot_t @ g @ rot - g).max()) <= 1e-9 * float(np.abs(g).max())


def place_reference(
    t: GroupTable,
    sites: list[int],
    cell: list[float],
    rng: np.random.Generator,
    min_distance: float,
) -> np.ndarray | None:
    """The one-orbit-at-a-time placement that :meth:`Sampler._place` vectorises (its reference in the
    tests): each orbit's generating point drawn until no atom of it is closer than ``min_distance`` to
    one placed before or to another of its own, at most ``MAX_TRIES`` times."""
    lattice = cholesky_sym3(metric(cell))
    limit = min_distance**2
    placed = np.zeros((0, 3))
    for j in sites:
        for _ in range(MAX_TRIES):
            new = t.orbit(j, rng.random(3))
            both = np.concatenate([placed, new])
            delta = new[:, None, :] - both[None, :, :]
            delta -= np.round(delta)
            cart = delta @ lattice
            d2 = np.einsum("ijk,ijk->ij", cart, cart)
            d2[:, len(placed) :][np.eye(len(new), dtype=bool)] = np.inf
            if d2.min(initial=np.inf) >= limit:
                break
        else:
            return None
        placed = both
    return placed


def load_sampler(path: str | Path, max_atoms: int, min_distance: float = 1.0) -> Sampler:
    """A :class:`Sampler` from a statistics file (``stats.json``); :class:`InputError` naming the file
    if it is missing, not JSON, or not a statistics file."""
    path = Path(path)
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "generator statistics file not found (run the generate stage)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(
            path, f"unreadable generator statistics file ({type(exc).__name__}: {exc})"
        ) from None
    return Sampler(stats, max_atoms, min_distance, source=str(path))
