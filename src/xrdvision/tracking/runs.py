"""MLflow plumbing: where runs go, what they are tagged with, and failing early when it is unreachable.

Default store: a sqlite file under ``mlruns/`` (git-ignored), so ``mlflow ui --backend-store-uri
sqlite:///mlruns/mlflow.db`` shows every run with no server. ``MLFLOW_TRACKING_URI`` (or params
``mlflow.tracking_uri``) points at a shared server instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

import yaml

from xrdvision.config import MlflowParams, Params
from xrdvision.errors import XrdVisionError, one_line

RUN_INFO = "run.json"  # written beside the model: which MLflow run and model version it is


def tracking_uri(p: MlflowParams) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the params' URI (sqlite paths made absolute-safe)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or p.tracking_uri


def setup(p: MlflowParams, *, check: bool = True) -> str:
    """Point MLflow at the store, create the local folder, and check the store answers.

    Checking first means an unreachable server is reported in one line *before* minutes of
    training, and no model or metrics are written for a run that could not be logged.
    """
    import mlflow

    uri = tracking_uri(p)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif uri.startswith("http"):
        # Fail fast instead of MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # MLflow 3 also exports these URIs as environment variables; put back what the user had, so that
    # ``MLFLOW_TRACKING_URI`` keeps meaning "the user's choice" and a later setup() in the same process
    # (a notebook, the test suite) with other params is not sent to this store.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if check:
        try:
            mlflow.MlflowClient().search_experiments(max_results=1)
        except Exception as exc:  # connection errors surface as several MLflow/requests types
            raise XrdVisionError(f"{uri}: MLflow tracking store not reachable ({one_line(exc)})") from None
    return uri


def use_experiment(p: MlflowParams) -> str:
    """Select (creating if needed) the experiment; returns its id.

    With a local sqlite store, artifacts go to ``artifacts/`` beside the database (an absolute URI),
    so runs and their files stay together whatever folder a command is started from.
    """
    import mlflow

    exp = mlflow.get_experiment_by_name(p.experiment)
    if exp is not None:
        mlflow.set_experiment(experiment_id=exp.experiment_id)
        return exp.experiment_id
    uri = tracking_uri(p)
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts").as_uri()
    exp_id = mlflow.create_experiment(p.experiment, artifact_location=location)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def registered_model_name(p: MlflowParams, mode: str) -> str:
    """One registered model per label mode: crystal-system and space-group models never mix."""
    return f"{p.registered_model_prefix}-{mode.replace('_', '-')}"


def git_commit() -> str:
    """The current commit (with ``-dirty`` if the tree has changes), or ``unknown`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_hashes(paths: list[str], lock_path: str | Path = "dvc.lock") -> dict[str, str]:
    """DVC's md5 of each data path, read from ``dvc.lock`` (what ``dvc repro`` recorded).

    Outside DVC (or for a path not yet locked) the md5 of the path's files is computed the same way
    DVC would not, so it is tagged ``md5:`` to tell them apart.
    """
    out: dict[str, str] = {}
    locked: dict[str, str] = {}
    lock = Path(lock_path)
    if lock.is_file():
        data = yaml.safe_load(lock.read_text()) or {}
        for stage in (data.get("stages") or {}).values():
            for item in stage.get("outs", []) or []:
                if "md5" in item:
                    locked[str(item["path"]).rstrip("/")] = item["md5"]
    for path in paths:
        key = path.rstrip("/")
        if key in locked:
            out[key] = locked[key]
        elif Path(path).exists():
            out[key] = "md5:" + _tree_md5(Path(path))
    return out


def _tree_md5(path: Path) -> str:
    h = hashlib.md5()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(hashlib.md5(f.read_bytes()).digest())
    return h.hexdigest()


def write_run_info(path: Path, info: dict[str, Any]) -> None:
    from xrdvision.formats.atomic import write_json

    write_json(path, info)


def read_run_info(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise XrdVisionError(f"{path}: no run info (run `dvc repro train` first)") from None
    except json.JSONDecodeError as exc:
        raise XrdVisionError(f"{path}: corrupt run info ({exc})") from None


# --------------------------------------------------------------------------------------------------
# What a run is called and what it says about itself in the MLflow UI
# --------------------------------------------------------------------------------------------------

NOTE_TAG = "mlflow.note.content"  # the run page's description
TEST_SPLIT_TAG = "test_split_md5"  # the test split a run (and its model version) was scored on
# Keys that say where a run is logged or how fast it goes, not what is trained: left out of the hash.
_NOT_THE_MODEL = ("mlflow.", "tune.", "promote.", "measured.", "simulate.workers", "simulate.timeout_s")
_NOT_THE_MODEL += ("mp.scheduler", "mp.workers")


def params_digest(params: Params, length: int = 7) -> str:
    """A short hash of the settings that make the model (data, labels, recipe), as in a run's name."""
    flat = {k: v for k, v in params.flat().items() if not k.startswith(_NOT_THE_MODEL)}
    flat.pop("render.workers", None)
    return hashlib.md5(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:length]


def short_float(x: float) -> str:
    """``1.6e-3``, ``1e-4``: a learning rate as it reads best in a run name."""
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def data_source(params: Params) -> str:
    """``embedded``, ``folder-cod`` (the folder's name), ``cod``; ``+mp1000+synth100000`` (sizes of the
    other ``split.train_sources``), without the first part when COD's training split is not used."""
    src = params.ingest.source
    if src == "folder":
        src = f"folder-{Path(params.ingest.folder).name or 'cifs'}"
    extra = [s for s in params.split.train_sources if s != "cod"]
    if extra:  # what else training drew on; "cod" dropped when COD's training split is not used
        sizes = {"mp": params.mp.max_structures, "synth": params.generate.n_crystals}
        names = [f"{s}{sizes[s]}" if sizes[s] else s for s in extra]
        src = "+".join(([src] if "cod" in params.split.train_sources else []) + names)
    return src


def architecture(params: Params) -> str:
    """``head128`` (frozen convolutions, Dense 128) or ``conv3-head256`` (3 conv layers trained too);
    for the 1-D model ``resnet16x4-k7`` (architecture, width x depth, kernel)."""
    if params.model.kind == "cnn1d":
        c = params.cnn1d
        return f"{c.architecture}{c.width}x{c.depth}-k{c.kernel}"
    head = "head" + "x".join(str(w) for w in params.model.dense)
    return head if params.model.trainable_conv == 0 else f"conv{params.model.trainable_conv}-{head}"


def run_name(params: Params, extra: str = "") -> str:
    """``vgg16-crystal_system-embedded-head128-lr1.6e-3[-extra]-<hash>``: a list of runs tells them apart."""
    parts = [params.model.kind, params.labels.mode, data_source(params), architecture(params)]
    parts += [
        f"lr{short_float(params.train.learning_rate)}",
        *([extra] if extra else []),
        params_digest(params),
    ]
    return "-".join(parts)


def run_note(params: Params, summary: str = "") -> str:
    """The run's one-line description (``mlflow.note.content``)."""
    m = params.model
    if m.kind == "cnn1d":
        c, g = params.cnn1d, params.pattern
        line = (
            f"1-D CNN ({c.architecture}, width {c.width}, depth {c.depth}, kernel {c.kernel}, dropout "
            f"{c.dropout:g}) {params.labels.mode.replace('_', ' ')} classifier on {data_source(params)} "
            f"peak lists, patterns drawn on the fly on {g.two_theta_min:g}-{g.two_theta_max:g} deg at "
            f"{g.step:g} deg ({g.scale}); Adam lr {short_float(params.train.learning_rate)}, batch "
            f"{params.train.batch_size}, up to {params.train.epochs} epochs"
        )
        return f"{line}; {summary}" if summary else line
    frozen = (
        "all conv layers frozen" if m.trainable_conv == 0 else f"top {m.trainable_conv} conv layers trained"
    )
    line = (
        f"VGG16 {params.labels.mode.replace('_', ' ')} classifier on {data_source(params)} CIFs; "
        f"Dense {'-'.join(map(str, m.dense))}, dropout {m.dropout:g}, {frozen}; "
        f"Adam lr {short_float(params.train.learning_rate)}, batch {params.train.batch_size}, "
        f"up to {params.train.epochs} epochs"
    )
    return f"{line}; {summary}" if summary else line


def git_sha() -> str | None:
    """The bare commit id (for MLflow's ``mlflow.source.git.commit``), or None outside git."""
    commit = git_commit()
    return None if commit == "unknown" else commit.removesuffix("-dirty")


def file_md5(path: Path) -> str:
    """md5 of a file's bytes: DVC's hash of that file (its cache object's name)."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def split_dataset(path: Path, name: str, mode: str, key: str = "cod_id", unit: str = "structures"):
    """A split list (``data/split/<split>.csv``) as an MLflow dataset: its rows, the file's md5 as digest,
    and in the profile the number of structures (distinct ``key``) per class of ``mode``. Any table
    with ``key`` and ``mode`` columns works (the measured patterns' ``INDEX.csv``: ``key="file"``)."""
    import pandas as pd
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.pandas_dataset import PandasDataset

    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise XrdVisionError(f"{path}: cannot read the split list ({one_line(exc)})") from None
    if mode not in df.columns or key not in df.columns:
        raise XrdVisionError(f"{path}: table without '{key}' and '{mode}' columns")
    labelled = df[df[mode] != ""].drop_duplicates(key)
    per_class = labelled.groupby(mode).size()
    profile = {
        "rows": len(df),
        unit: int(df[key].nunique()),
        f"{unit}_per_class": {str(k): int(v) for k, v in per_class.items()},
    }

    class SplitDataset(PandasDataset):
        @property
        def profile(self):
            return {**super().profile, **profile}

    with warnings.catch_warnings():  # a local path matches two equal local sources: MLflow warns
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(path))
    return SplitDataset(df, source=source, targets=mode, name=name, digest=file_md5(path))


def dataset_input(dataset, context: str):
    """The entity ``MlflowClient.log_inputs`` takes: a dataset and its context (training, testing...)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
