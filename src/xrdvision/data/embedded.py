"""How the embedded default sample (``data/embedded/``) was chosen from ``../shared/cod``, and rebuilt.

The pipeline's default runs on 105 real COD CIFs shipped in the repository, so that ``make repro`` needs
neither the network nor ``../shared``. :func:`select_sample` is the reproducible rule that picks them and
:func:`build_embedded_sample` applies it, checks that every pick loads (:func:`check_cif_loads`, killed
after a timeout) and re-selects until all pass. Not part of any DVC stage: ``ingest`` only copies the
folder this wrote. ``python -m xrdvision.data.embedded [../shared/cod]`` rebuilds ``data/embedded``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import random
import shutil
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from xrdvision.crystal.bragg import CU_KA1
from xrdvision.crystal.systems import CRYSTAL_SYSTEMS
from xrdvision.data.cif_files import sanitise_stem
from xrdvision.formats.atomic import atomic_path
from xrdvision.formats.tables import read_table, write_table

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("cod_id", "formula", "space_group_number", "crystal_system", "n_atoms_in_cell")

# What ``build_embedded_sample`` dropped when it made data/embedded (xrayutilities cannot read them);
# ``select_sample(INDEX, SOURCES, 15, 42, 200, exclude=EMBEDDED_EXCLUDED)`` gives the sample again.
EMBEDDED_EXCLUDED = ("1100117", "1100975", "1100976", "1100977", "1100978", "1100979", "9007550")


def _seeded_key(seed: int, kind: str, name: str) -> float:
    """A random number fixed by ``seed`` and ``name`` alone (not by what else is being shuffled)."""
    return random.Random(f"{seed}:{kind}:{name}").random()


def select_sample(
    index_csv: str | Path,
    sources_csv: str | Path,
    per_system: int = 15,
    seed: int = 42,
    max_atoms: int = 200,
    *,
    exclude: Iterable[str] = (),
    max_bytes: int | None = 100_000,
) -> list[str]:
    """Choose ``per_system`` COD ids per crystal system from ``../shared/cod``'s INDEX/SOURCES tables.

    The rule, so that the default pipeline is fast and its grouped split meaningful:

    - drop cod-tools test variants (altered files), cells with more than ``max_atoms`` sites, files
      larger than ``max_bytes`` (those carry structure factors the pipeline never reads) and ``exclude``;
    - keep one entry per compound (reduced formula + space group): duplicates would all land in one
      split group anyway and only shrink the effective sample;
    - within a system, go round-robin over its space groups in a seeded random order, so the sample
      spreads over space groups instead of piling into the commonest one; ordered structures (no partial
      occupancy) come first within a space group because their simulated patterns are the cleanest.

    Returns the chosen ids sorted by crystal system (in ``CRYSTAL_SYSTEMS`` order) then id. A system with
    fewer candidates than ``per_system`` contributes all it has.
    """
    if per_system < 1:
        raise ValueError("per_system must be >= 1")
    index_csv, sources_csv = Path(index_csv), Path(sources_csv)
    index = read_table(index_csv, SAMPLE_COLUMNS, "COD index")
    sources = {
        r["cod_id"]: r
        for r in read_table(
            sources_csv, ("cod_id", "cod_tools_test_variant", "pymatgen_ordered"), "COD sources table"
        )
    }
    excluded = {str(e) for e in exclude}
    cif_dir = index_csv.parent

    candidates = []
    for row in sorted(index, key=lambda r: r["cod_id"]):  # the CSV's order must not matter
        cod_id = row["cod_id"]
        src = sources.get(cod_id, {})
        if cod_id in excluded or src.get("cod_tools_test_variant", "0") == "1":
            continue
        if int(row["n_atoms_in_cell"]) > max_atoms:
            continue
        if max_bytes is not None:
            path = cif_dir / f"{cod_id}.cif"
            if not path.is_file() or path.stat().st_size > max_bytes:
                continue
        candidates.append(row)

    # Ordered structures first, then a seeded random order. Each id (and below each space group) gets
    # its own random key, so excluding one file changes only that pick instead of reshuffling them all.
    candidates.sort(
        key=lambda r: (
            sources.get(r["cod_id"], {}).get("pymatgen_ordered", "1") != "1",
            _seeded_key(seed, "id", r["cod_id"]),
        )
    )

    seen_compounds: set[tuple[str, str]] = set()
    by_system: dict[str, dict[str, list[str]]] = {s: {} for s in CRYSTAL_SYSTEMS}
    for row in candidates:
        compound = (row["formula"], row["space_group_number"])
        if compound in seen_compounds or row["crystal_system"] not in by_system:
            continue
        seen_compounds.add(compound)
        by_system[row["crystal_system"]].setdefault(row["space_group_number"], []).append(row["cod_id"])

    chosen: list[str] = []
    for system in CRYSTAL_SYSTEMS:
        groups = sorted(by_system[system], key=lambda sg: _seeded_key(seed, "sg", sg))
        buckets = [by_system[system][sg] for sg in groups]
        picked: list[str] = []
        while len(picked) < per_system and any(buckets):
            for bucket in buckets:
                if bucket and len(picked) < per_system:
                    picked.append(bucket.pop(0))
        chosen.extend(sorted(picked))
    return chosen


def _silenced(fn: Any, *args: Any) -> Any:
    """Run ``fn`` with stdout swallowed (xrayutilities prints a line per ion it neutralises)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def check_cif_loads(path: str | Path, wavelength: float = CU_KA1, two_theta_max: float = 90.0) -> str:
    """Load ``path`` with pymatgen and with xrayutilities (peak list), or return why not ("" if fine).

    Mirrors what ``simulate`` needs: pymatgen for the labels, xrayutilities' ``fromCIF`` with the crystal
    renamed to ``cod_<id>`` (a bare number is not a valid name, FINDINGS.md) for the peak list.
    """
    from pymatgen.io.cif import CifParser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            structures = CifParser(path).parse_structures(primitive=False)
        except Exception as exc:
            return f"pymatgen: {type(exc).__name__}: {exc}"
        if not structures or len(structures[0]) == 0:
            return "pymatgen: no atoms in structure"
        try:
            import xrayutilities as xu

            crystal = _silenced(xu.materials.Crystal.fromCIF, str(path))
            crystal.name = f"cod_{sanitise_stem(Path(path).stem)}"
            powder = _silenced(
                lambda: xu.simpack.PowderDiffraction(
                    crystal, wl=wavelength, tt_cutoff=two_theta_max, enable_simulation=False
                )
            )
            if len(powder.data) == 0:
                return "xrayutilities: no peaks"
        except Exception as exc:
            return f"xrayutilities: {type(exc).__name__}: {exc}"
    return ""


def _warm_up() -> None:
    """Import the readers once so the first file's time is not the import time."""
    import pymatgen.io.cif  # noqa: F401
    import xrayutilities  # noqa: F401


def _timed_check(path: str) -> tuple[str, float]:
    start = time.perf_counter()
    problem = check_cif_loads(path)
    return problem, time.perf_counter() - start


@dataclass
class _Checker:
    """Runs :func:`check_cif_loads` in one worker process so a hanging file can be killed."""

    timeout_s: float
    _pool: Any = None

    def __call__(self, path: Path) -> tuple[str, float]:
        if self._pool is None:
            self._pool = multiprocessing.get_context("fork").Pool(1)
            self._pool.apply(_warm_up)
        try:
            return self._pool.apply_async(_timed_check, (str(path),)).get(timeout=self.timeout_s)
        except multiprocessing.TimeoutError:
            self.close()
            return f"timeout after {self.timeout_s:g} s", self.timeout_s

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def build_embedded_sample(
    cod_dir: str | Path,
    out_dir: str | Path,
    per_system: int = 15,
    seed: int = 42,
    max_atoms: int = 200,
    max_seconds: float = 1.0,
) -> dict[str, str]:
    """Select with :func:`select_sample`, drop picks that fail to load or load slowly, re-select, write.

    A pick that pymatgen or xrayutilities rejects, or that takes more than ``max_seconds`` to load and
    give a peak list, is excluded and the selection re-run (seeded, so the same files come out again),
    until every pick passes. Writes the CIFs, ``SAMPLE.csv`` into ``out_dir`` (replacing its ``*.cif``).
    Returns the excluded ids with their reasons (the README records them).
    """
    cod_dir, out_dir = Path(cod_dir), Path(out_dir)
    index_csv = cod_dir / "INDEX.csv"
    index = {r["cod_id"]: r for r in read_table(index_csv, SAMPLE_COLUMNS, "COD index")}
    excluded: dict[str, str] = {}
    passed: set[str] = set()
    checker = _Checker(timeout_s=max(30.0, 10 * max_seconds))
    try:
        while True:
            ids = select_sample(
                index_csv, cod_dir / "SOURCES.csv", per_system, seed, max_atoms, exclude=excluded
            )
            todo = [i for i in ids if i not in passed]
            if not todo:
                break
            for cod_id in tqdm(todo, desc="check sample", unit="cif", leave=False):
                problem, seconds = checker(cod_dir / f"{cod_id}.cif")
                if not problem and seconds > max_seconds:
                    problem = f"slow: {seconds:.2f} s to load and list peaks (> {max_seconds:g} s)"
                if problem:
                    log.debug("excluded %s: %s", cod_id, problem)
                    excluded[cod_id] = problem
                else:
                    passed.add(cod_id)
    finally:
        checker.close()

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.cif"):
        if old.stem not in ids:
            old.unlink()
    for cod_id in ids:
        with atomic_path(out_dir / f"{cod_id}.cif") as tmp:
            shutil.copyfile(cod_dir / f"{cod_id}.cif", tmp)
    write_table(out_dir / "SAMPLE.csv", SAMPLE_COLUMNS, (index[cod_id] for cod_id in ids))
    return excluded


if __name__ == "__main__":  # pragma: no cover - how data/embedded was made (see its README)
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(__file__).resolve().parents[3]
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else root.parent / "shared" / "cod"
    dropped = build_embedded_sample(source, root / "data" / "embedded")
    for cod_id, why in sorted(dropped.items()):
        log.info("%s\t%s", cod_id, why)
