"""Prediction throughput on the CPU: files per second for CIFs, measured patterns and images, and where
the time goes (simulate / read + background / render / image load / model).

    .venv/bin/python benchmarks/bench_predict.py [--n-cifs 20] [--n-patterns 40] [--n-images 20]
                                                 [--model URI_OR_PATH] [--batch-size 16]

Inputs are real: a seeded sample of COD CIFs from ../shared/cod (cells up to 300 atoms, as in
bench_render), a seeded sample of the measured patterns in ../shared/experimental (all three sources),
and PNGs rendered from the CIFs (untimed). The model is ``--model`` if given, else a VGG16 classifier
built with the ImageNet weights and an untrained head: the forward pass costs the same either way.

Two views: the stages timed one by one (each over all inputs of its kind), and ``predict_files``
end to end per kind (what a user waits for). Results go to ``benchmarks/results/bench_predict.json``.

``--gap`` instead measures, without any model, how close measured patterns get to simulated ones under
each preprocessing/simulation choice: 11 RockJock standards whose mineral is in ../shared/cod (same
reduced formula and space group), cosine similarity of measured vs simulated pattern on 6-64 degrees
after a Gaussian blur (0.05 and 0.2 degree) -> ``benchmarks/results/bench_predict_gap.json``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

from xrdvision.config import Params  # noqa: E402
from xrdvision.formats.atomic import write_json  # noqa: E402

SHARED = ROOT.parent / "shared"


def sample_cifs(n: int, seed: int) -> list[Path]:
    with open(SHARED / "cod" / "INDEX.csv", newline="", encoding="utf-8") as fh:
        ids = sorted(r["cod_id"] for r in csv.DictReader(fh) if int(r["n_atoms_in_cell"]) <= 300)
    return [SHARED / "cod" / f"{i}.cif" for i in random.Random(seed).sample(ids, n)]


def sample_patterns(n: int, seed: int) -> list[Path]:
    """Proportional to the sources (300 RRUFF, 142 RockJock, 2 raw), at least one of each."""
    with open(SHARED / "experimental" / "INDEX.csv", newline="", encoding="utf-8") as fh:
        files = sorted(r["file"] for r in csv.DictReader(fh))
    rng = random.Random(seed)
    other = [f for f in files if f.startswith("other/")]
    rest = rng.sample([f for f in files if not f.startswith("other/")], n - 1)
    return [SHARED / "experimental" / f for f in [*rest, other[0]]]


def default_model(params: Params):
    """An ImageNet VGG16 with an untrained 7-class head, as a LoadedModel."""
    from xrdvision.crystal.labels import class_names
    from xrdvision.models.vgg16 import build_model
    from xrdvision.serve.loading import LoadedModel

    classes = class_names("crystal_system")
    net = build_model(len(classes), params.model, seed=params.seed)
    return LoadedModel(net.full, classes, "untrained VGG16 (benchmark)", "crystal_system", "benchmark")


def timed(fn, items) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = [fn(x) for x in items]
    return time.perf_counter() - t0, out


# RockJock standard -> COD id of the same mineral (reduced formula and space group agree)
GAP_PAIRS = {
    "corundum": "1000017",
    "quartz": "5000035",
    "siderite": "9000098",
    "halite": "1000041",
    "barite": "1000037",
    "brucite": "1000054",
    "spinel": "9002044",
    "graphite": "9011577",
    "iron": "1100108",
    "sulfur": "9008577",
    "silver": "9008459",
}


def gap_study() -> dict:
    """Measured vs simulated similarity for background on/off, K-alpha2 on/off and peak width."""
    from scipy.ndimage import gaussian_filter1d

    from xrdvision.config import LabelsParams, SimulateParams
    from xrdvision.crystal.profile import grid
    from xrdvision.data.simulate import simulate_file
    from xrdvision.formats.scans import read_pattern
    from xrdvision.serve.preprocess import to_training_grid

    g = grid(5.0, 90.0, 0.02)
    window = (g >= 6) & (g <= 64)  # RockJock stops at 65 degrees

    def cosine(a: np.ndarray, b: np.ndarray, blur_deg: float) -> float:
        a = gaussian_filter1d(a[window].astype(float), blur_deg / 0.02)
        b = gaussian_filter1d(b[window].astype(float), blur_deg / 0.02)
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    settings = {
        "raw, K-alpha1 sim, fwhm 0.1": (SimulateParams(), False),
        "background removed, K-alpha1 sim, fwhm 0.1": (SimulateParams(), True),
        "background removed, K-alpha1+2 sim, fwhm 0.1": (SimulateParams(kalpha2=True), True),
        "background removed, K-alpha1+2 sim, fwhm 0.2": (SimulateParams(kalpha2=True, fwhm=0.2), True),
    }
    per_pair: dict[str, dict[str, list[float]]] = {}
    for name, cod_id in GAP_PAIRS.items():
        measured = read_pattern(SHARED / "experimental" / "rockjock" / f"rockjock_{name}.xy")
        per_pair[name] = {}
        for label, (sim, background) in settings.items():
            simulated = simulate_file(SHARED / "cod" / f"{cod_id}.cif", sim, LabelsParams()).pattern
            y = to_training_grid(measured, sim, background=background)
            per_pair[name][label] = [round(cosine(y, simulated, b), 4) for b in (0.05, 0.2)]
    mean = {
        label: [round(float(np.mean([per_pair[n][label][i] for n in per_pair])), 4) for i in (0, 1)]
        for label in settings
    }
    return {"blur_deg": [0.05, 0.2], "mean_cosine": mean, "per_pair": per_pair, "pairs": GAP_PAIRS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-cifs", type=int, default=20)
    ap.add_argument("--n-patterns", type=int, default=40)
    ap.add_argument("--n-images", type=int, default=20)
    ap.add_argument("--model", default="", help="model URI or path (default: untrained VGG16)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gap", action="store_true", help="measured-vs-simulated similarity study instead")
    args = ap.parse_args()
    if args.gap:
        result = gap_study()
        out = ROOT / "benchmarks" / "results" / "bench_predict_gap.json"
        write_json(out, result)
        for label, (fine, coarse) in result["mean_cosine"].items():
            print(f"{label:48s} mean cosine {fine:.3f} (0.05 deg blur)  {coarse:.3f} (0.2 deg blur)")
        print(f"saved {out.relative_to(ROOT)}")
        return

    import tensorflow as tf

    from xrdvision.crystal.profile import grid
    from xrdvision.data.simulate import simulate_file
    from xrdvision.formats.scans import read_pattern
    from xrdvision.models.features import load_image
    from xrdvision.serve.inputs import Preparer
    from xrdvision.serve.loading import load_model
    from xrdvision.serve.predict import predict_files
    from xrdvision.serve.preprocess import to_training_grid

    params = Params()
    sim = params.simulate
    t0 = time.perf_counter()
    lm = load_model(params, args.model) if args.model else default_model(params)
    load_s = time.perf_counter() - t0
    prep = Preparer(params, lm.image_size)
    g = grid(sim.two_theta_min, sim.two_theta_max, sim.step)
    cifs = sample_cifs(args.n_cifs, args.seed)
    patterns = sample_patterns(args.n_patterns, args.seed)
    print(f"model ready in {load_s:.1f} s ({lm.uri}); {len(cifs)} CIFs, {len(patterns)} patterns")

    # warm-up: the first call of each piece pays one-off costs (imports, graph tracing, caches)
    warm = prep(cifs[0]).image
    lm.predict(np.stack([warm] * 2), batch_size=2)
    read_pattern(patterns[0])

    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp_name:
        tmp = Path(tmp_name)
        # --- stages one by one ---------------------------------------------------------------------
        sim_s, records = timed(lambda p: simulate_file(p, sim, params.labels), cifs)
        render_cif_s, cif_images = timed(lambda r: prep.renderer.render(g, r.pattern), records)
        read_s, pats = timed(read_pattern, patterns)
        grid_s, ys = timed(lambda p: to_training_grid(p, sim, default_wavelength=1.5418), pats)
        render_pat_s, _ = timed(lambda y: prep.renderer.render(g, y), ys)
        pngs = []
        for i, r in enumerate(records[: args.n_images]):
            path = tmp / f"{i}.png"
            prep.renderer.save(g, r.pattern, path)
            pngs.append(path)
        load_img_s, imgs = timed(load_image, pngs)
        batch = np.stack(cif_images[: args.batch_size]).astype(np.float32)
        model_s = {}
        for bs in (1, args.batch_size):
            t0 = time.perf_counter()
            lm.predict(batch, batch_size=bs)
            model_s[bs] = (time.perf_counter() - t0) / len(batch)
        lm.model.predict(batch[:2], batch_size=2, verbose=0)  # trace once, as the eager path was warmed
        t0 = time.perf_counter()
        lm.model.predict(batch, batch_size=args.batch_size, verbose=0)
        keras_predict_s = (time.perf_counter() - t0) / len(batch)

        # --- end to end ----------------------------------------------------------------------------
        e2e = {}
        for kind, files in (("cif", cifs), ("pattern", patterns), ("image", pngs)):
            t0 = time.perf_counter()
            preds = predict_files(files, params, model=lm, batch_size=args.batch_size, progress=False)
            seconds = time.perf_counter() - t0
            assert all(p.ok for p in preds), [p.error for p in preds if not p.ok]
            e2e[kind] = {
                "n": len(files),
                "seconds": round(seconds, 2),
                "files_per_s": round(len(files) / seconds, 2),
            }

    per_model = model_s[args.batch_size]
    result = {
        "model": lm.uri,
        "model_load_s": round(load_s, 2),
        "batch_size": args.batch_size,
        "per_file_ms": {
            "simulate_cif": round(1000 * sim_s / len(cifs), 1),
            "simulate_cif_max": round(1000 * max(r.seconds for r in records), 1),
            "render": round(1000 * (render_cif_s + render_pat_s) / (len(cifs) + len(patterns)), 2),
            "read_pattern": round(1000 * read_s / len(patterns), 2),
            "background_convert_resample": round(1000 * grid_s / len(patterns), 2),
            "load_png": round(1000 * load_img_s / max(len(imgs), 1), 2),
            "model_batch_1": round(1000 * model_s[1], 1),
            f"model_batch_{args.batch_size}": round(1000 * per_model, 1),
            f"keras_predict_batch_{args.batch_size}": round(1000 * keras_predict_s, 1),
        },
        "end_to_end": e2e,
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
    }
    ms = result["per_file_ms"]
    for kind, prep_ms in (
        ("cif", ms["simulate_cif"] + ms["render"]),
        ("pattern", ms["read_pattern"] + ms["background_convert_resample"] + ms["render"]),
        ("image", ms["load_png"]),
    ):
        total = prep_ms + 1000 * per_model
        result["end_to_end"][kind]["model_share"] = round(1000 * per_model / total, 3)
    out = ROOT / "benchmarks" / "results" / "bench_predict.json"
    write_json(out, result)
    print("per file (ms):", ", ".join(f"{k} {v}" for k, v in ms.items()))
    for kind, d in e2e.items():
        print(
            f"predict_files {kind:8s}: {d['n']:3d} files in {d['seconds']:6.2f} s = "
            f"{d['files_per_s']:5.2f} files/s (model {d['model_share']:.0%} of the time)"
        )
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
