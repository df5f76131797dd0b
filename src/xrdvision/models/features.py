"""The ``features`` stage: run the frozen part of VGG16 once per image and cache its output.

The frozen layers see the same images every epoch, so computing them once turns each epoch from a
full VGG16 forward+backward pass into a pass through the trainable tail only (the speed-up is
measured by ``benchmarks/bench_train.py``). The cache is a DVC output keyed by the images, the split
and ``model.trainable_conv``: change the frozen depth and DVC recomputes it.

The Materials Project and generated crystals of ``split.train_sources`` have no images: they join the
training features drawn from their peak lists by :mod:`xrdvision.models.measured_images` (the 1-D
model's generator, one draw per structure), whose per-chunk cache makes this stage resumable.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xrdvision.config import Params
from xrdvision.errors import InputError, XrdVisionError
from xrdvision.formats.atomic import atomic_path, write_json
from xrdvision.formats.tables import read_split

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def load_image(path: Path, size: int = 224) -> np.ndarray:
    """An RGB image as float32 (size, size, 3) in 0-255; a corrupt or wrong-size file is an InputError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise InputError(path, "image not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InputError(path, f"corrupt image ({exc})") from None
    if rgb.size != (size, size):
        raise InputError(path, f"image is {rgb.size[0]}x{rgb.size[1]}, expected {size}x{size}")
    return np.asarray(rgb, dtype=np.float32)


def compute_features(
    front, image_paths: list[Path], batch_size: int = 16, desc: str = "features"
) -> tuple[np.ndarray, list[int], list[str]]:
    """Run ``front`` over the images in batches.

    Returns (features of the readable images, their indices, one-line problems for the rest): a
    corrupt image is reported and skipped, the batch goes on.
    """
    shape = tuple(int(d) for d in front.output.shape[1:])
    out = np.empty((len(image_paths), *shape), dtype=np.float32)
    kept: list[int] = []
    problems: list[str] = []
    size = int(front.input.shape[1])
    quiet = not log.isEnabledFor(logging.INFO)  # the CLI's --quiet hides progress bars too
    with tqdm(total=len(image_paths), desc=desc, unit="img", disable=quiet) as bar:
        for start in range(0, len(image_paths), batch_size):
            batch, idx = [], []
            for i in range(start, min(start + batch_size, len(image_paths))):
                try:
                    batch.append(load_image(image_paths[i], size))
                    idx.append(i)
                except InputError as exc:
                    problems.append(str(exc))
            if batch:
                # predict_on_batch runs the compiled graph: the same numbers as an eager call, ~25 %
                # faster on a 2-core CPU (4.9 vs 3.9 images/s, block5_pool cut).
                out[len(kept) : len(kept) + len(batch)] = front.predict_on_batch(np.stack(batch))
                kept.extend(idx)
            bar.update(min(batch_size, len(image_paths) - start))
    return out[: len(kept)], kept, problems


def run_features(
    params: Params, split_dir: Path, image_dir: Path, out_dir: Path, shard_dirs: dict[str, Path] | None = None
) -> dict:
    """Compute and write ``out_dir/{train,val,test}.npz`` (features + labels + image names).

    COD's images come from ``image_dir`` (training ones only when ``split.train_sources`` has ``cod``).
    The peak-list sources of ``split.train_sources`` (``mp``: ``data/peaklists``, ``synth``:
    ``data/generated``; ``shard_dirs`` overrides) join the *train* split only, each structure drawn once
    under measurement conditions (:mod:`xrdvision.models.measured_images`, cached per chunk in
    ``out_dir/chunks``) and named ``<source>/<id>``; validation and test are COD's split lists.
    """
    from xrdvision.models.measured_images import CHUNK_DIR, prune_chunks, read_sources, shard_features
    from xrdvision.models.vgg16 import build_model, resolve_weights, weights_fingerprint

    chunk_dir = Path(out_dir) / CHUNK_DIR
    if params.model.kind != "vgg16":  # a 1-D model draws its inputs from peak lists: nothing to cache
        for stale in Path(out_dir).glob("*.npz"):
            stale.unlink()
        prune_chunks(chunk_dir, [])
        summary = {"skipped_stage": f"model.kind={params.model.kind} reads no image features", "splits": {}}
        write_json(Path(out_dir) / "summary.json", summary | {"skipped": [], "drawn_train_images": {}})
        return summary | {"cut_layer": "none", "skipped": [], "drawn_train_images": {}}
    sources = params.split.train_sources
    lists = {s: read_split(Path(split_dir) / f"{s}.csv") for s in SPLITS}
    for s, rows in lists.items():
        if not rows and (s != "train" or "cod" in sources):
            raise XrdVisionError(f"{Path(split_dir) / f'{s}.csv'}: the {s} split is empty")
    if "cod" not in sources:
        lists["train"] = []
    # Every shard read and checked before VGG16 starts: a missing or corrupt one costs a second, not an hour.
    inputs = read_sources([s for s in sources if s != "cod"], shard_dirs)
    weights = resolve_weights(params.model.weights)
    # The front does not depend on the number of classes; 7 is a placeholder for the head.
    net = build_model(7, params.model, weights=weights, seed=params.seed)
    fingerprint = weights_fingerprint(weights)
    drawn, drawn_summary = shard_features(net.front, params, inputs, chunk_dir, net.cut_layer, fingerprint)
    summary: dict = {
        "cut_layer": net.cut_layer,
        "weights_md5": fingerprint,
        "splits": {},
        "skipped": [],
        "drawn_train_images": drawn_summary["per_source"],
        "drawn_chunks": {k: drawn_summary[k] for k in ("chunks_computed", "chunks_reused")},
    }
    for s, rows in lists.items():
        paths = [Path(image_dir) / r["image"] for r in rows]
        feats, kept, problems = compute_features(net.front, paths, desc=f"features {s}")
        for line in problems:
            log.warning("features: skipped: %s", line)
        summary["skipped"].extend(problems)
        rows_k = [rows[i] for i in kept]
        cols = {
            "features": feats,
            "image": np.array([r["image"] for r in rows_k], dtype=str),
            "cod_id": np.array([r["cod_id"] for r in rows_k], dtype=str),
            "crystal_system": np.array([r["crystal_system"] for r in rows_k], dtype=str),
            "space_group": np.array([r["space_group"] for r in rows_k], dtype=str),
            "copy": np.array([_copy_of(r) for r in rows_k], dtype=np.int32),
        }
        if s == "train":
            cols = {k: np.concatenate([v, drawn[k]]) for k, v in cols.items()}  # str widths: the wider
        if not len(cols["features"]):
            raise XrdVisionError(f"{Path(split_dir) / f'{s}.csv'}: no readable images in the {s} split")
        with atomic_path(Path(out_dir) / f"{s}.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **cols, cut_layer=np.array(net.cut_layer), weights_md5=np.array(fingerprint))
        summary["splits"][s] = {"n_images": len(cols["features"]), "shape": list(feats.shape[1:])}
    prune_chunks(chunk_dir, drawn_summary["chunk_files"])
    write_json(Path(out_dir) / "summary.json", summary)
    return summary


def _copy_of(row: dict[str, str]) -> int:
    """The augmentation copy index of a split row (0 = unaugmented), from its column or file name."""
    if row.get("copy", "") != "":
        return int(row["copy"])
    stem = Path(row["image"]).stem
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def load_features(path: Path) -> dict[str, np.ndarray]:
    """Read a features file written by :func:`run_features`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise XrdVisionError(f"{path}: features not found (run `dvc repro features` first)") from None
    except (OSError, ValueError) as exc:
        raise XrdVisionError(f"{path}: corrupt features file ({exc})") from None
