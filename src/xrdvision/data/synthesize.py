"""The ``synthesize`` stage: random crystals (PyXtal) of the training split's space groups, for training only.

852 real structures are few for a 7-class model. Random crystals of a given space group, with atoms on
its Wyckoff positions, carry the one thing the label depends on (the symmetry, hence which reflections
exist and how the cell's metric places them), and Schopmans et al. (2023) showed that training on them
generalises to real patterns. They are added to the *training* images only: validation and test stay
real COD structures, so the reported accuracy is still measured on real, unseen compounds.

What is drawn, per crystal system (all seeded from ``params.seed``):
- a space group, in proportion to how often it occurs among that system's *training* structures (the
  real distribution is very skewed: P2_1/c, P-1, Pnma, ...); uniform over the system's groups if the
  training split has none;
- a set of elements: the elements of a random training structure (real chemistry), at most
  ``synth.max_species`` of them;
- a stoichiometry: for each element one or two Wyckoff multiplicities of that group, at most
  ``synth.max_atoms`` atoms in the conventional cell, accepted only if PyXtal finds it compatible.

The crystal is then written as a CIF and goes through the same simulate and render functions as COD
CIFs; its label is what the symmetry analysis of the *generated* structure says (PyXtal may land on a
higher symmetry), exactly as for a COD CIF. Outputs, all in ``out_dir``: ``cifs/``, ``patterns/``
(npz + manifest), ``images/``, ``train.csv`` (split-list format) and ``summary.json``.
"""

from __future__ import annotations

import csv
import functools
import logging
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.crystal.systems import CRYSTAL_SYSTEMS
from xrdvision.errors import XrdVisionError
from xrdvision.formats.atomic import atomic_open, write_json
from xrdvision.formats.tables import SPLIT_COLUMNS, read_table

log = logging.getLogger(__name__)

SG_RANGES = {
    "triclinic": (1, 2),
    "monoclinic": (3, 15),
    "orthorhombic": (16, 74),
    "tetragonal": (75, 142),
    "trigonal": (143, 167),
    "hexagonal": (168, 194),
    "cubic": (195, 230),
}
MAX_TRIES = 40  # draws of (group, elements, stoichiometry) per crystal before it is reported failed


def crystal_system_of(space_group: int) -> str:
    """The crystal system of an International Tables space-group number (1-230)."""
    for system, (lo, hi) in SG_RANGES.items():
        if lo <= space_group <= hi:
            return system
    raise ValueError(f"space group {space_group} is not in 1-230")


def space_group_weights(train_groups: list[int], system: str) -> tuple[np.ndarray, np.ndarray]:
    """(space groups, probabilities) for one crystal system, from the training structures' groups."""
    lo, hi = SG_RANGES[system]
    groups = np.array([g for g in train_groups if lo <= g <= hi], dtype=np.int64)
    if groups.size == 0:
        sgs = np.arange(lo, hi + 1)
        return sgs, np.full(sgs.size, 1.0 / sgs.size)
    sgs, counts = np.unique(groups, return_counts=True)
    return sgs, counts / counts.sum()


def element_sets(formulas: list[str], max_species: int) -> list[tuple[str, ...]]:
    """The distinct element sets of the training structures (real chemistry to draw from)."""
    from pymatgen.core import Composition

    out: set[tuple[str, ...]] = set()
    unreadable: list[str] = []
    for formula in formulas:
        try:
            elements = tuple(sorted(str(e) for e in Composition(formula).elements))
        except Exception:  # an unparsable formula only removes one choice of chemistry: say so, go on
            unreadable.append(formula)
            continue
        if elements:
            out.add(elements)
    if unreadable:
        log.warning(
            "synthesize: %d training formula(s) unreadable, not used as chemistry: %s",
            len(unreadable),
            unreadable[:3],
        )
    if not out:
        raise XrdVisionError("synthesize: no element set could be read from the training formulas")
    return sorted(out)


@functools.cache
def _group(space_group: int) -> Any:
    """PyXtal's Group (its Wyckoff table); built once per group, as it takes ~10 ms and a crystal may
    need several draws."""
    from pyxtal.symmetry import Group

    return Group(space_group)


def draw_stoichiometry(
    space_group: int, n_species: int, max_atoms: int, rng: np.random.Generator
) -> list[int] | None:
    """Atoms per element in the conventional cell: each a sum of 1-2 Wyckoff multiplicities of the
    group, in total at most ``max_atoms``, and compatible with the group (PyXtal's check)."""
    group = _group(space_group)
    mults = sorted({int(w.multiplicity) for w in group.Wyckoff_positions if w.multiplicity <= max_atoms})
    if not mults or mults[0] * n_species > max_atoms:
        return None
    for _ in range(20):
        counts = [int(sum(rng.choice(mults, size=rng.integers(1, 3)))) for _ in range(n_species)]
        if sum(counts) <= max_atoms and group.check_compatible(counts)[0]:
            return counts
    return None


def random_crystal(
    space_group: int, elements: tuple[str, ...], max_atoms: int, rng: np.random.Generator
) -> Any | None:
    """A random pymatgen Structure of ``space_group`` with these elements, or None if none was found."""
    from pyxtal import pyxtal

    counts = draw_stoichiometry(space_group, len(elements), max_atoms, rng)
    if counts is None:
        return None
    crystal = pyxtal()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            crystal.from_random(3, space_group, list(elements), counts, random_state=rng)
        except Exception:  # PyXtal signals "no arrangement found" in several ways; the caller redraws
            return None
    if not crystal.valid:
        return None
    return crystal.to_pymatgen()


def synth_id(system: str, k: int) -> str:
    """File stem of synthetic crystal ``k`` of a system: ``synth-<system>-<k>`` (never a COD number)."""
    return f"synth-{system}-{k:05d}"


Task = tuple[Params, np.ndarray, np.ndarray, list[tuple[str, ...]], str, int]


def _crystal_cif(task: Task) -> tuple[str, str | None]:
    """One synthetic crystal (worker side): (file stem, CIF text or None if none was found).

    Crystal ``k`` of a system draws from its own generator (seed, system, k), so the result does not
    depend on which process makes it or in what order.
    """
    from pymatgen.io.cif import CifWriter

    params, sgs, probs, chemistry, system, k = task
    sp = params.synth
    rng = np.random.default_rng([params.seed, CRYSTAL_SYSTEMS.index(system), k, 0x5E])
    for _ in range(MAX_TRIES):
        sg = int(rng.choice(sgs, p=probs))
        elements = chemistry[int(rng.integers(len(chemistry)))]
        if len(elements) > sp.max_species:
            elements = tuple(sorted(str(e) for e in rng.choice(elements, size=sp.max_species, replace=False)))
        structure = random_crystal(sg, elements, sp.max_atoms, rng)
        if structure is not None:
            return synth_id(system, k), str(CifWriter(structure))
    return synth_id(system, k), None


def generate_cifs(
    params: Params, train_rows: list[dict[str, str]], manifest_rows: list[dict[str, str]], cif_dir: Path
) -> dict[str, Any]:
    """Write ``synth.per_system`` random-crystal CIFs per crystal system into ``cif_dir``.

    Crystals are drawn in ``simulate.workers`` processes; each is seeded by (seed, system, k), so a
    rerun writes the same files whatever the number of workers, and an interrupted run resumes: CIFs
    already there are kept.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    sp = params.synth
    train_ids = {r["cod_id"] for r in train_rows}
    train_groups = [int(r["space_group"]) for r in train_rows if r.get("space_group", "").isdigit()]
    formulas = [r["formula"] for r in manifest_rows if r["cod_id"] in train_ids and r.get("formula")]
    chemistry = element_sets(formulas, sp.max_species)
    cif_dir.mkdir(parents=True, exist_ok=True)
    weights = {s: space_group_weights(train_groups, s) for s in CRYSTAL_SYSTEMS}
    todo = [(s, k) for s in CRYSTAL_SYSTEMS for k in range(sp.per_system)]
    missing = [(s, k) for s, k in todo if not (cif_dir / f"{synth_id(s, k)}.cif").exists()]
    kept = len(todo) - len(missing)
    tasks: list[Task] = [(params, *weights[s], chemistry, s, k) for s, k in missing]
    made = 0
    failed: list[str] = []

    def keep(stem: str, text: str | None) -> None:
        nonlocal made
        if text is None:
            failed.append(f"{stem}.cif: no random crystal found in {MAX_TRIES} draws")
            return
        with atomic_open(cif_dir / f"{stem}.cif", "w", encoding="utf-8") as fh:
            fh.write(text)
        made += 1

    quiet = not log.isEnabledFor(logging.INFO)  # the CLI's --quiet hides progress bars too
    bar = tqdm(total=len(todo), initial=kept, desc="synthesize", unit="crystal", disable=quiet)
    workers = min(params.simulate.workers, len(tasks))
    if workers <= 1:
        for task in tasks:
            keep(*_crystal_cif(task))
            bar.update()
    else:
        ctx = multiprocessing.get_context("spawn")  # no copy of the parent's threads (TensorFlow, BLAS)
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for stem, text in pool.map(_crystal_cif, tasks, chunksize=8):
                keep(stem, text)
                bar.update()
    bar.close()
    return {"n_written": made, "n_kept": kept, "failed": failed}


def _empty_train_list(out_dir: Path) -> None:
    with atomic_open(out_dir / "train.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerow(SPLIT_COLUMNS)


def run_synthesize(params: Params, split_dir: Path, manifest: Path, out_dir: Path) -> dict[str, Any]:
    """The stage: CIFs -> simulate -> render -> ``train.csv``. ``synth.per_system: 0`` writes an empty
    ``train.csv`` (the features stage then adds nothing) and a summary saying so."""
    from xrdvision.data.render import run_render
    from xrdvision.data.simulate import run_simulate

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sp = params.synth
    if sp.per_system == 0:
        _empty_train_list(out_dir)
        summary: dict[str, Any] = {"per_system": 0, "n_images": 0, "reason": "synth.per_system is 0"}
        write_json(out_dir / "summary.json", summary)
        return summary
    train_rows = read_table(Path(split_dir) / "train.csv", ["cod_id", "space_group"], "training split list")
    manifest_rows = read_table(Path(manifest), ["cod_id", "formula"], "simulate manifest")
    gen = generate_cifs(params, train_rows, manifest_rows, out_dir / "cifs")
    for line in gen["failed"]:
        log.warning("synthesize: skipped: %s", line)
    sim = run_simulate(params, out_dir / "cifs", out_dir / "patterns", progress=True)
    render_params = replace(params, augment=replace(params.augment, copies=sp.copies))
    run_render(render_params, out_dir / "patterns", out_dir / "images")

    labels = {
        r["cod_id"]: r
        for r in read_table(out_dir / "patterns" / "manifest.csv", ["cod_id", "status"], "manifest")
        if r["status"] == "ok"
    }
    rows = []
    for r in read_table(out_dir / "images" / "index.csv", ["image", "cod_id"], "image index"):
        lab = labels.get(r["cod_id"])
        if lab is not None:  # the copy index stays in the file name (<id>_<copy>.png), as for COD images
            rows.append([r["image"], r["cod_id"], r["cod_id"], lab["crystal_system"], lab["space_group"]])
    with atomic_open(out_dir / "train.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(SPLIT_COLUMNS)
        w.writerows(rows)
    per_system: dict[str, int] = {}
    landed_higher = 0
    for cod_id, lab in labels.items():
        per_system[lab["crystal_system"]] = per_system.get(lab["crystal_system"], 0) + 1
        landed_higher += lab["crystal_system"] != cod_id.split("-")[1]
    summary = {
        "per_system": sp.per_system,
        "n_cifs": gen["n_written"] + gen["n_kept"],
        "n_generation_failed": len(gen["failed"]),
        "n_simulated": sim["n_ok"],
        "n_simulation_failed": sim["n_failed"],
        "n_images": len(rows),
        "labels_per_system": dict(sorted(per_system.items())),
        "n_other_system_than_drawn": int(landed_higher),
    }
    write_json(out_dir / "summary.json", summary)  # no wall time in it: the output hashes the same every run
    return {**summary, "seconds": round(time.perf_counter() - t0, 1)}
