"""COD as an external test set: every structure's labels, composition and batch-simulated peak list.

Why: a model trained on no COD structure at all (e.g. on the Materials Project) can be scored on all
852 COD structures, a +-3-point interval instead of the test split's +-11. That needs, per CIF, what
the pipeline's own stages would give it: the crystal system that spglib detects at ``labels.symprec``
(:mod:`xrdvision.crystal.labels`, the training labels' rule), the reduced formula (to keep the same
compound out of training), whether it holds carbon and hydrogen (organic and metal-organic structures,
which the Materials Project lacks, are reported apart), and its peak list from the batch simulator
(:mod:`xrdvision.crystal.powder`), the same physics as the training structures' peak lists.

Atoms closer than 0.5 A are summed as they are (``min_distance=0``), as the per-CIF simulator does:
1.8 % of COD CIFs as pymatgen reads them have such pairs, and dropping them would bias the test set.
A CIF that fails (unreadable, no symmetry, no lines) is listed in :attr:`CodSet.failed` with one line.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.crystal.labels import declared_space_group, derive_labels, read_structure
from xrdvision.crystal.powder import PowderSettings, simulate_batch
from xrdvision.errors import InputError, one_line
from xrdvision.formats.atomic import atomic_path

_FIELDS = ("ids", "crystal_system", "space_group", "reduced_formula", "has_c_and_h")


def record_from_structure(name: str, structure: Any) -> dict[str, Any]:
    """A pymatgen structure as a batch-simulator record: one entry per species on a site (occupancies
    kept), dummy species (pymatgen's placeholders for unknown atoms) dropped."""
    species, frac, occ = [], [], []
    for site in structure:
        for sp, o in site.species.items():
            if type(sp).__name__ == "DummySpecies":
                continue
            species.append(str(sp))
            frac.append([float(x) for x in site.frac_coords])
            occ.append(float(o))
    return {
        "id": name,
        "cell": structure.lattice.matrix.tolist(),
        "species": species,
        "frac": frac,
        "occupancy": occ,
    }


def has_carbon_and_hydrogen(elements: Sequence[str]) -> bool:
    """True for a composition with both C and H: organic or metal-organic."""
    names = {str(e) for e in elements}
    return "C" in names and "H" in names


def read_cod_entry(path: str | Path, symprec: float, angle_tolerance: float) -> dict[str, Any]:
    """Labels, composition flag and batch record of one CIF; :class:`InputError` if it is unusable."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structure = read_structure(path)
        labels = derive_labels(structure, symprec, angle_tolerance, declared_space_group(path), path)
    elements = [el.symbol for el in structure.composition.elements]
    return {
        "id": path.stem,
        "crystal_system": labels.crystal_system,
        "space_group": labels.space_group,
        "reduced_formula": labels.reduced_formula,
        "has_c_and_h": has_carbon_and_hydrogen(elements),
        "record": record_from_structure(path.stem, structure),
    }


@dataclass
class CodSet:
    """The scored COD structures (in file-name order) with their peak lists (``offsets``-indexed
    ``two_theta``, ``intensity``, ``d``, as :class:`xrdvision.crystal.powder.PeakBatch`)."""

    ids: list[str]
    crystal_system: np.ndarray
    space_group: np.ndarray
    reduced_formula: np.ndarray
    has_c_and_h: np.ndarray
    offsets: np.ndarray
    two_theta: np.ndarray
    intensity: np.ndarray
    d: np.ndarray
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of build_cod_set
    normal: np.ndarray | None = None  # (P, 3) unit plane normals when simulated with_normals

    def __len__(self) -> int:
        return len(self.ids)

    def peaks(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(two_theta, intensity, d)`` of structure ``i``."""
        sl = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        return self.two_theta[sl], self.intensity[sl], self.d[sl]

    def save(self, path: str | Path) -> None:
        """One ``.npz`` (written atomically); the failures as ``failed_ids`` / ``failed_reasons``."""
        arrays = {
            k: np.asarray(getattr(self, k)) for k in (*_FIELDS, "offsets", "two_theta", "intensity", "d")
        }
        arrays["failed_ids"] = np.array(list(self.failed), dtype=str)
        arrays["failed_reasons"] = np.array(list(self.failed.values()), dtype=str)
        arrays["seconds"] = np.array(self.seconds)
        if self.normal is not None:
            arrays["normal"] = np.asarray(self.normal, dtype=np.float16)
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> CodSet:
        with np.load(path, allow_pickle=False) as z:
            kw = {k: z[k] for k in z.files if not k.startswith("failed_") and k != "seconds"}
            seconds = float(z["seconds"]) if "seconds" in z.files else 0.0
            failed = dict(zip(z["failed_ids"].tolist(), z["failed_reasons"].tolist(), strict=True))
        kw["ids"] = [str(i) for i in kw["ids"]]
        return cls(**kw, failed=failed, seconds=seconds)


def build_cod_set(
    paths: Sequence[str | Path],
    symprec: float = 0.01,
    angle_tolerance: float = 5.0,
    *,
    workers: int = 2,
    timeout_s: float = 120.0,
    settings: PowderSettings | None = None,
) -> CodSet:
    """Read, label and simulate every CIF of ``paths`` (``workers`` processes, a time limit per CIF)."""
    import time

    from xrdvision.data.pool import TaskFailure, run_pool

    t0 = time.perf_counter()
    entries: dict[int, dict[str, Any]] = {}
    failed: dict[str, str] = {}

    def keep(i: int, out: Any) -> None:
        if isinstance(out, TaskFailure):
            failed[Path(paths[i]).stem] = out.reason
        else:
            entries[i] = out

    tasks = [(i, (str(p), symprec, angle_tolerance)) for i, p in enumerate(paths)]
    run_pool(
        _entry_or_reason, tasks, keep, workers=workers, timeout_s=timeout_s, preload=("pymatgen.io.cif",)
    )
    for i in sorted(entries):
        if "reason" in entries[i]:
            failed[entries[i]["id"]] = entries[i]["reason"]
            del entries[i]
    order = sorted(entries)
    settings = settings or PowderSettings(min_distance=0.0)
    batch = simulate_batch([entries[i]["record"] for i in order], settings, source="cod")
    good = [j for j in range(len(order)) if j not in batch.errors]
    for j, reason in batch.errors.items():
        failed[entries[order[j]]["id"]] = reason
    rows = [entries[order[j]] for j in good]
    lists = [batch.peaks(j) for j in good]
    counts = np.array([len(p) for p in lists], dtype=np.int64)

    def cat(attr: str) -> np.ndarray:
        return np.concatenate([getattr(p, attr) for p in lists]) if lists else np.zeros(0)

    return CodSet(
        ids=[r["id"] for r in rows],
        crystal_system=np.array([r["crystal_system"] for r in rows], dtype=str),
        space_group=np.array([r["space_group"] for r in rows], dtype=np.int64),
        reduced_formula=np.array([r["reduced_formula"] for r in rows], dtype=str),
        has_c_and_h=np.array([r["has_c_and_h"] for r in rows], dtype=bool),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        two_theta=cat("two_theta"),
        intensity=cat("intensity"),
        d=cat("d"),
        failed=dict(sorted(failed.items())),
        seconds=time.perf_counter() - t0,
        normal=cat("normal").reshape(-1, 3) if settings.with_normals else None,
    )


def _entry_or_reason(path: str, symprec: float, angle_tolerance: float) -> dict[str, Any]:
    try:
        return read_cod_entry(path, symprec, angle_tolerance)
    except InputError as exc:
        return {"id": Path(path).stem, "reason": str(exc)}
    except Exception as exc:  # pymatgen/spglib raise many types on odd files: one line, the batch goes on
        return {"id": Path(path).stem, "reason": f"{path}: {one_line(exc)}"}


def pipeline_split(cod: CodSet, ids: Sequence[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """``{cod_id: "train" | "val" | "test"}`` for the structures ``ids`` of ``cod``, as the split stage
    assigns them (:func:`xrdvision.data.split.compound_groups` and :func:`~xrdvision.data.split.assign_splits`
    over the same labels): e.g. the default run's test split (the 719 canonical structures, seed 42)
    without its DVC outputs at hand."""
    from xrdvision.data.split import assign_splits, compound_groups

    where = {x: i for i, x in enumerate(cod.ids)}
    rows = [
        {
            "cod_id": x,
            "reduced_formula": str(cod.reduced_formula[where[x]]),
            "space_group": cod.space_group[where[x]],
        }
        for x in ids
        if x in where
    ]
    groups = compound_groups(rows)
    systems = [str(cod.crystal_system[where[r["cod_id"]]]) for r in rows]
    assignment = assign_splits(groups, systems, fractions, seed)
    return {r["cod_id"]: assignment[g] for r, g in zip(rows, groups, strict=True)}
