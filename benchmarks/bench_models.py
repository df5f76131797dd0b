"""Speed of the two model kinds on this CPU, in one run: the 1-D model (``cnn1d``) against VGG16.

    .venv/bin/python benchmarks/bench_models.py [--n 512] [--n-vgg 48] [--batch 64]

Measured, each after a warm-up batch:

- inference, patterns per second: the calibrated ``cnn1d`` of params.yaml (``cnn1d.*``, grid of
  ``pattern.*``) on scaled 1-D patterns, and the VGG16 classifier the default recipe trains (ImageNet
  weights, frozen convolutions, the ``model.dense`` head) on 224 x 224 RGB images — the model's forward
  pass only for both (how an input is made is bench_predict's subject); the ratio is the goal of issue 16
  (cnn1d >= 100 x VGG16 per pattern);
- ``cnn1d`` training samples per second: patterns drawn on the fly from real peak lists (COD structures
  batch-simulated once, untimed) under fresh conditions, through ``keras.Model.fit`` with the
  ``PyDataset`` that training uses (data made in worker threads while the network trains);
- peak resident memory of the process (``ru_maxrss``) and the rendering rate alone (patterns/s).

Writes ``benchmarks/results/bench_models.json`` (keys ``cnn1d_patterns_per_s``, ``vgg16_patterns_per_s``,
``cnn1d_train_samples_per_s``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]
SHARED = ROOT.parent / "shared"
OUT = ROOT / "benchmarks" / "results" / "bench_models.json"


def cod_peaks(n: int, params):  # real peak lists: COD CIFs through the batch simulator (untimed)
    from xrdvision.data.cod_set import build_cod_set
    from xrdvision.data.peak_table import from_cod_set, powder_settings

    folder = SHARED / "cod"
    if not folder.is_dir():
        raise SystemExit(f"{folder}: the COD CIFs are needed for real peak lists")
    paths = sorted(folder.glob("*.cif"))[:n]
    cod = build_cod_set(
        paths, params.labels.symprec, params.labels.angle_tolerance, settings=powder_settings(params)
    )
    return from_cod_set(cod, params.simulate.wavelength)


def rate(fn, n_items: int, repeats: int) -> float:
    fn()  # warm-up (graph tracing, allocation)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return n_items * repeats / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512, help="patterns per cnn1d timing")
    ap.add_argument("--n-vgg", type=int, default=48, help="images per VGG16 timing")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--structures", type=int, default=200, help="COD structures whose peak lists are drawn")
    args = ap.parse_args()

    import keras

    from xrdvision.config import load_params
    from xrdvision.crystal.labels import class_names
    from xrdvision.data import measurement
    from xrdvision.formats.atomic import write_json
    from xrdvision.models import cnn1d
    from xrdvision.models.train_cnn1d import measured_batch, pattern_batches
    from xrdvision.models.vgg16 import build_model, resolve_weights

    load_before = os.getloadavg()[0]
    params = load_params(ROOT / "params.yaml")
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, batch_size=args.batch))
    classes = class_names("crystal_system")
    x = measurement.grid(params.pattern)
    table = cod_peaks(args.structures, params)
    rng = np.random.default_rng(0)
    xb = measured_batch(table, rng.integers(0, len(table), args.n), params, x, rng)

    render_rate = rate(
        lambda: measured_batch(table, rng.integers(0, len(table), args.batch), params, x, rng), args.batch, 5
    )
    logits = cnn1d.build_logits_model(len(classes), x.size, params.cnn1d, params.seed)
    full = cnn1d.with_temperature(logits, 1.3)
    cnn_rate = rate(lambda: full.predict(xb, batch_size=args.batch, verbose=0), args.n, 3)

    weights = resolve_weights(params.model.weights, allow_download=False)
    vgg = build_model(len(classes), params.model, weights=weights, seed=params.seed).full
    images = rng.uniform(0, 255, (args.n_vgg, 224, 224, 3)).astype(np.float32)
    vgg_rate = rate(lambda: vgg.predict(images, batch_size=16, verbose=0), args.n_vgg, 1)

    cnn1d.compile_logits(logits, params.train.learning_rate, 3)
    y = rng.integers(0, len(classes), len(table))
    steps = 8
    data = pattern_batches(table, y, params, x, steps)
    logits.fit(data, epochs=1, verbose=0)  # warm-up epoch
    t0 = time.perf_counter()
    logits.fit(data, epochs=2, verbose=0)
    train_rate = 2 * steps * args.batch / (time.perf_counter() - t0)

    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "keras": keras.__version__,
        "grid_points": int(x.size),
        "cnn1d": dataclasses.asdict(params.cnn1d),
        "cnn1d_parameters": int(logits.count_params()),
        "vgg16_parameters": int(vgg.count_params()),
        "cnn1d_patterns_per_s": round(cnn_rate, 1),
        "vgg16_patterns_per_s": round(vgg_rate, 2),
        "cnn1d_over_vgg16_inference": round(cnn_rate / vgg_rate, 1),
        "cnn1d_train_samples_per_s": round(train_rate, 1),
        "render_patterns_per_s": round(render_rate, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "batch": args.batch,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
        "note": "forward passes only for inference; training includes drawing the patterns on the fly",
    }
    write_json(OUT, out)
    print(
        f"cnn1d {cnn_rate:.0f} patterns/s vs VGG16 {vgg_rate:.1f}/s ({cnn_rate / vgg_rate:.0f}x); "
        f"cnn1d training {train_rate:.0f} samples/s; rendering {render_rate:.0f} patterns/s -> {OUT}"
    )


if __name__ == "__main__":
    main()
