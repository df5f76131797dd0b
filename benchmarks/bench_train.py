"""Time per epoch: training the tail on cached features vs plain end-to-end ``fit`` on the same images.

Peer: the same network (same frozen layers, same trainable tail) trained the plain way, with Keras
``fit`` on the 224x224 images, which runs the frozen VGG16 layers forward every epoch. Both are timed
in this run on the same images; the first epoch of each (graph tracing) is excluded. Also: the
one-off cost of computing the cache, the break-even epoch count, and inference images/s of the full
model. Timing does not depend on image content, so the images are synthetic diffractogram-like
drawings (white peaks on black) from a seeded generator.

    .venv/bin/python benchmarks/bench_train.py [--n 32] [--trainable-conv 3 0] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np


def synthetic_images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    imgs = np.zeros((n, 224, 224, 3), np.float32)
    for i in range(n):
        imgs[i, 214:216, :] = 255
        for x in rng.integers(0, 222, 15):
            imgs[i, rng.integers(20, 210) :, x : x + 2] = 255
    return imgs


def time_epochs(model, x, y, epochs: int, batch_size: int) -> float:
    """Median seconds per epoch after one warm-up epoch."""
    model.fit(x, y, epochs=1, batch_size=batch_size, verbose=0)  # traces the graph
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        model.fit(x, y, epochs=1, batch_size=batch_size, verbose=0)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench(n: int, trainable_conv: int, epochs: int, batch_size: int) -> dict:
    import keras

    from xrdvision.config import ModelParams
    from xrdvision.models.vgg16 import build_model, compile_tail, resolve_weights

    x = synthetic_images(n)
    y = keras.utils.to_categorical(np.arange(n) % 7, 7)
    weights = resolve_weights("")
    net = build_model(7, ModelParams(trainable_conv=trainable_conv), weights=weights, seed=0)

    t = time.perf_counter()
    feats = np.asarray(net.front.predict(x, batch_size=16, verbose=0))
    cache_s = time.perf_counter() - t

    compile_tail(net.tail, 1e-4)
    tail_epoch = time_epochs(net.tail, feats, y, epochs, batch_size)

    # Peer: a fresh, identical network trained end to end on images.
    peer = build_model(7, ModelParams(trainable_conv=trainable_conv), weights=weights, seed=0)
    peer.full.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy")
    full_epoch = time_epochs(peer.full, x, y, epochs, batch_size)

    t = time.perf_counter()
    peer.full.predict(x, batch_size=16, verbose=0)
    infer_s = time.perf_counter() - t
    ratio = full_epoch / tail_epoch
    # epochs after which cache + cached epochs beat plain epochs
    breakeven = cache_s / (full_epoch - tail_epoch) if full_epoch > tail_epoch else float("inf")
    return {
        "trainable_conv": trainable_conv,
        "cut_layer": net.cut_layer,
        "n_images": n,
        "cache_seconds": round(cache_s, 2),
        "cached_epoch_seconds": round(tail_epoch, 3),
        "plain_epoch_seconds": round(full_epoch, 3),
        "speedup_per_epoch": round(ratio, 2),
        "breakeven_epochs": round(breakeven, 2),
        "speedup_over_20_epochs": round(20 * full_epoch / (cache_s + 20 * tail_epoch), 2),
        "inference_images_per_s": round(n / infer_s, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="images (default 32)")
    ap.add_argument("--trainable-conv", type=int, nargs="+", default=[3, 0])
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs after a warm-up (median)")
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()
    import tensorflow as tf

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"GPUs: {len(tf.config.list_physical_devices('GPU'))}",
        "runs": [bench(a.n, k, a.epochs, a.batch_size) for k in a.trainable_conv],
    }
    print(f"bench_train on {results['machine']}, {a.n} images, batch {a.batch_size}")
    print(
        f"{'trainable':>9} {'cut':>12} {'cache s':>8} {'cached/ep':>10} {'plain/ep':>9} {'ratio':>6} "
        f"{'20-ep ratio':>11} {'infer img/s':>11}"
    )
    for r in results["runs"]:
        print(
            f"{r['trainable_conv']:>9} {r['cut_layer']:>12} {r['cache_seconds']:>8.1f} "
            f"{r['cached_epoch_seconds']:>10.2f} {r['plain_epoch_seconds']:>9.2f} "
            f"{r['speedup_per_epoch']:>5.1f}x "
            f"{r['speedup_over_20_epochs']:>10.1f}x {r['inference_images_per_s']:>11.1f}"
        )
    out = Path(__file__).parent / "results" / "bench_train.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
