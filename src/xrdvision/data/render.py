"""Patterns -> 224x224 images: a black background with the diffractogram as a white line.

Creating and closing a matplotlib figure per image (``plt.figure`` ... ``savefig`` ... ``plt.close``)
costs most of the time in figure set-up, text/tick layout and PNG encoding through matplotlib. A
:class:`Renderer` builds ONE figure per process with fixed limits, draws the empty background once,
and per image only swaps the line's data, restores the background and draws that one artist
(matplotlib's blitting recipe), then writes the RGB buffer as a PNG (:func:`encode_png`). Fixed
limits also mean a given 2-theta always lands on the same pixel column, so the CNN sees positions
consistently.

:func:`run_render` turns ``data/patterns/patterns.npz`` into ``data/images/<cod_id>_<k>.png`` (copy 0
as simulated, copies 1..``augment.copies`` augmented) and ``data/images/index.csv``, in parallel and
resumably (see :func:`run_render`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import multiprocessing
import re
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from xrdvision.config import Params
from xrdvision.data.augment import augment_image, augment_pattern, copy_rng
from xrdvision.formats.atomic import atomic_open, atomic_path, file_digest
from xrdvision.formats.patterns import Patterns, load_patterns

log = logging.getLogger(__name__)

# 72 dots per inch makes one point one pixel, so ``render.line_width`` reads as pixels.
_DPI = 72
_YMAX = 1.05  # headroom above the tallest peak (max 1) so its tip is not clipped
STATE_FILE = ".render_state.json"
INDEX_FILE = "index.csv"
# Bump when the drawing itself changes, so a resumed run never mixes images from two versions.
RENDER_VERSION = 1
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Renderer:
    """One reusable Agg figure: ``render`` returns an image array, ``save`` writes a PNG.

    The axes fill the whole figure with the axis off and no margins; x limits are ``two_theta_range``
    and y limits ``(0, 1.05)`` for every image, so the pixel column of an angle never depends on the
    data. ``line_width`` is in pixels (the figure is at 72 dpi). Not thread-safe: one per process.
    """

    def __init__(
        self, size: int = 224, line_width: float = 1.0, two_theta_range: tuple[float, float] = (5.0, 90.0)
    ) -> None:
        self.size = int(size)
        self.two_theta_range = (float(two_theta_range[0]), float(two_theta_range[1]))
        self._fig = Figure(figsize=(self.size / _DPI, self.size / _DPI), dpi=_DPI, facecolor="black")
        self._canvas = FigureCanvasAgg(self._fig)
        ax = self._fig.add_axes((0.0, 0.0, 1.0, 1.0))
        ax.set_axis_off()
        ax.set_facecolor("black")
        ax.set_xlim(*self.two_theta_range)
        ax.set_ylim(0.0, _YMAX)
        ax.margins(0)
        self._ax = ax
        # animated=True keeps the line out of canvas.draw(): the saved background is truly empty.
        (self._line,) = ax.plot([], [], color="white", linewidth=line_width, animated=True)
        self._canvas.draw()
        self._background = self._canvas.copy_from_bbox(self._fig.bbox)
        width, height = self._canvas.get_width_height(physical=True)
        if (width, height) != (self.size, self.size):  # a matplotlib rounding change would show here
            raise RuntimeError(f"renderer canvas is {width}x{height}, expected {self.size}x{self.size}")

    def render(self, two_theta: np.ndarray, intensity: np.ndarray) -> np.ndarray:
        """The pattern as a ``(size, size, 3)`` uint8 array (row 0 at the top).

        Intensities are drawn as given (patterns are stored with a maximum of 1); NaNs leave gaps.
        An all-zero pattern is a flat line on the bottom edge; an empty one a black image.
        """
        x = np.asarray(two_theta, dtype=np.float64)
        y = np.asarray(intensity, dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"two_theta {x.shape} and intensity {y.shape} differ in shape")
        self._line.set_data(x, y)
        self._canvas.restore_region(self._background)
        self._ax.draw_artist(self._line)
        rgba = np.asarray(self._canvas.buffer_rgba())
        rgb = np.empty((self.size, self.size, 3), dtype=np.uint8)
        for c in range(3):  # channel by channel: 5x faster than the strided rgba[:, :, :3].copy()
            rgb[:, :, c] = rgba[:, :, c]
        return rgb

    def save(self, two_theta: np.ndarray, intensity: np.ndarray, path: str | Path) -> None:
        """Render and write an RGB PNG atomically (a killed run leaves no half-written image)."""
        data = encode_png(self.render(two_theta, intensity))
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(rgb: np.ndarray, level: int = 3) -> bytes:
    """A ``(h, w, 3)`` uint8 array as an 8-bit RGB PNG (no row filters, zlib ``level``).

    Why not Pillow: its encoder tries every PNG row filter on every row, which on these images costs
    0.8 ms, as much as drawing them; unfiltered rows compressed at level 3 take 0.3 ms and, the images
    being mostly black, come out only ~30 % larger (~5.5 kB). The files are plain PNG (signature, IHDR,
    one IDAT, IEND; PNG spec section 11) that Pillow, TensorFlow and Keras read as RGB.
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (h, w, 3) array, got {rgb.shape}")
    h, w, _ = rgb.shape
    raw = np.zeros((h, 1 + 3 * w), dtype=np.uint8)  # each row: filter byte 0 (None), then RGB bytes
    raw[:, 1:] = rgb.reshape(h, 3 * w)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 (RGB), no interlace
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), level)),
            _png_chunk(b"IEND", b""),
        )
    )


def image_name(cod_id: str, copy: int) -> str:
    """File name of copy ``copy`` of a structure: ``<cod_id>_<copy>.png``."""
    return f"{cod_id}_{copy}.png"


def render_state(params: Params, patterns_file: Path) -> dict[str, Any]:
    """Everything an image depends on: the patterns file's hash and every setting that shapes a pixel."""
    sim = params.simulate
    return {
        "version": RENDER_VERSION,
        "matplotlib": matplotlib.__version__,  # antialiasing may change between releases
        "patterns_sha256": file_digest(patterns_file),
        "seed": params.seed,
        "augment": dataclasses.asdict(params.augment),
        "render": {"size": params.render.size, "line_width": params.render.line_width},
        "simulate": {
            "wavelength": sim.wavelength,
            "kalpha2": sim.kalpha2,
            "two_theta_min": sim.two_theta_min,
            "two_theta_max": sim.two_theta_max,
            "eta": sim.eta,
        },
    }


def _prepare_out_dir(out_dir: Path, state: dict[str, Any]) -> bool:
    """Make ``out_dir`` hold only images of ``state``: keep them if the saved state matches, else clear.

    Returns True when earlier images are reused. The state file is written before any image, so a
    folder with images and no (or another) state is never trusted.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for tmp in out_dir.glob(".*.tmp"):  # temp files of a run killed mid-write
        tmp.unlink(missing_ok=True)
    state_path = out_dir / STATE_FILE
    try:
        old = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if old == state:
        return True
    state_path.unlink(missing_ok=True)
    (out_dir / INDEX_FILE).unlink(missing_ok=True)
    for png in out_dir.glob("*.png"):
        png.unlink()
    with atomic_open(state_path, "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=2)
    return False


# Per-process worker state: the patterns, the renderer and the settings (set by _init_worker).
_WORKER: dict[str, Any] = {}


def _init_worker(patterns_file: str, params: Params, out_dir: str) -> None:
    sim = params.simulate
    _WORKER["patterns"] = load_patterns(patterns_file)
    _WORKER["renderer"] = Renderer(
        params.render.size, params.render.line_width, (sim.two_theta_min, sim.two_theta_max)
    )
    _WORKER["params"] = params
    _WORKER["out_dir"] = Path(out_dir)


def _render_structure(i: int) -> tuple[int, list[tuple[str, str, int]], int, str]:
    """Draw every copy of structure ``i`` that is not on disk yet: ``(i, index rows, n drawn, error)``."""
    pats: Patterns = _WORKER["patterns"]
    renderer: Renderer = _WORKER["renderer"]
    params: Params = _WORKER["params"]
    out_dir: Path = _WORKER["out_dir"]
    cod_id = pats.ids[i]
    if not _SAFE_ID.match(cod_id):
        return i, [], 0, f"{cod_id!r}: id not usable as a file name"
    pattern = pats.intensity[i]
    tt, amp, d = pats.peaks(i)
    if not (np.all(np.isfinite(pattern)) and np.all(np.isfinite(tt)) and np.all(np.isfinite(amp))):
        return i, [], 0, f"{cod_id}: non-finite values in the pattern or peak list"
    rows, drawn = [], 0
    for copy in range(params.augment.copies + 1):
        name = image_name(cod_id, copy)
        rows.append((name, cod_id, copy))
        path = out_dir / name
        if path.exists():
            continue
        if copy == 0:
            renderer.save(pats.two_theta, pattern, path)
        else:
            rng = copy_rng(params.seed, cod_id, copy)
            g, y = augment_pattern(tt, amp, d, rng, params.augment, params.simulate)
            a = params.augment
            if a.contrast > 0 or a.rotation > 0:
                rgb = augment_image(renderer.render(g, y), rng, a.contrast, a.rotation)
                with atomic_path(path) as tmp:
                    tmp.write_bytes(encode_png(rgb))
            else:
                renderer.save(g, y, path)
        drawn += 1
    return i, rows, drawn, ""


def run_render(params: Params, patterns_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Render every structure of ``patterns_dir/patterns.npz`` into ``out_dir``; returns a summary.

    Writes ``<cod_id>_0.png`` (the stored pattern) and ``<cod_id>_<k>.png`` for k = 1..copies
    (:func:`~xrdvision.data.augment.augment_pattern` with the generator of ``(seed, cod_id, k)``, so a copy
    is the same whichever process draws it), then ``index.csv`` (image, cod_id, copy; image is the
    file name inside ``out_dir``) in patterns order.

    Resumable: ``.render_state.json`` records the patterns file's hash and every setting that affects a
    pixel. If it matches, images already present (from an interrupted run) are kept and not redrawn;
    if not, every old image is deleted first, so the folder never mixes two settings. Structures whose
    id is not a safe file name or whose data are not finite are skipped and listed in ``skipped``.
    """
    t0 = time.perf_counter()
    patterns_dir, out_dir = Path(patterns_dir), Path(out_dir)
    patterns_file = patterns_dir / "patterns.npz"
    pats = load_patterns(patterns_file)  # validate once in the parent: a bad file is one clear error
    state = render_state(params, patterns_file)
    resumed = _prepare_out_dir(out_dir, state)

    n = len(pats.ids)
    results: list[tuple[int, list[tuple[str, str, int]], int, str]] = []
    workers = min(params.render.workers, max(n, 1))
    quiet = not log.isEnabledFor(logging.INFO)  # the CLI's --quiet hides progress bars too
    progress = tqdm(total=n, desc="render", unit="structure", disable=quiet)
    try:
        if workers <= 1:
            _init_worker(str(patterns_file), params, str(out_dir))
            for i in range(n):
                results.append(_render_structure(i))
                progress.update()
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork of a parent that may hold TF threads
            chunk = max(1, min(16, n // (workers * 8)))
            with ctx.Pool(
                workers, initializer=_init_worker, initargs=(str(patterns_file), params, str(out_dir))
            ) as pool:
                for result in pool.imap_unordered(_render_structure, range(n), chunksize=chunk):
                    results.append(result)
                    progress.update()
    finally:
        progress.close()
        _WORKER.clear()

    results.sort(key=lambda r: r[0])
    rows = [row for r in results for row in r[1]]
    skipped = [r[3] for r in results if r[3]]
    for line in skipped:
        log.warning("render: skipped: %s", line)
    with atomic_open(out_dir / INDEX_FILE, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "cod_id", "copy"])
        writer.writerows(rows)
    return {
        "n_images": len(rows),
        "n_structures": n - len(skipped),
        "n_drawn": sum(r[2] for r in results),
        "resumed": resumed,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 3),
    }
