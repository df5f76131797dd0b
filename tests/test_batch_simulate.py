"""The batch simulator (crystal/powder.py) on real structures: line for line against xrayutilities and the
per-CIF simulator, invariance under the choice of cell, and bad records reported one line each."""

from __future__ import annotations

import contextlib
import io
import json
import lzma
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xrayutilities as xu

from xrdvision.crystal import bragg
from xrdvision.crystal.form_factors import form_factor_table
from xrdvision.crystal.labels import read_structure
from xrdvision.crystal.powder import (
    MERGE_TOL_DEG,
    PowderSettings,
    merge_sorted,
    powder_peaks,
    simulate_batch,
)
from xrdvision.crystal.powder_input import metric, reduce_cell
from xrdvision.errors import InputError

# NaCl (ions), corundum, KYb2F7 (P2: no inversion centre, Yb's f'' breaks Friedel's law), a triclinic
# lead fluoride, a pyroxene with several species sharing sites, a Dy-Mn-Cr germanide with a mixed site.
# All in the embedded COD sample, so they run in a clone without ../shared too.
COD_IDS = ["1000041", "1000017", "1008916", "2103956", "1000035", "1006145"]
# Line numbers in structures-00: Pd (fcc, 60-degree cell), P (monoclinic), Rb (triclinic setting),
# K2CuF4 (tetragonal stored with 155-degree angles), In2Si2O7, SrSnO3 (4 species incl. O).
MP_LINES = {1: "mp-2", 42: "mp-53", 54: "mp-70", 2147: "mp-2865", 2151: "mp-2874", 2154: "mp-2879"}


@pytest.fixture(scope="module")
def mp_records(mp_dir: Path) -> list[dict[str, Any]]:
    out = []
    with lzma.open(mp_dir / "structures-00.jsonl.xz", "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i in MP_LINES:
                out.append(json.loads(line))
            if i >= max(MP_LINES):
                break
    assert [r["id"] for r in out] == list(MP_LINES.values())
    return out


@pytest.fixture(scope="module")
def cod_structures(cod_dir: Path) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {cid: read_structure(cod_dir / f"{cid}.cif") for cid in COD_IDS}


def as_record(name: str, structure: Any) -> dict[str, Any]:
    """A pymatgen structure as arrays: one entry per species on a site, occupancies kept."""
    species, frac, occ = [], [], []
    for site in structure:
        for sp, o in site.species.items():
            species.append(str(sp))
            frac.append(site.frac_coords)
            occ.append(o)
    return {"id": name, "cell": structure.lattice.matrix, "species": species, "frac": frac, "occupancy": occ}


def xrayutilities_peaks(rec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """xrayutilities' PowderDiffraction on the same atoms in P1 (no Debye-Waller factor), Cu K-alpha1,
    merged at the simulator's 1e-3 degree, 5-90 degrees, scaled to a maximum of 1."""
    table = form_factor_table()
    atoms = [getattr(xu.materials.elements, table.names[table.lookup(s)]) for s in rec["species"]]
    g = metric(rec["cell"])
    lengths = np.sqrt(np.diag(g))
    cosines = np.array([g[1, 2], g[0, 2], g[0, 1]]) / lengths[[1, 0, 0]] / lengths[[2, 2, 1]]
    params = [*lengths, *np.degrees(np.arccos(cosines))]
    occ = [float(o) for o in rec.get("occupancy", [1.0] * len(atoms))]
    with contextlib.redirect_stdout(io.StringIO()):
        lattice = xu.materials.SGLattice(
            1,
            *params,
            atoms=atoms,
            pos=[("1a", tuple(p)) for p in rec["frac"]],
            occ=occ,
            b=[0.0] * len(atoms),
        )
        crystal = xu.materials.Crystal("t_" + rec["id"].replace("-", "_"), lattice)
        powder = xu.simpack.PowderDiffraction(
            crystal, en=xu.utilities.lam2en(bragg.CU_KA1), tt_cutoff=90, enable_simulation=False
        )
    tt, r = np.array([(2 * v["ang"], v["r"]) for v in powder.data.values()]).T
    order = np.argsort(tt)
    tt, r, _ = merge_sorted(tt[order], r[order], None, MERGE_TOL_DEG)
    keep = tt >= 5
    return tt[keep], r[keep] / r[keep].max()


def assert_same_lines(tt: np.ndarray, inten: np.ndarray, ref_tt: np.ndarray, ref_i: np.ndarray) -> None:
    """Every line above 1 % in both lists has its partner (the issue's 0.01 deg / 2 % criterion is far
    looser than what the identical physics gives: 1e-6 deg and 1e-5 are asserted here)."""
    strong = ref_i > 0.01
    near = np.abs(tt[None, :] - ref_tt[strong, None]).argmin(axis=1)
    assert np.abs(tt[near] - ref_tt[strong]).max() < 1e-6
    assert np.abs(inten[near] - ref_i[strong]).max() < 1e-5
    assert int((inten > 0.01).sum()) == int(strong.sum())


@pytest.mark.needs_shared("mp")
def test_mp_structures_match_xrayutilities(mp_records: list[dict[str, Any]]) -> None:
    batch = simulate_batch(mp_records)
    assert batch.errors == {}
    for i, rec in enumerate(mp_records):
        p = batch.peaks(i)
        assert_same_lines(p.two_theta, p.intensity, *xrayutilities_peaks(rec))


def test_cod_structures_match_xrayutilities(cod_structures: dict[str, Any]) -> None:
    records = [as_record(k, v) for k, v in cod_structures.items()]
    batch = simulate_batch(records)
    assert batch.errors == {}
    for i, rec in enumerate(records):
        p = batch.peaks(i)
        assert_same_lines(p.two_theta, p.intensity, *xrayutilities_peaks(rec))


def test_same_peak_list_as_the_per_cif_simulator(cod_structures: dict[str, Any]) -> None:
    """The per-CIF simulator finds multiplicities from spglib's rotations, the batch one by merging the
    P1 reflections: the same lines, count included, and the same hkl up to symmetry (same d)."""
    try:
        from xrdvision.crystal.diffraction import simulate_peaks
    except ImportError:  # before the per-CIF simulator moved out of the data stage
        from xrdvision.data.simulate import simulate_peaks
    settings = PowderSettings(with_hkl=True)
    for cid, structure in cod_structures.items():
        ref = simulate_peaks(structure)
        ours = simulate_batch([as_record(cid, structure)], settings).peaks(0)
        assert len(ours) == len(ref), cid
        assert np.abs(ours.two_theta - ref.two_theta).max() < 1e-6
        assert np.abs(ours.intensity - ref.intensity).max() < 1e-5
        g_star = np.linalg.inv(metric(structure.lattice.matrix))
        d_hkl = 1 / np.sqrt(np.einsum("pi,ij,pj->p", ours.hkl, g_star, ours.hkl))
        assert np.allclose(d_hkl, ours.d, rtol=1e-4), cid  # within the 1e-3 degree merge


@pytest.mark.needs_shared("mp")
def test_choice_of_cell_changes_nothing(mp_records: list[dict[str, Any]]) -> None:
    """K2CuF4 as stored (angles of 155 degrees, reduced inside) and in a further skewed basis, given as
    parameters and as a matrix: the same peaks; hkl stay those of the cell given."""
    rec = next(r for r in mp_records if r["id"] == "mp-2865")
    assert (reduce_cell(metric(rec["cell"])) != np.eye(3)).any()
    g = metric(rec["cell"])
    basis = np.linalg.cholesky(g)  # rows a, b, c with this metric
    m = np.array([[1, 2, 0], [0, 1, -1], [0, 0, 1]])
    skewed = {**rec, "cell": m @ basis, "frac": np.asarray(rec["frac"]) @ np.linalg.inv(m)}
    settings = PowderSettings(with_hkl=True)
    a, b, c = (simulate_batch([r], settings).peaks(0) for r in (rec, {**rec, "cell": basis}, skewed))
    for other in (b, c):
        assert np.allclose(a.two_theta, other.two_theta, atol=1e-8)
        assert np.allclose(a.intensity, other.intensity, atol=1e-6)
    for peaks, cell in ((a, rec["cell"]), (c, skewed["cell"])):
        g_star = np.linalg.inv(metric(cell))
        d_hkl = 1 / np.sqrt(np.einsum("pi,ij,pj->p", peaks.hkl, g_star, peaks.hkl))
        assert np.allclose(d_hkl, peaks.d, rtol=1e-4)


@pytest.mark.needs_shared("mp")
def test_kalpha2_companions(mp_records: list[dict[str, Any]]) -> None:
    rec = mp_records[3]
    one = simulate_batch([rec]).peaks(0)
    two = simulate_batch([rec], PowderSettings(kalpha2=True)).peaks(0)
    assert np.all(np.diff(two.two_theta) >= 0)
    companions = ~np.isin(two.two_theta, one.two_theta)
    expected = bragg.two_theta(one.d, bragg.CU_KA2)
    in_range = expected <= 90
    assert companions.sum() == in_range.sum()
    assert np.allclose(np.sort(two.two_theta[companions]), np.sort(expected[in_range]))
    assert np.allclose(np.sort(two.intensity[companions]), np.sort(one.intensity[in_range] / 2))


def test_species_names() -> None:
    table = form_factor_table()
    assert [table.names[table.lookup(s)] for s in ("Fe3+", "Na+", "O2-", "Fe2.5+", 26, "D", "Ru4+")] == [
        "Fe3p",
        "Na1p",
        "O2m",
        "Fe",
        "Fe",
        "H",
        "Ru",  # xrayutilities lists Ru4+ without its form factor: the neutral atom
    ]


NACL = {"cell": [5.64, 5.64, 5.64, 90, 90, 90], "species": ["Na", "Cl"], "frac": [[0, 0, 0], [0.5, 0.5, 0.5]]}
BAD = {
    "unknown": ({"species": ["Na", "Xx"]}, "unknown element 'Xx' (atom 1)"),
    "flat": ({"cell": [5.64, 5.64, 5.64, 120, 120, 120]}, "zero-volume cell"),
    "flat_matrix": ({"cell": [[1, 0, 0], [0, 1, 0], [1, 1, 0]]}, "zero-volume cell"),
    "overlap": ({"frac": [[0, 0, 0], [0.01, 0, 0.999]]}, "overlapping atoms: Na (atom 0) and Cl (atom 1)"),
    "nan": ({"frac": [[0, 0, 0], [float("nan"), 0.5, 0.5]]}, "non-finite fractional coordinates (atom 1"),
    "nan_cell": ({"cell": [5.64, float("nan"), 5.64, 90, 90, 90]}, "cell has non-finite parameters"),
    "occupancy": ({"occupancy": [1, 1.5]}, "occupancy must be in (0, 1]"),
    "count": ({"species": ["Na"]}, "1 species for 2 coordinates"),
    "no_cell": ({"cell": None}, "missing field(s) cell"),
}


def test_bad_records_get_one_line_each_and_the_batch_goes_on() -> None:
    records: list[Any] = [{"id": "good-0", **NACL}]
    for name, (change, _) in BAD.items():
        rec = {"id": name, **NACL, **change}
        records.append({k: v for k, v in rec.items() if v is not None})
    records += ["not a record", {"id": "good-1", **NACL}]
    batch = simulate_batch(records, source="structures-99.jsonl.xz")
    assert sorted(batch.errors) == list(range(1, len(records) - 1))
    for i, (name, (_, reason)) in enumerate(BAD.items(), start=1):
        line = batch.errors[i]
        assert line.startswith(f"structures-99.jsonl.xz:{name}: ") and reason in line, line
        assert "\n" not in line and len(batch.peaks(i)) == 0
    assert "a record must be a mapping" in batch.errors[len(records) - 2]
    assert len(batch.peaks(0)) == len(batch.peaks(len(records) - 1)) > 0
    overlapping = {"id": "x", **NACL, **BAD["overlap"][0]}
    assert simulate_batch([overlapping], PowderSettings(min_distance=0)).errors == {}  # check off


def test_overlap_distances_use_the_cell_metric() -> None:
    """Hexagonal a = 3 A: (0.1, 0.1, 0) is 0.3 A from the origin, (0.1, -0.1, 0) is 0.52 A."""
    cell = [3.0, 3.0, 5.0, 90, 90, 120]
    assert len(powder_peaks(cell, ["Si", "O"], [[0, 0, 0], [0.1, -0.1, 0]])) > 0
    overlap = r"overlapping atoms: Si \(atom 0\) and O \(atom 1\) are 0\.300 A apart"
    with pytest.raises(InputError, match=overlap):
        powder_peaks(cell, ["Si", "O"], [[0, 0, 0], [0.1, 0.1, 0]])
    with pytest.raises(InputError, match=overlap):  # across the cell boundary too
        powder_peaks(cell, ["Si", "O"], [[0.95, 0.95, 0], [0.05, 0.05, 0]])


def test_a_shared_site_is_not_an_overlap_and_one_structure_raises_input_error() -> None:
    mixed = powder_peaks(
        NACL["cell"], ["Na", "K", "Cl"], [[0, 0, 0], [0, 0, 0], [0.5, 0.5, 0.5]], occupancy=[0.5, 0.5, 1.0]
    )
    assert len(mixed) > 0
    with pytest.raises(InputError, match=r"^my-cif: unknown element 'Qq' \(atom 0\)$"):
        powder_peaks(NACL["cell"], ["Qq", "Cl"], NACL["frac"], name="my-cif")
    with pytest.raises(InputError, match="no reflections in 2-theta range"):
        powder_peaks([1.0, 1.0, 1.0, 90, 90, 90], ["H"], [[0, 0, 0]])


def test_plane_normals_give_the_angles_between_planes_of_a_monoclinic_cell():
    """Each line's normal (for March-Dollase texture) is a unit vector, and the angle between two
    lines' normals is the angle between their planes' reciprocal vectors (h G* h')."""
    from xrdvision.crystal.powder import PowderSettings, powder_peaks

    cell = (4.0, 5.0, 7.0, 90.0, 100.0, 90.0)
    peaks = powder_peaks(
        cell,
        ["Si", "O"],
        [[0, 0, 0], [0.3, 0.2, 0.1]],
        settings=PowderSettings(with_hkl=True, with_normals=True),
    )
    assert peaks.normal is not None and peaks.normal.shape == (len(peaks), 3)
    np.testing.assert_allclose(np.linalg.norm(peaks.normal, axis=1), 1.0, atol=1e-6)
    a, b, c, beta = 4.0, 5.0, 7.0, np.radians(100.0)
    g = np.array([[a * a, 0, a * c * np.cos(beta)], [0, b * b, 0], [a * c * np.cos(beta), 0, c * c]])
    h = peaks.hkl.astype(float)
    m = h @ np.linalg.inv(g) @ h.T
    cos_expected = m / np.sqrt(np.outer(np.diag(m), np.diag(m)))
    np.testing.assert_allclose(np.abs(peaks.normal @ peaks.normal.T), np.abs(cos_expected), atol=1e-5)
