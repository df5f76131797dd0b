"""Settings of the 1-D pattern model (``cnn1d:``), its input grid (``pattern:``) and the measurement
conditions drawn for every training pattern (``conditions:``).

Why sections of their own: the grid and the conditions are shared by both model kinds (VGG16 renders its
images from the same on-the-fly patterns), and the measured-pattern work tunes ``conditions`` without
touching the model. A range is ``[low, high]`` and is drawn uniformly per pattern (``crystallite_nm`` and
``counts`` log-uniformly); a share (``kalpha2``, ``impurity`` ...) is the probability that a pattern
has that condition at all. The defaults cover what ``measure_scans`` found on the *tuning* half of the
measured patterns (``data/measured_split.csv``; FWHM 0.044-0.35 degrees at 40 degrees, K-alpha2 in 60 %,
noise up to 4 %, backgrounds up to 7 % and humps up to 4 % of the strongest line, a third of the scans
ending at 65 degrees); the report half was not looked at.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from xrdvision.config.base import Int, Num, _rule, _section


def _range(values: list[float], low: float, high: float) -> bool:
    return len(values) == 2 and low <= values[0] <= values[1] <= high


@_section
class Cnn1dParams:
    """The 1-D convolutional network (``model.kind: cnn1d``)."""

    architecture: Literal["resnet", "plain"] = "resnet"  # plain: the simpler variant it is measured against
    width: Int = Field(16, ge=4, le=512)  # channels of the first stage (doubled at each later stage)
    depth: Int = Field(4, ge=1, le=8)  # stages, each halving the length
    kernel: Int = Field(7, ge=3, le=101)  # convolution kernel (grid points)
    dropout: Num = Field(0.3, ge=0, lt=1)
    dense: Int = Field(128, ge=8, le=4096)  # width of the dense layer before the output


@_section
class PatternParams:
    """The fine 2-theta grid a 1-D pattern lives on, and how training patterns are drawn."""

    two_theta_min: Num = Field(5.0, ge=0, lt=180)
    two_theta_max: Num = Field(90.0, gt=0, le=180)
    step: Num = Field(0.01, gt=0, le=0.01)  # the resolution: a line splitting of 0.01 deg is seen
    scale: Literal["sqrt", "linear", "log"] = "sqrt"  # intensity scaling before the network
    patterns_per_epoch: Int = Field(0, ge=0)  # 0 = one per training structure
    holdout: Int = Field(1000, ge=10)  # synthetic held-out patterns (fixed draw) for early stopping
    holdout_share: Num = Field(0.02, gt=0, lt=0.5)  # training structures set aside for them

    @model_validator(mode="after")
    def _rules(self) -> PatternParams:
        _rule(self.two_theta_min < self.two_theta_max, "two_theta_max", "must be above two_theta_min")
        n = (self.two_theta_max - self.two_theta_min) / self.step
        _rule(n <= 50000, "step", f"gives {n:.0f} grid points; at most 50000")
        return self


@_section
class ConditionsParams:
    """Measurement conditions drawn afresh for every training pattern (see the module doc)."""

    caglioti_u: list[Num] = Field(default_factory=lambda: [0.0, 0.02])  # deg^2: FWHM^2 = U tan^2 + V tan + W
    caglioti_v: list[Num] = Field(default_factory=lambda: [-0.01, 0.0])
    caglioti_w: list[Num] = Field(default_factory=lambda: [0.0004, 0.012])
    crystallite_nm: list[Num] = Field(default_factory=lambda: [20.0, 1000.0])  # Scherrer (K = 0.9), added
    eta: list[Num] = Field(default_factory=lambda: [0.2, 1.0])  # pseudo-Voigt Lorentzian fraction
    kalpha2: Num = Field(0.0, ge=0, le=1)  # share with the Cu K-alpha2 doublet (0: scans are stripped)
    zero_shift: Num = Field(0.08, ge=0, le=2)  # |2-theta zero offset|, degrees, at most
    displacement: Num = Field(0.2, ge=0, le=2)  # |sample displacement|, mm, at most (goniometer R 240 mm)
    intensity_jitter: Num = Field(0.1, ge=0, le=1)  # relative sd of each line's intensity
    preferred_orientation: Num = Field(0.5, ge=0, le=1)  # share with March-Dollase texture
    march_dollase: list[Num] = Field(default_factory=lambda: [0.6, 1.0])  # r: 1 = none, < 1 plates
    background: Num = Field(0.08, ge=0, le=5)  # polynomial background, at most this x the strongest line
    hump: Num = Field(0.04, ge=0, le=5)  # amorphous hump, at most this x the strongest line
    noise: list[Num] = Field(default_factory=lambda: [0.0002, 0.02])  # Gaussian sd / strongest line
    poisson: Num = Field(0.5, ge=0, le=1)  # share with Poisson counting noise instead of Gaussian
    counts: list[Num] = Field(default_factory=lambda: [1000.0, 100000.0])  # counts of the strongest line
    impurity: Num = Field(0.2, ge=0, le=1)  # share with a second crystal's lines
    impurity_fraction: list[Num] = Field(default_factory=lambda: [0.01, 0.2])  # its strongest line's height
    range_cut: Num = Field(0.35, ge=0, le=1)  # share whose scan stops early (the rest of the grid is 0)
    range_min: Num = Field(50.0, gt=0, le=180)  # the earliest such a scan stops, degrees

    @model_validator(mode="after")
    def _rules(self) -> ConditionsParams:
        for key, (low, high) in {
            "caglioti_u": (0.0, 1.0),
            "caglioti_v": (-1.0, 1.0),
            "caglioti_w": (0.0, 1.0),
            "crystallite_nm": (1.0, 1e5),
            "eta": (0.0, 1.0),
            "march_dollase": (0.1, 1.0),
            "noise": (0.0, 1.0),
            "counts": (1.0, 1e9),
            "impurity_fraction": (0.0, 1.0),
        }.items():
            _rule(_range(getattr(self, key), low, high), key, f"must be [low, high] within [{low}, {high}]")
        return self
