"""Settings of the measured-pattern check (``measured:``): where the scans are and how to read them."""

from __future__ import annotations

from xrdvision.config.base import Num, Str, _section


@_section
class MeasuredParams:
    """Measured patterns for the real-data check (empty or missing folder: the stage reports it skipped)."""

    folder: Str = "../shared/experimental"
    index: Str = "INDEX.csv"
    wavelength: Num = 1.5418
