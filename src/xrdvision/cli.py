"""``xrdvision`` command: one subcommand per DVC stage, plus the user-facing tools.

Each subcommand is a thin wrapper: read ``params.yaml`` once, call the stage's function, print one
summary line on stdout. Library modules log (``logging``) to stderr: progress notes at INFO (shown by
default), skipped items at WARNING; ``-v`` adds DEBUG, ``-q`` keeps only warnings (and hides progress
bars). Every :class:`~xrdvision.errors.XrdVisionError` (bad input, bad settings) is printed as one
line ``xrdvision: error: <file or key>: <reason>`` with exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from xrdvision.config import Params, load_params
from xrdvision.errors import XrdVisionError


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Show ``xrdvision``'s log records on stderr: INFO by default, DEBUG with -v, WARNING with -q.

    Other libraries' loggers stay at WARNING even with -v (Pillow and matplotlib debug every file).
    """
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    fmt = "%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"
    logging.basicConfig(level=logging.WARNING, format=fmt, stream=sys.stderr)
    logging.getLogger("xrdvision").setLevel(level)


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MPLBACKEND", "Agg")


def _fmt_reasons(reasons: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) or "none"


def cmd_ingest(p: Params, a: argparse.Namespace) -> None:
    from xrdvision.data.ingest import run_ingest

    s = run_ingest(p, Path(a.out), Path(a.report))
    print(
        f"ingest: {s['n_ok']} CIFs from {p.ingest.source} into {a.out}; "
        f"{s.get('n_skipped', 0)} skipped, {s['n_failed']} failed ({_fmt_reasons(s.get('reasons', {}))}); "
        f"report: {a.report}"
    )


def cmd_simulate(p: Params, a: argparse.Namespace) -> None:
    from xrdvision.data.simulate import run_simulate, summary_line

    s = run_simulate(p, Path(a.cifs), Path(a.out))
    print(f"{summary_line(s)}; manifest: {Path(a.out) / 'manifest.csv'}")


def cmd_render(p: Params, a: argparse.Namespace) -> None:
    from xrdvision.data.render import run_render

    s = run_render(p, Path(a.patterns), Path(a.out))
    print(f"render: {s['n_images']} images of {s['n_structures']} structures in {s.get('seconds', 0):.0f} s")


def cmd_split(p: Params, a: argparse.Namespace) -> None:
    from xrdvision.data.split import run_split

    s = run_split(p, Path(a.manifest), Path(a.images), Path(a.out))
    parts = ", ".join(
        f"{k} {s['structures'][k]} structures / {s['images'][k]} images" for k in ("train", "val", "test")
    )
    print(f"split: {parts}; {s['n_groups']} compound groups -> {a.out}")


def cmd_peaklists(p: Params, a: argparse.Namespace) -> None:
    from xrdvision.data.peaklists import run_peaklists
    from xrdvision.data.peaklists_report import summary_line

    s = run_peaklists(p, Path(a.split), Path(a.manifest), Path(a.out), Path(a.work))
    print(f"{summary_line(s)} -> {a.out}")


def cmd_generate(p: Params, a: argparse.Namespace) -> None:
    from xrdvision.data.generate import run_generate, summary_line
    from xrdvision.models.synth_peer import run_synth_peer

    s = run_generate(
        p,
        Path(a.cifs),
        Path(a.split),
        Path(a.patterns),
        Path(a.out),
        Path(a.metrics),
        Path(a.plots),
        Path(a.work),
    )
    print(f"{summary_line(s)} -> {a.out}")
    scores = run_synth_peer(p, Path(a.out), Path(a.split), Path(a.patterns), Path(a.metrics))
    accs = ", ".join(f"{k.rsplit('_', 1)[1]} {v:.1%}" for k, v in scores.items() if "accuracy" in k)
    if accs:
        print(
            f"generate: peak-list peer trained on synthetic crystals only: {accs} on "
            f"{scores['synth_only_scored_on']} real COD validation + test structures -> {a.metrics}"
        )


def cmd_features(p: Params, a: argparse.Namespace) -> None:
    from xrdvision.models.features import run_features

    shard_dirs = {"mp": Path(a.peaklists), "synth": Path(a.generated)}
    s = run_features(p, Path(a.split), Path(a.images), Path(a.out), shard_dirs)
    sizes = ", ".join(f"{k} {v['n_images']}" for k, v in s["splits"].items())
    drawn = ", ".join(f"{n} {src}" for src, n in s["drawn_train_images"].items()) or "none"
    print(
        f"features: cached {s['cut_layer']} output for {sizes} images "
        f"(train includes drawn peak lists: {drawn}); {len(s['skipped'])} skipped"
    )


def cmd_train(p: Params, a: argparse.Namespace) -> None:
    from xrdvision.models.train import run_train

    s = run_train(p, Path(a.features), Path(a.models), Path(a.metrics), Path(a.history), Path(a.split))
    print(
        f"train: val accuracy {s['val_accuracy']:.3f} (train {s['train_accuracy']:.3f}) after "
        f"{s['epochs_run']} epochs; MLflow run {s['run_name']}; logged model {s['model_id']} registered "
        f"as {s['registered_model']} v{s['version']} (challenger)"
    )


def cmd_evaluate(p: Params, a: argparse.Namespace) -> None:
    from xrdvision.models.evaluate import run_evaluate

    m = run_evaluate(
        p,
        Path(a.models),
        Path(a.split),
        Path(a.images),
        Path(a.metrics),
        Path(a.plots),
        Path(a.reports),
        Path(a.train_metrics),
    )
    print(
        f"evaluate: test accuracy {m['test_accuracy']:.3f} (95% CI {m['test_accuracy_ci95_low']:.3f}-"
        f"{m['test_accuracy_ci95_high']:.3f}), loss {m['test_loss']:.3f}, top-3 "
        f"{m['test_top3_accuracy']:.3f}, macro F1 {m['test_macro_f1']:.3f} on {m['n_test']} test structures"
    )


def cmd_tune(p: Params, a: argparse.Namespace) -> None:
    from xrdvision.models.search_space import apply_best_params
    from xrdvision.models.tune import format_summary, run_tune

    if a.apply:
        changed = apply_best_params(Path(a.out), Path(a.params))
        print(f"tune: wrote {', '.join(f'{k}={v}' for k, v in changed.items())} into {a.params}")
        return
    r = run_tune(p, Path(a.features), Path(a.out), n_trials=a.trials, image_dir=Path(a.images))
    print(format_summary(r))


def cmd_promote(p: Params, a: argparse.Namespace) -> None:
    from xrdvision.models.scoring import test_split_scorer
    from xrdvision.tracking.registry import promote

    score = test_split_scorer(p, Path(a.split), Path(a.images))
    print(promote(p, score, force=a.force)["line"])


def cmd_models(p: Params, a: argparse.Namespace) -> None:
    from xrdvision.tracking.registry import format_models_table, list_models

    print(format_models_table(list_models(p)))


def cmd_predict(p: Params | None, a: argparse.Namespace) -> int:
    """``p`` is None where there is no params.yaml: the model brings its own input settings."""
    from xrdvision.serve.predict import format_table, predict_files, to_csv, to_json

    preds = predict_files(
        a.files, p, a.model, top_k=a.top_k, batch_size=a.batch_size, wavelength=a.wavelength
    )
    text = to_json(preds) if a.json else to_csv(preds) if a.csv else format_table(preds)
    print(text if text.endswith("\n") else text + "\n", end="", flush=True)
    if a.csv and preds:  # the table and JSON carry the model's warnings; CSV rows have no place for them
        for w in preds[0].warnings:
            print(f"xrdvision: warning: {w}", file=sys.stderr)
    failed = [x for x in preds if not x.ok]
    for x in failed:
        print(f"xrdvision: error: {x.error}", file=sys.stderr)
    return 1 if failed else 0


def cmd_evaluate_measured(p: Params, a: argparse.Namespace) -> None:
    from xrdvision.serve.evaluate_measured import half_line, run_evaluate_measured

    m = run_evaluate_measured(p, a.models, Path(a.metrics), Path(a.out), a.split)
    if m.get("skipped"):
        print(f"evaluate_measured: skipped: {m['reason']}")
        return
    print(
        f"evaluate_measured: {m['label_mode'].replace('_', ' ')} accuracy {m['measured_accuracy']:.3f} "
        f"(95% CI {m['measured_accuracy_ci95_low']:.3f}-{m['measured_accuracy_ci95_high']:.3f}), "
        f"balanced {m['measured_balanced_accuracy']:.3f} on {m['n']} measured patterns, top-3 "
        f"{m['measured_top3_accuracy']:.3f}; {m['n_failed']} failed; {m['n_unlabelled']} unlabelled; "
        f"reports: {a.out}"
    )
    if "report_half_accuracy" in m:
        print(half_line(m))


def cmd_measure_scans(p: Params, a: argparse.Namespace) -> None:
    from xrdvision.serve.measured_stats import run_measure_scans, summary_line

    print(summary_line(run_measure_scans(p, Path(a.metrics), Path(a.out)), a.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xrdvision",
        description="Crystal-system / space-group classification of powder XRD patterns "
        "(VGG16, DVC, MLflow).",
    )
    parser.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("-v", "--verbose", action="store_true", help="also show debug messages")
    shown.add_argument("-q", "--quiet", action="store_true", help="show warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help: str, **paths: str) -> argparse.ArgumentParser:
        # argparse %-formats help strings: a bare % ("95% CI") must be written %%.
        sp = sub.add_parser(name, help=help.replace("%", "%%"), description=help)
        for key, default in paths.items():
            sp.add_argument(
                f"--{key.replace('_', '-')}",
                dest=key,
                default=default,
                help=f"(default: {default})".replace("%", "%%"),
            )
        sp.set_defaults(func=func)
        return sp

    add(
        "ingest",
        cmd_ingest,
        "Gather CIFs (embedded sample, a folder, or the COD server) into one folder.",
        out="data/cifs",
        report="data/reports/ingest.csv",
    )
    add(
        "simulate",
        cmd_simulate,
        "Labels (pymatgen) and simulated Cu K-alpha patterns (xrayutilities).",
        cifs="data/cifs",
        out="data/patterns",
    )
    add(
        "render",
        cmd_render,
        "Augment the patterns and render them as 224x224 PNG images.",
        patterns="data/patterns",
        out="data/images",
    )
    add(
        "split",
        cmd_split,
        "Grouped, stratified train/validation/test split.",
        manifest="data/patterns/manifest.csv",
        images="data/images/index.csv",
        out="data/split",
    )
    add(
        "generate",
        cmd_generate,
        "Realistic synthetic crystals: fit per-space-group statistics on the training structures, draw "
        "generate.n_crystals crystals, simulate and label them as peak-list shards, check their realism.",
        cifs="data/cifs",
        split="data/split",
        patterns="data/patterns",
        out="data/generated",
        metrics="metrics/generate.json",
        plots="plots/generate",
        work="data/cache/generate",
    )
    add(
        "peaklists",
        cmd_peaklists,
        "Materials Project structures (mp.folder) as labelled peak-list shards for training, without the "
        "compounds of COD's validation and test splits; on a Dask cluster with mp.scheduler (resumable).",
        split="data/split",
        manifest="data/patterns/manifest.csv",
        out="data/peaklists",
        work="data/cache/peaklists",
    )
    add(
        "features",
        cmd_features,
        "Cache the frozen VGG16 layers' output for every split image, plus the Materials Project and "
        "generated training structures of split.train_sources drawn as images (resumable).",
        split="data/split",
        images="data/images",
        peaklists="data/peaklists",
        generated="data/generated",
        out="data/features",
    )
    add(
        "train",
        cmd_train,
        "Fine-tune the VGG16 tail; log to MLflow; register the model as challenger.",
        features="data/features",
        split="data/split",
        models="models",
        metrics="metrics/train.json",
        history="plots/training.csv",
    )
    add(
        "evaluate",
        cmd_evaluate,
        "Test-split accuracy (95% CI), loss, top-3, macro F1, confusion matrix.",
        models="models",
        split="data/split",
        images="data/images",
        metrics="metrics/metrics.json",
        plots="plots",
        reports="reports",
        train_metrics="metrics/train.json",
    )
    tune = add(
        "tune",
        cmd_tune,
        "Optuna study over lr, dense widths, dropout and unfrozen depth (resumable).",
        features="data/features",
        images="data/images",
        out="tune/best_params.yaml",
    )
    tune.add_argument(
        "--trials",
        type=int,
        default=None,
        help="run N more trials (default: top the study up to tune.trials)",
    )
    tune.add_argument("--apply", action="store_true", help="write the best params into params.yaml and stop")
    prom = add(
        "promote",
        cmd_promote,
        "Evaluate challenger and champion on the same test split; move 'champion' if the challenger wins.",
        split="data/split",
        images="data/images",
    )
    prom.add_argument("--force", action="store_true", help="make the challenger champion regardless")
    add("models", cmd_models, "List registered model versions with aliases and test metrics.")
    pred = add(
        "predict",
        cmd_predict,
        "Classify CIFs, measured patterns (xy/csv/dat, RRUFF) or 224x224 images with a registered model.",
    )
    pred.set_defaults(params_optional=True)  # the model carries its input settings: any folder will do
    pred.add_argument("files", nargs="+", metavar="FILE", help="CIF, measured pattern or PNG image")
    pred.add_argument(
        "--model",
        default=None,
        help="models:/<name>@<alias>, models:/<name>/<version>, runs:/<run id>/model or a "
        "models/ folder (default: models:/<prefix>-<label mode>@champion)",
    )
    pred.add_argument("--top-k", dest="top_k", type=int, default=3, help="classes shown per file")
    pred.add_argument("--batch-size", dest="batch_size", type=int, default=16, help="images per batch")
    pred.add_argument(
        "--wavelength",
        type=float,
        default=None,
        help="wavelength (A) of measured patterns, overriding their headers (converted to Cu K-alpha1)",
    )
    fmt = pred.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON output")
    fmt.add_argument("--csv", action="store_true", help="CSV output")
    add(
        "evaluate_measured",
        cmd_evaluate_measured,
        "Accuracy and confusion matrix on the measured patterns in measured.folder.",
        models="models",
        metrics="metrics/measured.json",
        out="plots/measured",
        split="data/measured_split.csv",
    )
    add(
        "measure_scans",
        cmd_measure_scans,
        "Line widths, K-alpha2, noise, background, range of the measured patterns beside the conditions'.",
        metrics="metrics/measured_data.json",
        out="plots/measured_data",
    )
    return parser


def _no_params_needed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """A command that can do without params.yaml (predict), run where there is none and none was named."""
    return (
        getattr(args, "params_optional", False)
        and args.params == parser.get_default("params")
        and "XRDVISION_PARAMS" not in os.environ
        and not Path(args.params).exists()
    )


def main(argv: list[str] | None = None) -> int:
    _quiet_tensorflow()
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(verbose=args.verbose, quiet=args.quiet)
    try:
        params = None if _no_params_needed(parser, args) else load_params(args.params)
        status = args.func(params, args)
    except XrdVisionError as exc:
        print(f"xrdvision: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("xrdvision: interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
