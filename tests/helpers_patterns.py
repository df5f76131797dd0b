"""Test data: a real ``patterns.npz`` + ``manifest.csv`` (docs/dataflow.md format) from real COD CIFs.

Built with pymatgen's ``XRDCalculator`` (real kinematic diffraction, K-alpha1 peak list) and
``SpacegroupAnalyzer`` labels, independently of ``xrdvision.data.simulate``, so the render and split tests
do not depend on that stage's code, only on the file contract between the stages.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
from pymatgen.analysis.diffraction.xrd import XRDCalculator
from pymatgen.io.cif import CifParser
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from xrdvision.config import SimulateParams
from xrdvision.crystal.profile import grid, profile_pattern
from xrdvision.formats.patterns import MANIFEST_COLUMNS  # the file contract; the physics is pymatgen's

# Small cells (fast to simulate) from ../shared/cod/INDEX.csv; 1000017 and 1000032 are both corundum
# (Al2O3, R-3c): one compound group, which the split must keep together.
SMALL_CIFS = {
    "1000017": "trigonal",
    "1000032": "trigonal",
    "1000026": "hexagonal",  # MgB2
    "1000037": "orthorhombic",  # BaSO4
    "1000125": "tetragonal",  # KAlF4
    "2101499": "cubic",  # C, Pm-3m
}


def peak_list(structure, wavelength: float, two_theta_range: tuple[float, float]):
    """K-alpha1 peaks ``(two_theta, intensity max 1, d)`` from pymatgen's XRDCalculator."""
    pattern = XRDCalculator(wavelength=wavelength).get_pattern(structure, two_theta_range=two_theta_range)
    tt = np.asarray(pattern.x, dtype=np.float64)
    amp = np.asarray(pattern.y, dtype=np.float64)
    d = np.asarray(pattern.d_hkls, dtype=np.float64)
    if amp.size and amp.max() > 0:
        amp = amp / amp.max()
    return tt, amp, d


def _analyzer(structure) -> SpacegroupAnalyzer:
    """spglib at symprec 0.01, else 0.001: how ../shared/cod/INDEX.csv was labelled (7 files need it)."""
    try:
        return SpacegroupAnalyzer(structure, symprec=0.01)
    except Exception:
        return SpacegroupAnalyzer(structure, symprec=0.001)


def build_patterns(
    cif_paths: list[Path], out_dir: Path, sim: SimulateParams | None = None
) -> tuple[Path, Path]:
    """Write ``out_dir/patterns.npz`` and ``out_dir/manifest.csv`` for ``cif_paths``.

    A CIF that pymatgen cannot read becomes a ``failed`` manifest row with a one-line reason and is
    left out of the npz, as the simulate stage does.
    """
    sim = sim or SimulateParams()
    out_dir.mkdir(parents=True, exist_ok=True)
    g = grid(sim.two_theta_min, sim.two_theta_max, sim.step)
    ids, offsets, tts, amps, ds, profiles, rows = [], [0], [], [], [], [], []
    for path in cif_paths:
        row = dict.fromkeys(MANIFEST_COLUMNS, "")
        row.update(cod_id=path.stem, file=path.name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = CifParser(path).parse_structures(primitive=False)[0]
            sga = _analyzer(structure)
            tt, amp, d = peak_list(structure, sim.wavelength, (sim.two_theta_min, sim.two_theta_max))
        except Exception as exc:  # any pymatgen failure is a failed row, as in the real stage
            row.update(status="failed", reason=" ".join(f"pymatgen: {exc}".split()))
            rows.append(row)
            continue
        y = profile_pattern(tt, amp, g, sim.fwhm, sim.eta, kalpha2=sim.kalpha2, wavelength=sim.wavelength)
        ids.append(path.stem)
        tts.append(tt)
        amps.append(amp)
        ds.append(d)
        offsets.append(offsets[-1] + tt.size)
        profiles.append(y)
        sg = sga.get_space_group_number()
        row.update(
            formula=structure.composition.formula.replace(" ", ""),
            reduced_formula=structure.composition.reduced_formula,
            crystal_system=sga.get_crystal_system(),
            space_group=sg,
            space_group_symbol=sga.get_space_group_symbol(),
            declared_space_group=sg,
            symmetry_mismatch=False,
            n_atoms=len(structure),
            n_peaks=tt.size,
            status="ok",
        )
        rows.append(row)
    npz = out_dir / "patterns.npz"
    np.savez(
        npz,
        ids=np.array(ids, dtype=str),
        peak_offsets=np.array(offsets, dtype=np.int64),
        peak_two_theta=np.concatenate(tts or [np.zeros(0)]).astype(np.float32),
        peak_intensity=np.concatenate(amps or [np.zeros(0)]).astype(np.float32),
        peak_d=np.concatenate(ds or [np.zeros(0)]).astype(np.float32),
        two_theta=g,
        intensity=np.array(profiles, dtype=np.float32).reshape(len(ids), g.size),
        wavelength=np.float64(sim.wavelength),
    )
    manifest = out_dir / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return npz, manifest


def index_rows(cod_dir: Path) -> list[dict[str, str]]:
    """``../shared/cod/INDEX.csv`` as manifest-like rows (all ``ok``): the real labels of all 852 CIFs."""
    with open(cod_dir / "INDEX.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [
        {
            "cod_id": r["cod_id"],
            "file": f"{r['cod_id']}.cif",
            "formula": r["formula"],
            "reduced_formula": r["formula"],  # INDEX.csv's formula is pymatgen's reduced formula
            "crystal_system": r["crystal_system"],
            "space_group": r["space_group_number"],
            "space_group_symbol": r["space_group_symbol"],
            "status": "ok",
        }
        for r in rows
    ]
