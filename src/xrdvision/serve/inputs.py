"""Files to model inputs: a CIF, a measured pattern or a ready image becomes what the model learnt from.

For a 1-D model (``model.kind: cnn1d``) the input is the pattern on its fine grid instead of an image:
a CIF's peak list from the batch simulator rendered as the evaluate stage renders the COD test
structures (:mod:`xrdvision.models.score_patterns`), a measured scan through the same preprocessing as
for images but onto the model's grid, zero where it was not measured (as the range cuts in training),
then scaled as in training; an image is refused in one line (such a model reads patterns).

Every input goes through the training code itself: a CIF through
:func:`xrdvision.data.simulate.simulate_file` and the same :class:`~xrdvision.data.render.Renderer`
settings as the render stage (so a CIF from the training set gives exactly its training image); a
measured pattern through :mod:`xrdvision.formats.scans` (reading) and :mod:`xrdvision.serve.preprocess`
(wavelength, background, normalisation, training grid) and the same renderer; a ready image is taken as
it is. :func:`error_line` is how a file that failed is reported: one line naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xrdvision.config import Params
from xrdvision.errors import InputError, XrdVisionError, one_line
from xrdvision.formats.scans import PATTERN_SUFFIXES, VENDOR_FORMATS, read_pattern
from xrdvision.serve.preprocess import to_training_grid

CIF_SUFFIXES = (".cif",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def input_kind(path: str | Path) -> str:
    """``cif``, ``pattern`` or ``image`` from the file name; anything else is an :class:`InputError`."""
    if Path(path).is_dir():
        raise InputError(path, "is a folder; pass the files in it (e.g. folder/*.xy)")
    suffix = Path(path).suffix.lower()
    if suffix in VENDOR_FORMATS:
        raise InputError(path, f"{VENDOR_FORMATS[suffix]}; export the pattern as two-column text (.xy)")
    if suffix in CIF_SUFFIXES:
        return "cif"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in PATTERN_SUFFIXES:
        return "pattern"
    raise InputError(
        path,
        f"unknown file type '{suffix or 'no extension'}' (expected a CIF, a two-column pattern "
        f"{'/'.join(PATTERN_SUFFIXES)} or an image {'/'.join(IMAGE_SUFFIXES)})",
    )


@dataclass
class Prepared:
    """One input as the model's image, with what we learnt on the way."""

    image: np.ndarray  # the model's input: an image (size, size, 3) in 0-255, or a pattern (points, 1)
    kind: str
    reference: dict[str, str] = field(default_factory=dict)  # a CIF's own labels (spglib)
    notes: list[str] = field(default_factory=list)


class Preparer:
    """Turns files into model images with the training settings (one renderer per instance)."""

    def __init__(self, params: Params, image_size: int | None = None, model_kind: str | None = None) -> None:
        from xrdvision.crystal.profile import grid
        from xrdvision.data.render import Renderer

        sim = params.simulate
        self.params = params
        self.kind = model_kind or params.model.kind
        if self.kind == "cnn1d":
            from xrdvision.data.measurement import grid as pattern_grid

            self.pattern_grid = pattern_grid(params.pattern)
            if image_size is not None and image_size != self.pattern_grid.size:
                g = params.pattern
                raise XrdVisionError(
                    f"pattern grid {g.two_theta_min:g}-{g.two_theta_max:g} deg at {g.step:g} deg has "
                    f"{self.pattern_grid.size} points, but the model takes {image_size}"
                )
            return
        self.size = int(image_size or params.render.size)
        if self.size != params.render.size:
            raise XrdVisionError(
                f"params: render.size: {params.render.size} px, but the model takes {self.size} px images"
            )
        self.grid = grid(sim.two_theta_min, sim.two_theta_max, sim.step)
        self.renderer = Renderer(
            params.render.size, params.render.line_width, (sim.two_theta_min, sim.two_theta_max)
        )

    def cif(self, path: Path) -> Prepared:
        from xrdvision.data.simulate import simulate_file

        if self.kind == "cnn1d":
            return self._cif_pattern(path)
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout clean for --json / --csv
            record = simulate_file(path, self.params.simulate, self.params.labels)
        assert record.pattern is not None and record.labels is not None
        ref = {"crystal_system": record.labels.crystal_system, "space_group": str(record.labels.space_group)}
        return Prepared(self.renderer.render(self.grid, record.pattern), "cif", ref)

    def pattern(
        self, path: Path, wavelength: float | None = None, default_wavelength: float | None = None
    ) -> Prepared:
        pattern = read_pattern(path, wavelength)
        default = default_wavelength if default_wavelength is not None else self.params.measured.wavelength
        sim = self.params.simulate
        if self.kind == "cnn1d":  # the same preprocessing, onto the model's own grid
            g = self.params.pattern
            sim = dataclasses.replace(
                sim, two_theta_min=g.two_theta_min, two_theta_max=g.two_theta_max, step=g.step
            )
        y = to_training_grid(
            pattern, sim, default_wavelength=default, strip_ka2=self.params.measured.strip_kalpha2
        )
        wl = pattern.wavelength if pattern.wavelength is not None else default
        notes = [f"wavelength {wl:g} A ({pattern.wavelength_from or 'default'})", *pattern.notes]
        if self.kind == "cnn1d":
            from xrdvision.data.measurement import scale_intensity

            return Prepared(scale_intensity(y, self.params.pattern.scale)[:, None], "pattern", notes=notes)
        return Prepared(self.renderer.render(self.grid, y), "pattern", notes=notes)

    def _cif_pattern(self, path: Path) -> Prepared:
        """A CIF on the 1-D model's grid: its batch-simulated peak list, rendered noiselessly."""
        from xrdvision.data.cod_set import read_cod_entry
        from xrdvision.data.peak_table import powder_settings
        from xrdvision.models.score_patterns import clean_pattern

        entry = read_cod_entry(path, self.params.labels.symprec, self.params.labels.angle_tolerance)
        ref = {"crystal_system": entry["crystal_system"], "space_group": str(entry["space_group"])}
        x = clean_pattern(
            entry["record"], powder_settings(self.params), self.params, self.pattern_grid, str(path)
        )
        return Prepared(x, "cif", ref)

    def image(self, path: Path) -> Prepared:
        from xrdvision.models.features import load_image

        if self.kind == "cnn1d":
            raise InputError(path, "this model reads patterns, not images: pass a CIF or a measured scan")
        return Prepared(load_image(path, self.size), "image")

    def __call__(
        self, path: str | Path, wavelength: float | None = None, default_wavelength: float | None = None
    ) -> Prepared:
        path = Path(path)
        kind = input_kind(path)
        if kind != "pattern" and not path.is_file():
            raise InputError(path, "file not found")
        if kind == "cif":
            return self.cif(path)
        if kind == "image":
            return self.image(path)
        return self.pattern(path, wavelength, default_wavelength)


def error_line(path: Path, exc: BaseException) -> str:
    """One line naming the file: an InputError already does; an XrdVisionError gets the path prefixed
    where it lacks it; anything else is the path and :func:`~xrdvision.errors.one_line` (type and reason)."""
    if isinstance(exc, InputError):
        return str(exc)
    if isinstance(exc, XrdVisionError):
        text = " ".join(str(exc).split()) or type(exc).__name__
        return text if text.startswith(str(path)) else f"{path}: {text}"
    return f"{path}: {one_line(exc)}"[:300]
