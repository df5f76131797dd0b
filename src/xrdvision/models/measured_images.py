"""VGG16 front features of peak-list structures drawn as images: the image model on the Materials Project
(``data/peaklists``) and generated (``data/generated``) crystals.

Why: the image model learned from COD's training split alone, and the README's study shows that data,
not the recipe, is what limits it. Random PyXtal crystals (the removed ``synthesize`` stage) added
nothing; crystals drawn from statistics of real ones (the ``generate`` stage) train the peak-list peer to
68.6 % on real COD without a single real structure, against 58.2 % for real data. Those sources are peak
lists, not PNGs, so each structure is drawn here, once, the way the 1-D model draws it every epoch:

- one draw of measurement conditions per structure (:func:`xrdvision.data.measurement.measured_like`,
  its impurity partner drawn from the same table first, exactly as
  :func:`xrdvision.models.train_cnn1d.measured_batch` draws it) on the ``pattern:`` grid, in linear
  intensity (the network's sqrt scaling is the 1-D model's input, not the image's);
- drawn by the render stage's :class:`~xrdvision.data.render.Renderer` over ``simulate``'s 2-theta range,
  so an angle lands on the pixel column it has in the COD images these are trained beside, with the
  render stage's image-level augmentation (``augment.contrast`` / ``rotation``, off by default);
- through the training model's frozen front (``predict_on_batch``).

VGG16 runs at 4-7 images/s on two cores (10^4 structures: about 30 minutes), so :func:`shard_features`
caches the features per chunk of a shard (``data/features/chunks``), keyed by the shard's bytes, the
settings and the drawing code, each written to a temp file and renamed: a rerun, after an interrupt or
another change to the stage, computes only the chunks it lacks (:func:`prune_chunks` then removes those
no run uses any more).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from xrdvision.config import Params
from xrdvision.data import augment, measurement, render
from xrdvision.data.peak_table import SHARD_SOURCES, PeakTable, from_shard
from xrdvision.errors import InputError
from xrdvision.formats.atomic import atomic_path
from xrdvision.formats.peaklists import read_shard

log = logging.getLogger(__name__)

BATCH = 32  # images per VGG16 call
CHUNK = 250  # structures per cached file: ~1 minute of VGG16, the most an interrupt loses
CHUNK_DIR = "chunks"
_CODE = (
    measurement.__file__,
    render.__file__,
    augment.__file__,
    __file__,
)  # the code that makes a chunk's numbers
_CACHE_VERSION = 1
# The stage that writes each shard source, for the "no shards" message.
MAKER = {"mp": "peaklists (needs mp.folder)", "synth": "generate (needs generate.n_crystals > 0)"}


def renderer_for(params: Params) -> render.Renderer:
    """The render stage's drawing: ``render.size`` / ``line_width`` over ``simulate``'s 2-theta range."""
    s = params.simulate
    return render.Renderer(params.render.size, params.render.line_width, (s.two_theta_min, s.two_theta_max))


def features_of(
    front: Any,
    table: PeakTable,
    idx: np.ndarray,
    params: Params,
    rng: np.random.Generator | None,
    renderer: render.Renderer | None = None,
    on_batch: Callable[[int], Any] | None = None,
) -> np.ndarray:
    """VGG16 front features (float32) of structures ``idx`` drawn by
    :func:`xrdvision.data.measurement.draw_patterns`, ``BATCH`` at
    a time (``rng`` is consumed batch by batch, so the same seed gives the same images); drawn ones
    (``rng`` given) get the image-level augmentation too."""
    x = measurement.grid(params.pattern)
    renderer = renderer or renderer_for(params)
    idx = np.asarray(idx, dtype=np.int64)
    a = params.augment
    out = [np.zeros((0, *(int(d) for d in front.output.shape[1:])), np.float32)]
    for start in range(0, len(idx), BATCH):
        part = idx[start : start + BATCH]
        y = measurement.draw_patterns(table, part, params, x, rng)
        images = [renderer.render(x, row) for row in y]
        if rng is not None and (a.contrast > 0 or a.rotation > 0):
            images = [augment.augment_image(img, rng, a.contrast, a.rotation) for img in images]
        out.append(np.asarray(front.predict_on_batch(np.stack(images).astype(np.float32)), dtype=np.float32))
        if on_batch is not None:
            on_batch(len(part))
    return np.concatenate(out)


def table_features(front: Any, table: PeakTable, params: Params, clean: bool, seed: int) -> np.ndarray:
    """Features of every structure of ``table``: each under one draw of measurement conditions from a
    generator seeded by ``seed`` (training), or noiseless (``clean``: scoring). The learning-curve study
    trains and scores VGG16 on these."""
    quiet = not log.isEnabledFor(logging.INFO)
    with tqdm(total=len(table), desc="vgg16 features", unit="img", disable=quiet) as bar:
        rng = None if clean else np.random.default_rng(seed)
        return features_of(front, table, np.arange(len(table)), params, rng, on_batch=bar.update)


@dataclass
class ShardInput:
    """One peak-list shard to draw: its file, the sha256 of its bytes, its structures."""

    path: Path
    sha256: str
    table: PeakTable


def read_sources(sources: Sequence[str], folders: dict[str, Path] | None = None) -> list[ShardInput]:
    """Every shard of each shard source (``mp``, ``synth``) in name order, read and checked before any
    image is drawn: a missing or corrupt one is one :class:`InputError` line naming it."""
    folders = folders or {k: Path(v) for k, v in SHARD_SOURCES.items()}
    out = []
    for source in sources:
        folder = Path(folders[source])
        files = sorted(folder.glob(f"{source}-*.npz"))
        if not files:
            raise InputError(
                folder,
                f"no {source}-*.npz peak-list shards, but split.train_sources has {source}: "
                f"run `dvc repro` (stage {MAKER[source]})",
            )
        for path in files:
            shard = read_shard(path)
            if shard.source != source:
                raise InputError(path, f"a {shard.source!r} shard where {source!r} shards belong")
            out.append(
                ShardInput(path, hashlib.sha256(path.read_bytes()).hexdigest(), from_shard(shard, source))
            )
    return out


def settings_key(params: Params, cut_layer: str, weights_md5: str) -> str:
    """Digest of everything besides the shard that decides a chunk's numbers, the drawing code included."""
    p, s, r = params.pattern, params.simulate, params.render
    code = hashlib.sha256(b"".join(Path(f).read_bytes() for f in _CODE)).hexdigest()
    fields = {
        "version": _CACHE_VERSION,
        "seed": params.seed,
        "grid": [p.two_theta_min, p.two_theta_max, p.step],
        "conditions": dataclasses.asdict(params.conditions),
        "render": [r.size, r.line_width, s.two_theta_min, s.two_theta_max],
        "augment": [params.augment.contrast, params.augment.rotation],
        "front": [cut_layer, weights_md5],
        "chunk": CHUNK,
        "code": code,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _chunk_key(path: Path) -> str | None:
    """The key stored in a cached chunk (read without its features), or None if there is no such file."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["key"])
    except (OSError, ValueError, KeyError, EOFError, zlib.error) as exc:
        log.warning("features: %s: unreadable cached chunk (%s), computing it again", path, exc)
        return None


def _load_chunk(path: Path, n: int) -> np.ndarray | None:
    """A cached chunk's features, or None (with a warning line) if they cannot be read or miscount."""
    try:
        with np.load(path, allow_pickle=False) as z:
            feats = z["features"]
        if len(feats) == n:
            return feats
        reason = f"{len(feats)} rows, expected {n}"
    except (OSError, ValueError, KeyError, EOFError, zlib.error) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    log.warning("features: %s: cached chunk not usable (%s), computing it again", path, reason)
    return None


def shard_features(
    front: Any,
    params: Params,
    inputs: Sequence[ShardInput],
    cache_dir: Path,
    cut_layer: str,
    weights_md5: str,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Training rows of the shard structures (the layout :func:`xrdvision.models.features.run_features`
    writes: ``features``, ``image`` = ``<source>/<id>``, ``cod_id``, labels, ``copy`` 0) and a summary
    (structures per source, chunks computed and reused, the chunk files used)."""
    key = settings_key(params, cut_layer, weights_md5)
    plan = []  # (input, chunk index, structure indices, cache file, chunk key)
    for inp in inputs:
        for k in range(math.ceil(len(inp.table) / CHUNK)):
            idx = np.arange(k * CHUNK, min(len(inp.table), (k + 1) * CHUNK))
            ck = hashlib.sha256(f"{key}:{inp.sha256}:{k}".encode()).hexdigest()
            plan.append((inp, k, idx, Path(cache_dir) / f"{inp.path.stem}-{k:04d}-{ck[:16]}.npz", ck))
    # Keys only here: loading every cached chunk before computing would hold them all twice in memory.
    cached = {c[3]: _chunk_key(c[3]) == c[4] for c in plan}
    n_total = sum(len(c[2]) for c in plan)
    n_cached = sum(len(c[2]) for c in plan if cached[c[3]])
    log.info(
        "features: %d drawn training structures in %d chunks, %d cached; %d to compute (4-7 images/s)",
        n_total,
        len(plan),
        n_cached,
        n_total - n_cached,
    )
    renderer = renderer_for(params)
    quiet = not log.isEnabledFor(logging.INFO)
    feats = [np.zeros((0, *(int(d) for d in front.output.shape[1:])), np.float32)]
    with tqdm(total=n_total, initial=n_cached, desc="features drawn", unit="img", disable=quiet) as bar:
        for inp, k, idx, path, ck in plan:
            got = _load_chunk(path, len(idx)) if cached[path] else None
            if got is None:
                cached[path] = False
                rng = np.random.default_rng([params.seed, zlib.crc32(inp.path.name.encode()), k])
                got = features_of(front, inp.table, idx, params, rng, renderer, on_batch=bar.update)
                with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                    np.savez(fh, features=got, key=np.array(ck))
            feats.append(got)
    tables = [inp.table.subset(idx) for inp, _, idx, _, _ in plan]

    def cat(field: Callable[[PeakTable], np.ndarray]) -> np.ndarray:
        return np.concatenate([field(t) for t in tables]) if tables else np.zeros(0, str)

    rows = {
        "features": np.concatenate(feats),
        "image": cat(lambda t: np.char.add(np.char.add(t.source, "/"), t.ids)),
        "cod_id": cat(lambda t: t.ids),
        "crystal_system": cat(lambda t: t.crystal_system),
        "space_group": cat(lambda t: t.space_group.astype(str)),
        "copy": np.zeros(n_total, np.int32),
    }
    per_source: dict[str, int] = {}
    for t in tables:
        for s in np.unique(t.source).tolist():
            per_source[s] = per_source.get(s, 0) + int((t.source == s).sum())
    summary = {
        "per_source": per_source,
        "chunks_computed": sum(1 for c in plan if not cached[c[3]]),
        "chunks_reused": sum(1 for c in plan if cached[c[3]]),
        "chunk_files": [c[3].name for c in plan],
    }
    return rows, summary


def prune_chunks(cache_dir: Path, keep: Sequence[str]) -> int:
    """Remove the files of ``cache_dir`` not in ``keep`` (chunks of older settings or shards, temp files
    a killed run left); returns how many."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return 0
    stale = [p for p in cache_dir.iterdir() if p.is_file() and p.name not in set(keep)]
    for p in stale:
        p.unlink()
    if not any(cache_dir.iterdir()):
        cache_dir.rmdir()
    if stale:
        log.info("features: removed %d cached chunk file(s) no longer used", len(stale))
    return len(stale)
