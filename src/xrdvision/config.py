"""Settings: ``params.yaml`` is the one source of truth, read once and validated.

Each DVC stage reads the section named after it (as in DVC's example-get-started), and DVC tracks the
keys a stage lists under ``params:`` in ``dvc.yaml``. Validation is strict because a typo in a key
(``two_theta_mx``) would otherwise silently fall back to a default and produce a different experiment
than the one the user asked for: an unknown key, a wrong type or an impossible value is a
:class:`~xrdvision.errors.ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from xrdvision.crystal.bragg import CU_KA1
from xrdvision.errors import ConfigError


@dataclass(frozen=True)
class IngestParams:
    """Where the CIFs come from (``source``) and how many to take."""

    source: Literal["embedded", "folder", "cod"] = "embedded"
    embedded_dir: str = "data/embedded"
    folder: str = "../shared/cod"
    cod_url: str = "https://www.crystallography.net/cod"
    cod_ids: list[int] = field(default_factory=list)
    cod_query: dict[str, Any] = field(default_factory=dict)
    max_files: int = 0  # 0 = no limit
    request_interval_s: float = 1.0
    retries: int = 3
    timeout_s: float = 30.0

    def validate(self) -> None:
        _check(self.max_files >= 0, "ingest.max_files", "must be >= 0 (0 means no limit)")
        _check(self.request_interval_s >= 0, "ingest.request_interval_s", "must be >= 0")
        _check(self.retries >= 0, "ingest.retries", "must be >= 0")
        _check(self.timeout_s > 0, "ingest.timeout_s", "must be > 0")
        _check(all(i > 0 for i in self.cod_ids), "ingest.cod_ids", "COD ids are positive integers")


@dataclass(frozen=True)
class LabelsParams:
    """How labels are derived: ``mode`` picks the class the model learns."""

    mode: Literal["crystal_system", "space_group"] = "crystal_system"
    symprec: float = 0.01
    angle_tolerance: float = 5.0

    def validate(self) -> None:
        _check(0 < self.symprec < 1, "labels.symprec", "must be in (0, 1) Angstrom")
        _check(0 < self.angle_tolerance < 45, "labels.angle_tolerance", "must be in (0, 45) degrees")


@dataclass(frozen=True)
class SimulateParams:
    """Powder pattern simulation (xrayutilities peak list + pseudo-Voigt profile)."""

    wavelength: float = CU_KA1
    kalpha2: bool = False
    two_theta_min: float = 5.0
    two_theta_max: float = 90.0
    step: float = 0.02
    fwhm: float = 0.1  # degrees 2-theta, pseudo-Voigt full width at half maximum
    eta: float = 0.5  # pseudo-Voigt Lorentzian fraction
    workers: int = 2
    timeout_s: float = 60.0

    def validate(self) -> None:
        _check(self.wavelength > 0, "simulate.wavelength", "must be > 0 Angstrom")
        _check(
            0 <= self.two_theta_min < self.two_theta_max <= 180,
            "simulate.two_theta_min/two_theta_max",
            "need 0 <= two_theta_min < two_theta_max <= 180 degrees",
        )
        _check(
            0 < self.step <= (self.two_theta_max - self.two_theta_min) / 10,
            "simulate.step",
            "must be > 0 and give at least 10 points over the 2-theta range",
        )
        _check(self.fwhm > 0, "simulate.fwhm", "must be > 0 degrees")
        _check(0 <= self.eta <= 1, "simulate.eta", "must be in [0, 1]")
        _check(self.workers >= 1, "simulate.workers", "must be >= 1")
        _check(self.timeout_s > 0, "simulate.timeout_s", "must be > 0 seconds")


@dataclass(frozen=True)
class AugmentParams:
    """The seed's augmentation, applied to the 1-D peak list before rendering."""

    copies: int = 2  # augmented copies per structure, besides the original
    intensity_jitter: float = 0.15  # relative sd of each peak's area (log-normal)
    steps: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.04])
    zero_shift: float = 0.1  # max |zero offset|, degrees 2-theta
    strain: float = 0.005  # max |isotropic lattice strain| (d -> d * (1 + e))
    fwhm_range: list[float] = field(default_factory=lambda: [0.08, 0.2])
    noise: float = 0.0  # sd of Gaussian noise relative to the maximum
    background: float = 0.0  # max amplitude of a smooth background, relative to the maximum

    def validate(self) -> None:
        _check(self.copies >= 0, "augment.copies", "must be >= 0")
        _check(self.intensity_jitter >= 0, "augment.intensity_jitter", "must be >= 0")
        _check(len(self.steps) > 0 and all(s > 0 for s in self.steps), "augment.steps", "need positive steps")
        _check(self.zero_shift >= 0, "augment.zero_shift", "must be >= 0")
        _check(0 <= self.strain < 0.1, "augment.strain", "must be in [0, 0.1)")
        _check(
            len(self.fwhm_range) == 2 and 0 < self.fwhm_range[0] <= self.fwhm_range[1],
            "augment.fwhm_range",
            "must be [low, high] with 0 < low <= high",
        )
        _check(self.noise >= 0, "augment.noise", "must be >= 0")
        _check(self.background >= 0, "augment.background", "must be >= 0")


@dataclass(frozen=True)
class RenderParams:
    """How a pattern becomes an image (matplotlib, black background, white line)."""

    size: int = 224
    line_width: float = 1.0
    workers: int = 2

    def validate(self) -> None:
        _check(16 <= self.size <= 1024, "render.size", "must be in [16, 1024] pixels")
        _check(self.line_width > 0, "render.line_width", "must be > 0")
        _check(self.workers >= 1, "render.workers", "must be >= 1")


@dataclass(frozen=True)
class SplitParams:
    """Grouped, stratified train/validation/test split."""

    train: float = 0.7
    val: float = 0.2
    test: float = 0.1

    def validate(self) -> None:
        for name in ("train", "val", "test"):
            _check(0 < getattr(self, name) < 1, f"split.{name}", "must be in (0, 1)")
        total = self.train + self.val + self.test
        _check(abs(total - 1) < 1e-6, "split.train/val/test", f"must sum to 1 (they sum to {total:g})")


@dataclass(frozen=True)
class SynthParams:
    """Random crystals (PyXtal) added to the training images only; ``per_system: 0`` = off."""

    per_system: int = 0  # random crystals per crystal system
    max_atoms: int = 40  # atoms in the conventional cell, at most
    max_species: int = 4  # elements per crystal, at most
    copies: int = 0  # augmented copies per synthetic crystal (each crystal is already new)

    def validate(self) -> None:
        _check(0 <= self.per_system <= 100000, "synth.per_system", "must be in [0, 100000]")
        _check(2 <= self.max_atoms <= 500, "synth.max_atoms", "must be in [2, 500]")
        _check(1 <= self.max_species <= 8, "synth.max_species", "must be in [1, 8]")
        _check(0 <= self.copies <= 20, "synth.copies", "must be in [0, 20]")


@dataclass(frozen=True)
class ModelParams:
    """The VGG16 transfer-learning model."""

    weights: str = ""  # "" = look in the usual places (model.resolve_weights)
    dense: list[int] = field(default_factory=lambda: [256])
    dropout: float = 0.3
    trainable_conv: int = 3  # how many of VGG16's 13 conv layers (from the top) are trained

    def validate(self) -> None:
        _check(
            1 <= len(self.dense) <= 3 and all(w > 0 for w in self.dense),
            "model.dense",
            "need 1-3 positive layer widths",
        )
        _check(0 <= self.dropout < 1, "model.dropout", "must be in [0, 1)")
        _check(0 <= self.trainable_conv <= 13, "model.trainable_conv", "must be in [0, 13]")


@dataclass(frozen=True)
class TrainParams:
    """Fitting: the seed recipe by default."""

    epochs: int = 15
    batch_size: int = 32
    learning_rate: float = 1e-4
    patience: int = 5
    class_weights: bool = False

    def validate(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(0 < self.learning_rate < 1, "train.learning_rate", "must be in (0, 1)")
        _check(self.patience >= 1, "train.patience", "must be >= 1")


@dataclass(frozen=True)
class MlflowParams:
    """Tracking: a local sqlite store by default; ``MLFLOW_TRACKING_URI`` overrides."""

    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "xrdvision"
    registered_model_prefix: str = "xrdvision"


@dataclass(frozen=True)
class TuneParams:
    """Optuna study."""

    trials: int = 10
    storage: str = "sqlite:///mlruns/optuna.db"
    study_name: str = "xrdvision"
    epochs: int = 10
    lr_range: list[float] = field(default_factory=lambda: [1e-5, 1e-2])
    max_trainable_conv: int = 3  # 6 (blocks 4+5) is practical on a GPU only

    def validate(self) -> None:
        _check(self.trials >= 1, "tune.trials", "must be >= 1")
        _check(self.epochs >= 1, "tune.epochs", "must be >= 1")
        _check(
            len(self.lr_range) == 2 and 0 < self.lr_range[0] < self.lr_range[1] < 1,
            "tune.lr_range",
            "must be [low, high] with 0 < low < high < 1",
        )
        _check(0 <= self.max_trainable_conv <= 13, "tune.max_trainable_conv", "must be in [0, 13]")


@dataclass(frozen=True)
class PromoteParams:
    """Model promotion: which test metric decides challenger vs champion."""

    metric: Literal["accuracy", "loss", "macro_f1", "top3_accuracy"] = "accuracy"


@dataclass(frozen=True)
class MeasuredParams:
    """Measured patterns for the real-data check (empty or missing folder: the stage reports it skipped)."""

    folder: str = "../shared/experimental"
    index: str = "INDEX.csv"
    wavelength: float = 1.5418


@dataclass(frozen=True)
class Params:
    """All of ``params.yaml``."""

    seed: int = 42
    ingest: IngestParams = field(default_factory=IngestParams)
    labels: LabelsParams = field(default_factory=LabelsParams)
    simulate: SimulateParams = field(default_factory=SimulateParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    render: RenderParams = field(default_factory=RenderParams)
    split: SplitParams = field(default_factory=SplitParams)
    synth: SynthParams = field(default_factory=SynthParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)
    tune: TuneParams = field(default_factory=TuneParams)
    promote: PromoteParams = field(default_factory=PromoteParams)
    measured: MeasuredParams = field(default_factory=MeasuredParams)

    def validate(self) -> None:
        _check(self.seed >= 0, "seed", "must be >= 0")

    def flat(self) -> dict[str, Any]:
        """``{"simulate.step": 0.02, ...}``: the form MLflow logs and ``dvc exp run -S`` takes."""
        out: dict[str, Any] = {}

        def walk(obj: Any, prefix: str) -> None:
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                key = f"{prefix}{f.name}"
                if dataclasses.is_dataclass(value):
                    walk(value, key + ".")
                else:
                    out[key] = value

        walk(self, "")
        return out


def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"params: {key}: {reason}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (with int -> float widening)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"params: {key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"params: {key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"params: {key}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"params: {key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        return _coerce(value, tp, key)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"params: {key}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"params: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"params: {key}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"params: {key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not user input


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"params: {prefix}{key}: unknown key{hint}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def parse_params(data: dict[str, Any] | None) -> Params:
    """Validate a params mapping (as read from YAML) and return :class:`Params`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("params: the file must hold a mapping of sections")
    params = _build(Params, data)
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if dataclasses.is_dataclass(value) and hasattr(value, "validate"):
            value.validate()
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml`` (``XRDVISION_PARAMS`` overrides the path)."""
    path = Path(os.environ.get("XRDVISION_PARAMS", path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    try:
        return parse_params(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def default_params_dict() -> dict[str, Any]:
    """The defaults as a nested dict (what ``params.yaml`` is generated from and checked against)."""
    return dataclasses.asdict(Params())
