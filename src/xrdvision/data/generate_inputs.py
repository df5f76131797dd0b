"""The generator's training structures and the fit on them (the first step of the ``generate`` stage).

Why a module apart from the stage: which structures may teach the generator is the leakage rule, and
it deserves one place that says it. The statistics are fitted on

* COD's training split (``data/split/train.csv``, CIFs from ``data/cifs``), without any structure whose
  reduced formula is that of a COD validation or test structure (the rule of
  :func:`xrdvision.data.peaklists.cod_reference` with COD training: validation and test compounds never
  contribute, whatever their space group);
* and, when ``generate.mp_structures`` > 0, a seeded sample of that many Materials Project structures
  from ``mp.folder``, drawn after dropping the same formulas (the default is 0: a clone without
  ``../shared/mp`` runs, and ``make repro`` stays fast; an experiment sets it, e.g. 20000).

Structures are described in ``generate.workers`` processes (CIFs through pymatgen once, then spglib on
arrays); one that cannot be described is counted in ``stats.json`` (``selection``) with its line.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.data.generator_fit import describe, fit_statistics
from xrdvision.data.mp_source import read_mp_records
from xrdvision.data.peaklists import cod_reference
from xrdvision.data.shard_runner import run_tasks
from xrdvision.errors import InputError, XrdVisionError, one_line
from xrdvision.formats.tables import read_split, read_table

_CIF_CHUNK = 100
_RECORD_CHUNK = 500


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def describe_task(
    task: tuple[int, str, list[Any], float, float],
) -> tuple[int, list[dict[str, Any]], list[str]]:
    """Worker: descriptions of CIF paths (``"cif"``) or records (``"records"``), and one line per
    structure that gave none; ``task[0]`` (its index) comes back first."""
    from xrdvision.crystal.labels import read_structure
    from xrdvision.data.cod_set import record_from_structure

    k, kind, items, symprec, angle_tolerance = task
    out, failed = [], []
    for item in items:
        try:
            if kind == "cif":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    record = record_from_structure(Path(item).stem, read_structure(item))
            else:
                record = item
            d = describe(record, symprec, angle_tolerance)
            out.append({**d, "source": kind})
        except Exception as exc:  # a bad CIF or cell: one line, the fit goes on
            name = item if kind == "cif" else item.get("id", "?")
            failed.append(f"{name}: {exc if isinstance(exc, InputError | ValueError) else one_line(exc)}")
    return k, out, failed


def training_sets(
    params: Params, cif_dir: Path, split_dir: Path, manifest_path: Path
) -> tuple[list[tuple[str, list[Any]]], dict[str, Any]]:
    """What the statistics are fitted on, as describe chunks, and a description of the selection."""
    cod_on = replace(params, split=replace(params.split, train_sources=["cod"]))  # val + test held out
    formulas, reference = cod_reference(cod_on, split_dir, manifest_path)
    rows = read_table(manifest_path, ["cod_id", "status", "reduced_formula"], "manifest")
    formula = {r["cod_id"].strip(): r["reduced_formula"].strip() for r in rows}
    train_ids = sorted({r["cod_id"].strip() for r in read_split(split_dir / "train.csv")})
    kept = [i for i in train_ids if formula.get(i) not in formulas]
    missing = [i for i in kept if not (cif_dir / f"{i}.cif").is_file()]
    if missing:
        raise InputError(cif_dir / f"{missing[0]}.cif", "training CIF not found (run the ingest stage)")
    paths = [str(cif_dir / f"{i}.cif") for i in kept]
    chunks: list[tuple[str, list[Any]]] = [
        ("cif", paths[k : k + _CIF_CHUNK]) for k in range(0, len(paths), _CIF_CHUNK)
    ]
    info: dict[str, Any] = {
        **reference,
        "n_cod_train": len(train_ids),
        "n_cod_train_dropped_for_leakage": len(train_ids) - len(kept),
    }
    n_mp = params.generate.mp_structures
    if n_mp > 0:
        folder = Path(params.mp.folder)
        if not folder.is_dir():
            raise InputError(folder, "generate.mp_structures > 0 but mp.folder is not a folder")
        errors: list[str] = []
        records = [
            {"id": r["id"], "cell": r["cell"], "species": r["species"], "frac": r["frac"]}
            for r in read_mp_records(
                folder, max_structures=n_mp, seed=params.seed, exclude_formulas=formulas, errors=errors
            )
        ]
        chunks += [("records", records[k : k + _RECORD_CHUNK]) for k in range(0, len(records), _RECORD_CHUNK)]
        info |= {"n_mp": len(records), "mp_read_errors": errors[:20]}
    return chunks, info


def fit(params: Params, chunks: list[tuple[str, list[Any]]], info: dict[str, Any]) -> dict[str, Any]:
    """Describe the chunks (``generate.workers`` processes) and fit the statistics."""
    lab, g = params.labels, params.generate
    tasks = [(k, kind, items, lab.symprec, lab.angle_tolerance) for k, (kind, items) in enumerate(chunks)]
    results: dict[int, Any] = {}
    outcomes = run_tasks(
        describe_task,
        tasks,
        scheduler=g.scheduler,
        workers=g.workers,
        key=lambda t: f"xrdvision-describe-{t[0]}-{_digest(t[2])[:16]}",
    )
    for _, result, error in outcomes:
        if error is not None:
            raise XrdVisionError(f"generate: describing training structures failed: {error}")
        results[result[0]] = result[1:]
    descs = [d for k in sorted(results) for d in results[k][0]]
    failed = [f for k in sorted(results) for f in results[k][1]]
    sources = {
        "cod": sum(d["source"] == "cif" for d in descs),
        "mp": sum(d["source"] == "records" for d in descs),
    }
    try:
        stats = fit_statistics(descs, g.min_structures, sources)
    except ValueError as exc:
        raise XrdVisionError(f"generate: {exc} (COD training split and generate.mp_structures)") from None
    stats["selection"] = {**info, "n_not_described": len(failed), "not_described": failed[:20]}
    stats["real"] = real_quantities(descs)
    return stats


def real_quantities(descs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per training structure: volume per atom (A^3), b/a and c/a of the conventional cell (the
    realism check's reference, kept in the statistics file)."""
    lat = np.array([d["lattice"] for d in descs], dtype=np.float64).reshape(-1, 6)
    n = np.array([d["n_atoms"] for d in descs], dtype=np.float64)
    vol = np.array([d["volume"] for d in descs], dtype=np.float64)
    return {
        "volume_per_atom": np.round(vol / n, 4).tolist(),
        "b_over_a": np.round(lat[:, 1] / lat[:, 0], 4).tolist(),
        "c_over_a": np.round(lat[:, 2] / lat[:, 0], 4).tolist(),
        "space_group": [int(d["space_group"]) for d in descs],
    }
