"""Issue 17's ablation: measured-pattern accuracy as each simulation-to-measurement step is added.

Each *training* step is one model on the same training structures and budget (a point of the learning
curve, e.g. ``mp1e4``), trained under cumulative measurement conditions:

- ``baseline``: patterns as simulated (fixed 0.1 deg pseudo-Voigt, no K-alpha2, no shift, noise,
  background, texture, impurity or range cut);
- ``augment``: + measured-like widths (Caglioti + Scherrer), K-alpha2, zero shift and displacement,
  intensity jitter, background and hump, Poisson/Gaussian noise, range cuts (``conditions:``);
- ``po``: + preferred orientation (March-Dollase);
- ``impurity``: + an impurity phase (= the ``conditions:`` defaults);
- ``ka2strip``: as ``impurity`` but no K-alpha2 in training; measured scans are Rachinger-stripped
  instead (the preprocessing alternative of issue 17 step 2).

Each model is then scored on the measured patterns of ``../shared/experimental`` with each *post-hoc*
step: no temperature / the fitted temperature (``T``), the training prior / a uniform prior, and as a
preprocessing check, no background subtraction. Every row gives the tuning half, the report half and the
whole with 95 % bootstrap intervals, balanced accuracy, ECE, per source and per class. The tuning half
is what choices may look at; the report half is only scored.

VGG16 (``--kind vgg16``) runs the ``baseline`` and ``impurity`` steps on images rendered from the same
generator (one draw per structure, head-only on cached features: 4-7 images/s), with the same scoring.

Writes ``benchmarks/results/measured_ablation.json`` (rows are appended; a finished row is skipped).

    python benchmarks/study_measured_ablation.py --peaklists data/peaklists --point mp1e4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from study_learning_curve import ROOT, log, point_table, study_params

RESULTS = ROOT / "benchmarks" / "results" / "measured_ablation.json"
CLEAN = {  # the simulation the project started from: no measurement condition at all
    "caglioti_u": [0.0, 0.0],
    "caglioti_v": [0.0, 0.0],
    "caglioti_w": [0.01, 0.01],  # FWHM 0.1 deg, simulate.fwhm
    "crystallite_nm": [1e5, 1e5],
    "eta": [0.5, 0.5],
    "kalpha2": 0.0,
    "zero_shift": 0.0,
    "displacement": 0.0,
    "intensity_jitter": 0.0,
    "preferred_orientation": 0.0,
    "background": 0.0,
    "hump": 0.0,
    "noise": [0.0, 0.0],
    "poisson": 0.0,
    "impurity": 0.0,
    "range_cut": 0.0,
}
STEPS = ("baseline", "augment", "po", "impurity", "ka2strip")
KALPHA2_TRAINED = 0.6  # share of patterns with the doublet in the steps that train with it (the measured
# scans all show it; the conditions: default before the ablation chose stripping, now 0)


def step_conditions(step: str, defaults: Any) -> Any:
    """``conditions:`` of a training step (cumulative, from the params' defaults)."""
    if step == "baseline":
        return dataclasses.replace(defaults, **CLEAN)
    trained = dataclasses.replace(defaults, kalpha2=KALPHA2_TRAINED)
    if step == "augment":
        return dataclasses.replace(trained, preferred_orientation=0.0, impurity=0.0)
    if step == "po":
        return dataclasses.replace(trained, impurity=0.0)
    if step == "impurity":
        return trained
    if step == "ka2strip":
        return dataclasses.replace(defaults, kalpha2=0.0)
    raise SystemExit(f"--steps: unknown step {step!r} ({', '.join(STEPS)})")


@dataclasses.dataclass
class Measured:
    """The labelled measured patterns prepared for one model kind and preprocessing."""

    x: np.ndarray
    y: np.ndarray
    files: list[str]
    sources: list[str]
    halves: list[str]
    failed: list[tuple[str, str]]


def measured_inputs(params: Any, kind: str, *, background: bool = True, strip_ka2: bool = False) -> Measured:
    """Every INDEX pattern with a label in the params' mode, prepared as ``predict`` prepares it (the
    1-D grid or a rendered image), with the preprocessing choice given; failures are listed."""
    from xrdvision.crystal.labels import class_names
    from xrdvision.data.measurement import scale_intensity
    from xrdvision.data.render import Renderer
    from xrdvision.formats.scans import read_pattern
    from xrdvision.serve.evaluate_measured import _float_or_none, _index_rows, _label, _source_of
    from xrdvision.serve.inputs import error_line
    from xrdvision.serve.measured_split import read_split
    from xrdvision.serve.preprocess import to_training_grid

    mode = params.labels.mode
    index_of = {c: i for i, c in enumerate(class_names(mode))}
    folder = Path(params.measured.folder)
    half_of = read_split(ROOT / "data" / "measured_split.csv")
    g = params.pattern
    sim = dataclasses.replace(
        params.simulate, two_theta_min=g.two_theta_min, two_theta_max=g.two_theta_max, step=g.step
    )
    renderer = Renderer(params.render.size, params.render.line_width, (g.two_theta_min, g.two_theta_max))
    from xrdvision.data.measurement import grid

    x_grid = grid(g)
    out = Measured([], [], [], [], [], [])  # type: ignore[arg-type]
    xs, ys = [], []
    for row in _index_rows(folder, params.measured.index):
        label = _label(row, mode)
        if label not in index_of:
            continue
        path = folder / row["file"]
        try:
            pattern = read_pattern(path)
            default = _float_or_none(row.get("wavelength_A")) or params.measured.wavelength
            y = to_training_grid(
                pattern, sim, default_wavelength=default, background=background, strip_ka2=strip_ka2
            )
        except Exception as exc:  # listed, the others go on
            out.failed.append((row["file"], error_line(path, exc)))
            continue
        if kind == "cnn1d":
            xs.append(scale_intensity(y, g.scale)[:, None])
        else:
            xs.append(renderer.render(x_grid, y).astype(np.float32))
        ys.append(index_of[label])
        out.files.append(row["file"])
        out.sources.append(_source_of(row["file"]))
        out.halves.append(half_of.get(row["file"], ""))
    out.x, out.y = np.stack(xs), np.asarray(ys)
    return out


def figures(probs: np.ndarray, m: Measured, classes: list[str], seed: int) -> dict[str, Any]:
    """Whole / tuning half / report half (accuracy with CI, balanced, top-3/5, ECE), per source, per class."""
    from xrdvision.serve.evaluate_measured import half_metrics, measured_metrics

    out = measured_metrics(probs, m.y, m.sources, classes, seed)
    return out | half_metrics(probs, m.y, m.halves, classes, seed)


def posthoc_rows(
    step: str,
    kind: str,
    probs_t: np.ndarray,
    temperature: float,
    train_prior: list[float],
    m: Measured,
    params: Any,
) -> list[dict[str, Any]]:
    """The post-hoc variants of one model: without / with temperature; the training prior, a uniform one,
    or the tuning half's class frequencies (what ``measured.prior: <file>`` would hold for a lab that
    labelled those patterns; the report half is never looked at)."""
    from scipy.special import softmax

    from xrdvision.crystal.labels import class_names
    from xrdvision.models.calibration import correct_prior, prior_from_spec

    classes = class_names(params.labels.mode)
    raw = softmax(np.log(np.clip(probs_t, 1e-30, None)) * temperature, axis=1)  # undo the temperature
    uniform = prior_from_spec("uniform", classes, train_prior, "ablation")
    tuning = np.array([h == "tuning" for h in m.halves])
    # the prior a lab would set from patterns it has labelled: the tuning half's class frequencies (+1 each)
    minerals = np.bincount(m.y[tuning], minlength=len(classes)) + 1.0
    rows = []
    for name, p in (
        ("no temperature", raw),
        ("temperature", probs_t),
        ("temperature + uniform prior", correct_prior(probs_t, np.asarray(train_prior), uniform)),
        (
            "temperature + tuning-half prior",
            correct_prior(probs_t, np.asarray(train_prior), minerals / minerals.sum()),
        ),
    ):
        rows.append(
            {"model_kind": kind, "step": step, "posthoc": name, **figures(p, m, classes, params.seed)}
        )
    return rows


def run_cnn1d_step(step: str, args: argparse.Namespace, params: Any, cod: Any) -> list[dict[str, Any]]:
    from xrdvision.models.train_cnn1d import fit_cnn1d
    from xrdvision.tracking import runs

    p = dataclasses.replace(params, conditions=step_conditions(step, params.conditions))
    table = point_table(args.point, cod, args, p)
    backup = Path("data/cache/measured_ablation") / f"{step}-{args.point}-{runs.params_digest(p)}"
    log(f"cnn1d {step}: {len(table)} training structures")
    t0 = time.perf_counter()
    model, _, info = fit_cnn1d(p, table=table, backup_dir=backup, verbose=2)
    train_s = time.perf_counter() - t0
    saved = Path("data/cache/measured_ablation/models") / f"{step}-{args.point}-{p.labels.mode}.keras"
    saved.parent.mkdir(parents=True, exist_ok=True)
    model.save(saved)  # for rescoring (--model) without training again
    rows = score_cnn1d(step, model, info["temperature"], info["train_prior"], p)
    return [r | {"n_train": len(table), "train_seconds": round(train_s, 1)} for r in rows]


def score_cnn1d(
    step: str, model: Any, temperature: float, train_prior: list[float], p: Any
) -> list[dict[str, Any]]:
    """Rows of one 1-D model on the measured patterns: each preprocessing variant x post-hoc step."""
    rows = []
    variants = [("snip", True, step == "ka2strip")]
    if step == "impurity":
        variants.append(("no background subtraction", False, False))
    for prep_name, bg, strip in variants:
        m = measured_inputs(p, "cnn1d", background=bg, strip_ka2=strip)
        probs = np.asarray(model.predict(m.x, batch_size=128, verbose=0), dtype=np.float64)
        for r in posthoc_rows(step, "cnn1d", probs, temperature, train_prior, m, p):
            rows.append(
                r
                | {
                    "preprocessing": prep_name + (" + K-alpha2 strip" if strip else ""),
                    "n_failed": len(m.failed),
                }
            )
    for r in rows:
        r["temperature"] = temperature
    log(
        f"cnn1d {step}: "
        + ", ".join(
            f"{r['posthoc']}/{r['preprocessing']} report {r['report_half_accuracy']:.1%}" for r in rows
        )
    )
    return rows


def run_vgg_step(step: str, args: argparse.Namespace, params: Any, cod: Any) -> list[dict[str, Any]]:
    from xrdvision.crystal.labels import class_names
    from xrdvision.models.calibration import class_prior, fit_temperature
    from xrdvision.models.measured_images import table_features as vgg_features
    from xrdvision.models.train import fit_tail
    from xrdvision.models.train_cnn1d import encode, split_holdout
    from xrdvision.models.vgg16 import build_model

    p = dataclasses.replace(
        params,
        conditions=step_conditions(step, params.conditions),
        model=dataclasses.replace(params.model, kind="vgg16"),
    )
    mode = p.labels.mode
    classes = class_names(mode)
    table = point_table(args.point, cod, args, p)
    train, hold = split_holdout(p, table)
    front = build_model(len(classes), p.model, seed=p.seed).front
    t0 = time.perf_counter()
    data = {
        "train": {"features": vgg_features(front, train, p, False, 1), mode: train.labels(mode)},
        "val": {"features": vgg_features(front, hold, p, False, 2), mode: hold.labels(mode)},
    }
    net, _, info = fit_tail(p, data["train"], data["val"], verbose=2)
    train_s = time.perf_counter() - t0
    m = measured_inputs(p, "vgg16")
    feats = measured_vgg_features(front, m, p)
    probs = np.asarray(net.tail.predict(feats, batch_size=64, verbose=0), dtype=np.float64)
    # the tail ends in a softmax: a temperature fitted on the held-out synthetic images, as the 1-D model's
    hold_probs = np.asarray(net.tail.predict(data["val"]["features"], batch_size=64, verbose=0))
    t = fit_temperature(np.log(np.clip(hold_probs, 1e-30, None)), encode(hold, mode, classes))
    from scipy.special import softmax

    probs_t = softmax(np.log(np.clip(probs, 1e-30, None)) / t, axis=1)
    prior = class_prior(encode(train, mode, classes), len(classes))
    rows = posthoc_rows(step, "vgg16", probs_t, t, prior, m, p)
    for r in rows:
        r |= {
            "preprocessing": "snip",
            "n_failed": len(m.failed),
            "n_train": len(table),
            "train_seconds": round(train_s, 1),
            "temperature": t,
        }
    log(f"vgg16 {step}: " + ", ".join(f"{r['posthoc']} report {r['report_half_accuracy']:.1%}" for r in rows))
    log(f"vgg16 {step}: early stopping at epoch {info['best_epoch']} of {info['epochs_run']}")
    return rows


def measured_vgg_features(front: Any, m: Measured, params: Any) -> np.ndarray:
    """VGG16 front features of the measured images, cached (the same images for every VGG16 step)."""
    import hashlib

    key = hashlib.sha256(m.x.tobytes()).hexdigest()[:16]
    path = Path("data/cache") / f"vgg16_measured_{key}.npy"
    if path.is_file():
        return np.load(path)
    out = np.concatenate(
        [np.asarray(front.predict_on_batch(m.x[i : i + 32])) for i in range(0, len(m.x), 32)]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return out


def rescore(args: argparse.Namespace, params: Any, cod: Any) -> list[dict[str, Any]]:
    """Rows of a saved 1-D model (e.g. the registered one): its temperature is read from its
    ``temperature`` layer, its training prior from the labels of ``--point``'s structures."""
    import keras

    from xrdvision.crystal.labels import class_names
    from xrdvision.models.calibration import class_prior
    from xrdvision.models.train_cnn1d import encode

    model = keras.models.load_model(args.model)
    temperature = 1.0 / float(model.get_layer("temperature").scale)
    mode = params.labels.mode
    classes = class_names(mode)
    prior = class_prior(encode(point_table(args.point, cod, args, params), mode, classes), len(classes))
    log(f"{args.model}: temperature {temperature:.3f}")
    return score_cnn1d(args.step_name, model, temperature, prior, params)


def add_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to the results file as it is *now* (several runs may write it in turn)."""
    from xrdvision.formats.atomic import write_json

    doc = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    doc["rows"] += rows
    doc["measured_folder"] = "../shared/experimental (measured.folder)"
    doc["split"] = (
        "data/measured_split.csv (tuning half: looked at while choosing ranges; report half: scored only)"
    )
    write_json(path, doc)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The README's ablation table: one line per (kind, step, preprocessing, post-hoc) row."""

    def pct(r: dict[str, Any], half: str) -> str:
        lo, hi = r[f"{half}_accuracy_ci95_low"], r[f"{half}_accuracy_ci95_high"]
        return f"{r[f'{half}_accuracy']:.1%} ({lo:.0%}-{hi:.0%})"

    head = (
        "| kind | step | preprocessing | post-hoc | tuning half | report half | report balanced | all 440 "
        "| RRUFF / RockJock | ECE (all) |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        src = r["per_source"]
        by_source = f"{src['rruff_agi']['accuracy']:.1%} / {src['rockjock']['accuracy']:.1%}"
        cells = [r["model_kind"], r["step"], r["preprocessing"], r["posthoc"], pct(r, "tuning_half")]
        cells += [pct(r, "report_half"), f"{r['report_half_balanced_accuracy']:.1%}", pct(r, "measured")]
        cells += [by_source, f"{r['measured_ece']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--peaklists", default="data/peaklists")
    ap.add_argument("--generated", default="data/generated")
    ap.add_argument("--point", default="mp1e4", help="the training structures (a learning-curve point)")
    ap.add_argument("--kind", default="cnn1d", choices=["cnn1d", "vgg16"])
    ap.add_argument("--mode", default="crystal_system", choices=["crystal_system", "space_group"])
    ap.add_argument("--steps", nargs="+", default=list(STEPS))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--per-epoch", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--model",
        type=Path,
        help="score this saved 1-D model (a .keras file with its temperature layer) as step --step-name; "
        "its training prior is that of --point's structures",
    )
    ap.add_argument("--step-name", default="registered")
    ap.add_argument(
        "--table", action="store_true", help="print the README's markdown table of --out and exit"
    )
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())["rows"]))
        return

    from xrdvision.config import load_params
    from xrdvision.data.peak_table import cod_table

    params = study_params(load_params(args.params), args)
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    done = {
        (r["model_kind"], r["step"], r.get("point"), r.get("label_mode", "crystal_system"))
        for r in doc["rows"]
    }
    cod = cod_table(params)
    if args.model is not None:
        add_rows(
            args.out, [r | {"label_mode": args.mode, "point": args.point} for r in rescore(args, params, cod)]
        )
        return
    for step in args.steps:
        if (args.kind, step, args.point, args.mode) in done:
            log(f"{args.kind} {step}: done already, skipped")
            continue
        run = run_cnn1d_step if args.kind == "cnn1d" else run_vgg_step
        rows = run(step, args, params, cod)
        add_rows(
            args.out,
            [
                r
                | {
                    "label_mode": args.mode,
                    "point": args.point,
                    "budget": {
                        "epochs": args.epochs,
                        "patterns_per_epoch": args.per_epoch,
                        "batch": args.batch,
                        "lr": args.lr,
                    },
                }
                for r in rows
            ],
        )


if __name__ == "__main__":
    main()
