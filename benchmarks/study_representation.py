"""Accuracy study: how much do the image's axes and the pooling matter to frozen VGG16 features?

The test split holds ~86 structures, so two variants must differ by >10 points before the test can
tell them apart. This study instead scores every structure of a simulate output once, by grouped
5-fold cross-validation (compound groups never straddle folds, two shuffles), with a fixed linear
head (standardised features, logistic regression, C=0.01, not tuned on these folds) on the frozen
ImageNet VGG16 features of the originals (no augmented copies). Peers in the same run:

- ``peaks``: no image at all, extremely randomised trees on the exact peak list (the first 40
  ratios 1/d^2 over the first peak's, plus their histogram): what the positions alone carry.
- ``majority``: always the most frequent class.

Renderings (all 224x224, white on black, the project's Renderer):

- ``2theta``: the training rendering (linear intensity over simulate's 2-theta range);
- ``2theta_sqrt``: square-root intensity (weak peaks visible);
- ``2theta_5_60``: 5-60 deg only (more pixels per degree at low angle);
- ``log_d``: x = log(1/d): a larger or smaller cell becomes a shift of the whole pattern;
- ``d1_over_d``: x = d1/d with d1 the first peak above 1 % (a cubic lattice's lines fall at fixed x).

Features: global average and global max pooling of block4_pool and block5_pool (reported each and
the training model's ``block5 avg``). Each rendering costs one VGG16 pass over the structures
(~150 s for 852 on 2 cores); the heads cost seconds.

    .venv/bin/python benchmarks/study_representation.py --patterns data/patterns/patterns.npz \\
        --split data/split [--weights PATH] [--renderings 2theta log_d ...]

``--synth <a synthesize output, data/synth>`` adds its random crystals to every training fold (never
to a tested one) for the peak-list peer and for the training model's pooling (block5 average), to see
whether they lift accuracy on real structures.

The simulate output of the full COD run (852 structures) is in DVC's cache; point ``--patterns`` and
``--split`` at that run's ``data/patterns/patterns.npz`` and ``data/split``.
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

RENDERINGS = ("2theta", "2theta_sqrt", "2theta_5_60", "log_d", "d1_over_d")
POOLS = ("block4_pool", "block5_pool")
C = 0.01
FOLDS = 5
SHUFFLES = (0, 1)
SPLIT_FIELDS = ("cod_id", "group", "crystal_system")


def labels_and_groups(split_dir: Path, ids: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Crystal system and compound group per structure from the split lists (any split)."""
    from xrdvision.formats.tables import read_table

    rows: dict[str, tuple[str, str]] = {}
    for name in ("train", "val", "test"):
        for r in read_table(split_dir / f"{name}.csv", SPLIT_FIELDS, f"{name} split list"):
            rows[r["cod_id"]] = (r["group"], r["crystal_system"])
    keep = [i for i, cod_id in enumerate(ids) if cod_id in rows]
    groups = np.array([rows[ids[i]][0] for i in keep])
    y = np.array([rows[ids[i]][1] for i in keep])
    return y, groups, keep


def first_line_inverse_d(pat, k: int) -> float:
    """1/d of the first (largest-d) reflection above 1 % of the strongest."""
    _, amp, d = pat.peaks(k)
    return float(1.0 / d[amp > 0.01 * amp.max()].max())


def render_all(pat, keep: list[int], rendering: str, wavelength: float) -> np.ndarray:
    from xrdvision.data.render import Renderer

    tt = np.asarray(pat.two_theta, np.float64)
    inv_d = 2.0 * np.sin(np.radians(tt) / 2.0) / wavelength
    if rendering.startswith("2theta"):
        lo, hi = (5.0, 60.0) if rendering == "2theta_5_60" else (float(tt[0]), float(tt[-1]))
        x = tt
    elif rendering == "log_d":
        x = np.log(inv_d)
        lo, hi = float(x[0]), float(x[-1])
    else:  # d1_over_d: resampled per structure below
        lo, hi = 0.9, 4.0
    renderer = Renderer(224, 1.0, (lo, hi))
    grid = np.linspace(lo, hi, 3000)
    images = np.empty((len(keep), 224, 224, 3), np.float32)
    for n, k in enumerate(keep):
        y = np.asarray(pat.intensity[k], np.float64)
        if rendering == "d1_over_d":
            xs, y = grid, np.interp(grid, inv_d / first_line_inverse_d(pat, k), y, left=0.0, right=0.0)
        else:
            xs = x
        y = y / max(float(y.max()), 1e-12)
        if rendering == "2theta_sqrt":
            y = np.sqrt(np.clip(y, 0.0, None))
        images[n] = renderer.render(xs, y)
    return images


def pooled_features(weights: Path) -> object:
    import keras

    from xrdvision.models.vgg16 import vgg_preprocess_layer

    base = keras.applications.VGG16(weights=str(weights), include_top=False, input_shape=(224, 224, 3))
    inp = keras.Input((224, 224, 3))
    x = vgg_preprocess_layer()(inp)
    taps = keras.Model(base.input, [base.get_layer(p).output for p in POOLS])(x)
    outs = []
    for t in taps:
        outs += [keras.layers.GlobalAveragePooling2D()(t), keras.layers.GlobalMaxPooling2D()(t)]
    return keras.Model(inp, outs)


def cross_validate(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray, make, extra: tuple[np.ndarray, np.ndarray] | None = None
) -> dict[str, float]:
    """Grouped stratified k-fold, repeated over shuffles: mean accuracy and log loss over structures.

    ``extra`` (features, labels), e.g. synthetic crystals, joins every training fold and is never tested.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    accs, losses = [], []
    for seed in SHUFFLES:
        pred = np.empty(len(y), dtype=object)
        p_true = np.empty(len(y))
        for tr, te in StratifiedGroupKFold(FOLDS, shuffle=True, random_state=seed).split(X, y, groups):
            x_tr, y_tr = X[tr], y[tr]
            if extra is not None:
                x_tr, y_tr = np.concatenate([x_tr, extra[0]]), np.concatenate([y_tr, extra[1]])
            model = make().fit(x_tr, y_tr)
            proba = model.predict_proba(X[te])
            classes = list(model.classes_)
            pred[te] = np.asarray(classes, dtype=object)[proba.argmax(1)]
            cols = [classes.index(t) if t in classes else -1 for t in y[te]]
            p_true[te] = [proba[i, c] if c >= 0 else 0.0 for i, c in enumerate(cols)]
        accs.append(float((pred == y).mean()))
        losses.append(float(-np.log(np.clip(p_true, 1e-9, 1.0)).mean()))
    return {"accuracy": float(np.mean(accs)), "log_loss": float(np.mean(losses))}


def linear_head():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))


def peak_features(pat, keep: list[int], n: int = 40) -> np.ndarray:
    """The peak-list peer's features (:mod:`xrdvision.models.peak_peer`) of structures ``keep``."""
    from xrdvision.models.peak_peer import feature_matrix

    return feature_matrix(((pat.peaks(k)[1], pat.peaks(k)[2]) for k in keep), n)


def report(name: str, r: dict[str, float]) -> None:
    print(f"{name:34s} accuracy {r['accuracy']:.3f}  log loss {r['log_loss']:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patterns", type=Path, default=Path("data/patterns/patterns.npz"))
    ap.add_argument("--split", type=Path, default=Path("data/split"))
    ap.add_argument("--weights", default="")
    ap.add_argument("--synth", type=Path, help="a synthesize output (data/synth): added to training folds")
    ap.add_argument("--renderings", nargs="+", default=list(RENDERINGS), choices=RENDERINGS)
    default_out = Path(__file__).parent / "results" / "study_representation.json"
    ap.add_argument("--out", type=Path, default=default_out)
    a = ap.parse_args()

    from sklearn.dummy import DummyClassifier

    from xrdvision.formats.patterns import load_patterns
    from xrdvision.formats.tables import read_table
    from xrdvision.models.peak_peer import make_peer
    from xrdvision.models.vgg16 import resolve_weights

    pat = load_patterns(a.patterns)
    wavelength = float(np.load(a.patterns)["wavelength"])
    ids = [str(i) for i in pat.ids]
    y, groups, keep = labels_and_groups(a.split, ids)
    n_groups = len(set(groups))
    print(f"{len(keep)} structures, {n_groups} compound groups, {FOLDS}-fold x {len(SHUFFLES)} shuffles")
    synth = None
    if a.synth:
        synth_pat = load_patterns(a.synth / "patterns" / "patterns.npz")
        synth_rows = read_table(a.synth / "train.csv", SPLIT_FIELDS, "synthetic training list")
        synth_labels = {r["cod_id"]: r["crystal_system"] for r in synth_rows}
        synth_keep = [k for k, i in enumerate(synth_pat.ids) if str(i) in synth_labels]
        synth_y = np.array([synth_labels[str(synth_pat.ids[k])] for k in synth_keep])
        synth = (synth_pat, synth_keep, synth_y)
        print(f"+ {len(synth_keep)} synthetic crystals from {a.synth}, training folds only")

    def trees():
        return make_peer(500, min_samples_leaf=2, random_state=0, n_jobs=-1)

    peaks = peak_features(pat, keep)
    results: dict[str, dict] = {
        "majority": cross_validate(np.zeros((len(y), 1)), y, groups, lambda: DummyClassifier()),
        "peaks (extra trees)": cross_validate(peaks, y, groups, trees),
    }
    if synth:
        extra = (peak_features(synth[0], synth[1]), synth[2])
        results["peaks (extra trees) + synth"] = cross_validate(peaks, y, groups, trees, extra)
    for name, r in results.items():
        report(name, r)
    net = pooled_features(resolve_weights(a.weights, allow_download=False))
    for rendering in a.renderings:
        t0 = time.perf_counter()
        images = render_all(pat, keep, rendering, wavelength)
        feats = [np.asarray(f) for f in net.predict(images, batch_size=32, verbose=0)]
        seconds = time.perf_counter() - t0
        names = [f"{p} {s}" for p in POOLS for s in ("avg", "max")]
        named = dict(zip(names, feats, strict=True))
        named["block4+5 avg+max"] = np.concatenate(feats, axis=1)
        for fname, X in named.items():
            r = cross_validate(X, y, groups, linear_head)
            results[f"{rendering} / {fname}"] = {**r, "render_and_vgg_seconds": round(seconds, 1)}
            report(f"{rendering} / {fname}", r)
        if synth:  # the training model's pooling only: one more VGG16 pass, over the synthetic crystals
            synth_images = render_all(synth[0], synth[1], rendering, wavelength)
            synth_feats = net.predict(synth_images, batch_size=32, verbose=0)
            x_synth = np.asarray(synth_feats[names.index("block5_pool avg")])
            r = cross_validate(named["block5_pool avg"], y, groups, linear_head, (x_synth, synth[2]))
            results[f"{rendering} / block5_pool avg + synth"] = r
            report(f"{rendering} / block5_pool avg + synth", r)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"machine": platform.machine(), "n_structures": len(keep), "head_C": C, "results": results}
    a.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written {a.out}")


if __name__ == "__main__":
    from xrdvision.errors import XrdVisionError

    try:
        main()
    except XrdVisionError as exc:  # a missing split list, a bad patterns file: one line, not a traceback
        raise SystemExit(f"study_representation: {exc}") from None
