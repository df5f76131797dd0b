"""The ``features`` stage: run the frozen part of VGG16 once per image and cache its output.

The frozen layers see the same images every epoch, so computing them once turns each epoch from a
full VGG16 forward+backward pass into a pass through the trainable tail only (the speed-up is
measured by ``benchmarks/bench_train.py``). The cache is a DVC output keyed by the images, the split
and ``model.trainable_conv``: change the frozen depth and DVC recomputes it.
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
    params: Params, split_dir: Path, image_dir: Path, out_dir: Path, synth_dir: Path | None = None
) -> dict:
    """Compute and write ``out_dir/{train,val,test}.npz`` (features + labels + image names).

    ``synth_dir`` (the synthesize stage's output) adds its random-crystal images to the *train* split
    only, named ``synth/<file>``; validation and test are the real structures of the split lists.
    """
    from xrdvision.formats.tables import read_synth_train
    from xrdvision.models.vgg16 import build_model, resolve_weights, weights_fingerprint

    if params.model.kind != "vgg16":  # a 1-D model draws its inputs from peak lists: nothing to cache
        for stale in Path(out_dir).glob("*.npz"):
            stale.unlink()
        summary = {"skipped_stage": f"model.kind={params.model.kind} reads no image features", "splits": {}}
        write_json(Path(out_dir) / "summary.json", summary | {"skipped": [], "n_synthetic_train_images": 0})
        return summary | {"cut_layer": "none", "skipped": [], "n_synthetic_train_images": 0}
    lists = {s: read_split(Path(split_dir) / f"{s}.csv") for s in SPLITS}
    for s, rows in lists.items():
        if not rows:
            raise XrdVisionError(f"{Path(split_dir) / f'{s}.csv'}: the {s} split is empty")
    synth_rows = read_synth_train(Path(synth_dir)) if synth_dir is not None else []
    lists["train"] = lists["train"] + synth_rows
    weights = resolve_weights(params.model.weights)
    # The front does not depend on the number of classes; 7 is a placeholder for the head.
    net = build_model(7, params.model, weights=weights, seed=params.seed)
    fingerprint = weights_fingerprint(weights)
    summary: dict = {
        "cut_layer": net.cut_layer,
        "weights_md5": fingerprint,
        "splits": {},
        "skipped": [],
        "n_synthetic_train_images": len(synth_rows),
    }
    for s, rows in lists.items():
        paths = [Path(r["path"]) if r.get("path") else Path(image_dir) / r["image"] for r in rows]
        feats, kept, problems = compute_features(net.front, paths, desc=f"features {s}")
        for line in problems:
            log.warning("features: skipped: %s", line)
        summary["skipped"].extend(problems)
        if not kept:
            raise XrdVisionError(f"{Path(split_dir) / f'{s}.csv'}: no readable images in the {s} split")
        rows_k = [rows[i] for i in kept]
        with atomic_path(Path(out_dir) / f"{s}.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                features=feats,
                image=np.array([r["image"] for r in rows_k]),
                cod_id=np.array([r["cod_id"] for r in rows_k]),
                crystal_system=np.array([r["crystal_system"] for r in rows_k]),
                space_group=np.array([r["space_group"] for r in rows_k]),
                copy=np.array([_copy_of(r) for r in rows_k], dtype=np.int32),
                cut_layer=np.array(net.cut_layer),
                weights_md5=np.array(fingerprint),
            )
        summary["splits"][s] = {"n_images": len(kept), "shape": list(feats.shape[1:])}
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
