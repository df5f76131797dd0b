"""Settings of the measured-pattern check and of predictions on a user's scans (``measured:``): where the
scans are, how to read them, which class prior the probabilities assume and when a call is uncertain."""

from __future__ import annotations

from pydantic import model_validator

from xrdvision.config.base import Bool, Num, Str, _rule, _section

PRIOR_WORDS = ("train", "uniform")


@_section
class MeasuredParams:
    """Measured patterns for the real-data check (empty or missing folder: the stage reports it skipped).

    ``prior``: the class frequencies predictions assume. ``train`` leaves the model's own (its training
    sources'), ``uniform`` removes them, a path names a CSV of ``class,weight`` rows (e.g. the crystal
    systems of the minerals a lab sees); see :mod:`xrdvision.models.calibration`. ``uncertain_below``:
    a top-1 probability under it is flagged ``uncertain`` (0 = never). ``strip_kalpha2``: remove the
    K-alpha2 half of each doublet from Cu K-alpha1+2 scans (Rachinger) instead of training with it (for a
    model trained with ``conditions.kalpha2: 0``; stored with the model, README: the ablation).
    """

    folder: Str = "../shared/experimental"
    index: Str = "INDEX.csv"
    wavelength: Num = 1.5418
    prior: Str = "train"
    uncertain_below: Num = 0.5
    strip_kalpha2: Bool = True

    @model_validator(mode="after")
    def _rules(self) -> MeasuredParams:
        _rule(
            self.prior in PRIOR_WORDS or self.prior.lower().endswith(".csv"),
            "prior",
            f"{self.prior!r} is neither train, uniform nor a .csv file of class,weight rows",
        )
        _rule(0.0 <= self.uncertain_below < 1.0, "uncertain_below", "must be in [0, 1)")
        _rule(self.wavelength > 0, "wavelength", "must be positive (Angstrom)")
        return self
