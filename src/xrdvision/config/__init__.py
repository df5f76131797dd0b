"""Settings: ``params.yaml`` is the one source of truth, read once and validated.

Each DVC stage reads the section named after it (as in DVC's example-get-started), and DVC tracks the
keys a stage lists under ``params:`` in ``dvc.yaml``. Validation is strict because a typo in a key
(``two_theta_mx``) would otherwise silently fall back to a default and produce a different experiment
than the one the user asked for: an unknown key, a wrong type or an impossible value is a
:class:`~xrdvision.errors.ConfigError` that names the key.

The sections are pydantic dataclasses (unknown keys forbidden, frozen, strict scalars, bounds as
``Field`` constraints, rules between fields as validators). Dataclasses rather than ``BaseModel``s
because the code and tests copy settings with ``dataclasses.replace`` and read them with
``dataclasses.asdict``; on a pydantic dataclass ``replace`` validates the copy too.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, TypeAdapter, ValidationError, model_validator

from xrdvision.config.base import Bool, Int, Num, Str, _rule, _section
from xrdvision.config.generate import GenerateParams
from xrdvision.config.measured import MeasuredParams
from xrdvision.config.patterns import Cnn1dParams, ConditionsParams, PatternParams
from xrdvision.crystal.bragg import CU_KA1
from xrdvision.errors import ConfigError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")


@_section
class IngestParams:
    """Where the CIFs come from (``source``) and how many to take."""

    source: Literal["embedded", "folder", "cod"] = "embedded"
    embedded: Str = "data/embedded/cod-canonical.tar.xz"  # a tar archive of CIFs, read in place
    folder: Str = "../shared/cod"
    cod_url: Str = "https://www.crystallography.net/cod"
    cod_ids: list[Int] = Field(default_factory=list)
    cod_query: dict[str, Any] = Field(default_factory=dict)
    max_files: Int = Field(0, ge=0)  # 0 = no limit
    request_interval_s: Num = Field(1.0, ge=0)
    retries: Int = Field(3, ge=0)
    timeout_s: Num = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _rules(self) -> IngestParams:
        _rule(all(i > 0 for i in self.cod_ids), "cod_ids", "COD ids are positive integers")
        _rule(
            self.embedded.lower().endswith(ARCHIVE_SUFFIXES),
            "embedded",
            f"expected a tar archive of CIFs ({', '.join(ARCHIVE_SUFFIXES)}); "
            "for a folder use ingest.source: folder",
        )
        return self


@_section
class LabelsParams:
    """How labels are derived: ``mode`` picks the class the model learns."""

    mode: Literal["crystal_system", "space_group"] = "crystal_system"
    symprec: Num = Field(0.01, gt=0, lt=1)  # Angstrom
    angle_tolerance: Num = Field(5.0, gt=0, lt=45)  # degrees


@_section
class SimulateParams:
    """Powder pattern simulation (xrayutilities peak list + pseudo-Voigt profile)."""

    wavelength: Num = Field(CU_KA1, gt=0)  # Angstrom
    kalpha2: Bool = False
    two_theta_min: Num = Field(5.0, ge=0)
    two_theta_max: Num = Field(90.0, le=180)
    step: Num = Field(0.02, gt=0)
    fwhm: Num = Field(0.1, gt=0)  # degrees 2-theta, pseudo-Voigt full width at half maximum
    eta: Num = Field(0.5, ge=0, le=1)  # pseudo-Voigt Lorentzian fraction
    workers: Int = Field(2, ge=1)
    timeout_s: Num = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _rules(self) -> SimulateParams:
        _rule(
            self.two_theta_min < self.two_theta_max,
            "two_theta_min/two_theta_max",
            "need two_theta_min < two_theta_max",
        )
        _rule(
            self.step <= (self.two_theta_max - self.two_theta_min) / 10,
            "step",
            "must give at least 10 points over the 2-theta range",
        )
        return self


@_section
class AugmentParams:
    """The seed's augmentation, applied to the 1-D peak list before rendering."""

    copies: Int = Field(1, ge=0)  # augmented copies per structure, besides the original
    intensity_jitter: Num = Field(0.15, ge=0)  # relative sd of each peak's area (log-normal)
    steps: list[Num] = Field(default_factory=lambda: [0.01, 0.02, 0.04])
    zero_shift: Num = Field(0.1, ge=0)  # max |zero offset|, degrees 2-theta
    strain: Num = Field(0.005, ge=0, lt=0.1)  # max |isotropic lattice strain| (d -> d * (1 + e))
    fwhm_range: list[Num] = Field(default_factory=lambda: [0.08, 0.2])
    noise: Num = Field(0.0, ge=0)  # sd of Gaussian noise relative to the maximum
    background: Num = Field(0.0, ge=0)  # max amplitude of a smooth background, relative to the maximum
    contrast: Num = Field(0.0, ge=0, lt=1)  # image level: line brightness x U(1 -+ contrast); 0 = off
    rotation: Num = Field(0.0, ge=0, le=10)  # image level: max |rotation| in degrees; 0 = off

    @model_validator(mode="after")
    def _rules(self) -> AugmentParams:
        _rule(len(self.steps) > 0 and all(s > 0 for s in self.steps), "steps", "need positive steps")
        _rule(
            len(self.fwhm_range) == 2 and 0 < self.fwhm_range[0] <= self.fwhm_range[1],
            "fwhm_range",
            "must be [low, high] with 0 < low <= high",
        )
        return self


@_section
class RenderParams:
    """How a pattern becomes an image (matplotlib, black background, white line)."""

    size: Int = Field(224, ge=16, le=1024)  # pixels
    line_width: Num = Field(1.0, gt=0)
    workers: Int = Field(2, ge=1)


@_section
class SplitParams:
    """Grouped, stratified train/validation/test split of COD; ``train_sources``: what training draws on
    (COD's training split, Materials Project structures, generated crystals; COD keeps val and test)."""

    train: Num = Field(0.7, gt=0, lt=1)
    val: Num = Field(0.2, gt=0, lt=1)
    test: Num = Field(0.1, gt=0, lt=1)
    train_sources: list[Literal["cod", "mp", "synth"]] = Field(default_factory=lambda: ["cod"])

    @model_validator(mode="after")
    def _rules(self) -> SplitParams:
        total = self.train + self.val + self.test
        _rule(abs(total - 1) < 1e-6, "train/val/test", f"must sum to 1 (they sum to {total:g})")
        ok = 0 < len(self.train_sources) == len(set(self.train_sources))
        _rule(ok, "train_sources", "need one or more of cod, mp, synth, each once")
        return self


_SCHEDULER = re.compile(r"(tcp|tls)://[^\s/:]+:\d{1,5}")


@_section
class MpParams:
    """Materials Project structures as training peak lists (the ``peaklists`` stage); read only when
    ``split.train_sources`` has ``mp``."""

    folder: Str = "../shared/mp"  # the structures-NN.jsonl.xz shards
    max_structures: Int = Field(0, ge=0)  # a seeded sample after the filters and the leakage drop; 0 = all
    icsd_only: Bool = False  # only entries linked to an experimentally observed ICSD structure
    max_sites: Int = Field(0, ge=0)  # leave out cells with more atoms; 0 = no limit
    shard_size: Int = Field(2500, ge=1, le=100000)  # structures per output shard: unit of resume, of a task
    scheduler: Str = "local"  # local, or a Dask scheduler address tcp://host:8786
    workers: Int = Field(2, ge=1)  # processes when scheduler is local

    @model_validator(mode="after")
    def _rules(self) -> MpParams:
        ok = self.scheduler == "local" or _SCHEDULER.fullmatch(self.scheduler) is not None
        _rule(ok, "scheduler", f"{self.scheduler!r} is neither local nor a Dask address like tcp://host:8786")
        return self


@_section
class ModelParams:
    """Which model kind, and the VGG16 transfer-learning model's settings (``cnn1d:`` has the other's)."""

    kind: Literal["vgg16", "cnn1d"] = "vgg16"  # vgg16: images (the default); cnn1d: 1-D patterns
    weights: Str = ""  # "" = look in the usual places (model.resolve_weights)
    dense: list[Int] = Field(default_factory=lambda: [128])  # the seed recipe: [256]
    dropout: Num = Field(0.13, ge=0, lt=1)  # the seed recipe: 0.3
    trainable_conv: Int = Field(0, ge=0, le=13)  # VGG16's 13 conv layers trained, from the top (seed: 3)

    @model_validator(mode="after")
    def _rules(self) -> ModelParams:
        ok = 1 <= len(self.dense) <= 3 and all(w > 0 for w in self.dense)
        _rule(ok, "dense", "need 1-3 positive layer widths")
        return self


@_section
class TrainParams:
    """Fitting: the tuned head-only recipe by default (the seed recipe: learning_rate 1e-4)."""

    epochs: Int = Field(15, ge=1)
    batch_size: Int = Field(32, ge=1)
    learning_rate: Num = Field(0.00163, gt=0, lt=1)
    patience: Int = Field(5, ge=1)
    class_weights: Bool = False


@_section
class MlflowParams:
    """Tracking: a local sqlite store by default; ``MLFLOW_TRACKING_URI`` overrides."""

    tracking_uri: Str = "sqlite:///mlruns/mlflow.db"
    experiment: Str = "xrdvision"
    registered_model_prefix: Str = "xrdvision"


@_section
class TuneParams:
    """Optuna study."""

    trials: Int = Field(10, ge=1)
    storage: Str = "sqlite:///mlruns/optuna.db"
    study_name: Str = "xrdvision"
    epochs: Int = Field(10, ge=1)
    lr_range: list[Num] = Field(default_factory=lambda: [1e-5, 1e-2])
    max_trainable_conv: Int = Field(3, ge=0, le=13)  # 6 (blocks 4+5) is practical on a GPU only

    @model_validator(mode="after")
    def _rules(self) -> TuneParams:
        _rule(
            len(self.lr_range) == 2 and 0 < self.lr_range[0] < self.lr_range[1] < 1,
            "lr_range",
            "must be [low, high] with 0 < low < high < 1",
        )
        return self


@_section
class PromoteParams:
    """Model promotion: which test metric decides challenger vs champion."""

    metric: Literal["accuracy", "loss", "macro_f1", "top3_accuracy"] = "accuracy"


@_section
class Params:
    """All of ``params.yaml``."""

    seed: Int = Field(42, ge=0)
    ingest: IngestParams = Field(default_factory=IngestParams)
    labels: LabelsParams = Field(default_factory=LabelsParams)
    simulate: SimulateParams = Field(default_factory=SimulateParams)
    augment: AugmentParams = Field(default_factory=AugmentParams)
    render: RenderParams = Field(default_factory=RenderParams)
    split: SplitParams = Field(default_factory=SplitParams)
    mp: MpParams = Field(default_factory=MpParams)
    generate: GenerateParams = Field(default_factory=GenerateParams)
    model: ModelParams = Field(default_factory=ModelParams)
    cnn1d: Cnn1dParams = Field(default_factory=Cnn1dParams)
    pattern: PatternParams = Field(default_factory=PatternParams)
    conditions: ConditionsParams = Field(default_factory=ConditionsParams)
    train: TrainParams = Field(default_factory=TrainParams)
    mlflow: MlflowParams = Field(default_factory=MlflowParams)
    tune: TuneParams = Field(default_factory=TuneParams)
    promote: PromoteParams = Field(default_factory=PromoteParams)
    measured: MeasuredParams = Field(default_factory=MeasuredParams)

    def flat(self) -> dict[str, Any]:
        """``{"simulate.step": 0.02, ...}``: the form MLflow logs and ``dvc exp run -S`` takes."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out.update({f"{f.name}.{k}": v for k, v in dataclasses.asdict(value).items()})
            else:
                out[f.name] = value
        return out


_PARAMS = TypeAdapter(Params)
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true/false",
    "string_type": "a string",
}
_EXPECTED_MAPPING = {"list_type": "a list", "dict_type": "a mapping", "dataclass_type": "a mapping"}
_OPS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _field_at(loc: tuple[Any, ...]) -> Any:
    """The pydantic ``FieldInfo`` at ``loc`` below :class:`Params` (``None`` for the top, or no field)."""
    info, tp = None, Params
    for part in loc:
        info = getattr(tp, "__pydantic_fields__", {}).get(part)
        if info is None:
            return None
        tp = info.annotation
    return info


def _bounds(info: Any, ctx: dict[str, Any]) -> str:
    """``must be > 0``, ``must be in [0, 13]``: all of a field's bounds, not only the one broken."""
    b = {k: getattr(m, k) for m in info.metadata for k in _OPS if hasattr(m, k)} if info else ctx
    if len(b) == 2:
        low, high = b.get("ge", b.get("gt")), b.get("le", b.get("lt"))
        return f"must be in {'(' if 'gt' in b else '['}{low:g}, {high:g}{')' if 'lt' in b else ']'}"
    ((op, value),) = b.items()
    return f"must be {_OPS[op]} {value:g}"


def _message(err: dict[str, Any]) -> str:
    """One pydantic error as ``params: <key>: <reason>``; a list item or a mapping key is ``<key>.<n>``."""
    kind, value = err["type"], err.get("input")
    loc = tuple(p for p in err["loc"] if p != "[key]") + ((err["ctx"]["key"],) if kind == "rule" else ())
    key = ".".join(map(str, loc))
    if kind == "rule":
        reason = err["ctx"]["reason"]
    elif kind in ("unexpected_keyword_argument", "extra_forbidden", "invalid_key"):
        parent = getattr(_field_at(loc[:-1]), "annotation", None) if len(loc) > 1 else Params
        close = difflib.get_close_matches(str(loc[-1]), list(getattr(parent, "__pydantic_fields__", {})), n=1)
        reason = "unknown key" + (
            f" (did you mean {'.'.join(map(str, (*loc[:-1], close[0])))}?)" if close else ""
        )
    elif kind in _EXPECTED:
        reason = f"expected {_EXPECTED[kind]}, got {value!r}"
    elif kind in _EXPECTED_MAPPING:
        reason = f"expected {_EXPECTED_MAPPING[kind]}, got {type(value).__name__}"
    elif kind == "literal_error":
        info = _field_at(loc)
        if info is None:  # an item of a list of choices (split.train_sources.1)
            info = _field_at(loc[:-1])
            choices = typing.get_args(typing.get_args(info.annotation)[0]) if info is not None else ()
        else:
            choices = typing.get_args(info.annotation)
        reason = f"{value!r} is not one of {', '.join(map(str, choices))}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        reason = _bounds(_field_at(loc), err.get("ctx", {}))
    else:
        reason = err["msg"]
    return f"params: {key}: {' '.join(str(reason).split())}"


def parse_params(data: dict[str, Any] | None) -> Params:
    """Validate a params mapping (as read from YAML) and return :class:`Params`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("params: the file must hold a mapping of sections")
    try:
        return _PARAMS.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(_message(exc.errors(include_url=False)[0])) from None


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
