"""Tiny synthetic "pattern" images and split lists for train / tune / registry tests.

A white peak whose position depends on the class, over a baseline: learnable in a few epochs from
cached VGG16 features, so tests of training, tuning and promotion take seconds. Real CIFs go through
the pipeline in test_pipeline_dvc.py and test_predict.py.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xrdvision.config import Params, parse_params

CLASSES = ("cubic", "hexagonal", "monoclinic")
SG = {"cubic": "225", "hexagonal": "194", "monoclinic": "14"}


def peak_image(cls_index: int, jitter: int) -> np.ndarray:
    """224x224 RGB: a 3-pixel peak at ``30 + 70 * cls_index + jitter``, and a baseline."""
    img = np.zeros((224, 224, 3), np.uint8)
    x = 30 + 70 * cls_index + jitter
    img[40:, x : x + 3] = 255  # a peak
    img[215:217, :] = 255  # the baseline
    return img


def write_split_lists(split_dir: Path, rows: dict[str, list[dict[str, Any]]]) -> None:
    """``split_dir/<split>.csv`` for each split, in the split stage's format (docs/dataflow.md)."""
    split_dir.mkdir(parents=True)
    for split, rs in rows.items():
        with open(split_dir / f"{split}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rs[0]))
            w.writeheader()
            w.writerows(rs)


def make_split_data(root: Path, n: dict[str, int] | None = None) -> None:
    """``root/data/images/*.png`` and ``root/data/split/{train,val,test}.csv``: ``n`` images per class
    and split (default 6 / 2 / 3), one structure (group) per image."""
    n = n or {"train": 6, "val": 2, "test": 3}
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in n}
    images = root / "data" / "images"
    images.mkdir(parents=True)
    k = 0
    for split, count in n.items():
        for ci, cls in enumerate(CLASSES):
            for j in range(count):
                name = f"{k}_0.png"
                Image.fromarray(peak_image(ci, (j * 5) % 20)).save(images / name)
                rows[split].append(
                    {
                        "image": name,
                        "cod_id": str(k),
                        "group": str(k),
                        "copy": 0,
                        "crystal_system": cls,
                        "space_group": SG[cls],
                    }
                )
                k += 1
    write_split_lists(root / "data" / "split", rows)


def tiny_params(root: Path, dense: int = 32, **over: dict[str, Any]) -> Params:
    """Params for a head-only model on the tiny data, tracked in ``root/mlruns`` (sqlite)."""
    data: dict[str, dict[str, Any]] = {
        "mlflow": {"tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db", "experiment": "test"},
        "model": {"trainable_conv": 0, "dense": [dense], "dropout": 0.0},
        "train": {"epochs": 12, "batch_size": 6, "learning_rate": 0.003, "patience": 4},
    }
    for k, v in over.items():
        data.setdefault(k, {}).update(v)
    return parse_params(data)


def tune_params(root: Path, **over: dict[str, Any]) -> Params:
    """:func:`tiny_params` plus a 3-trial head-only study stored in ``root/optuna`` (sqlite)."""
    tune = {
        "trials": 3,
        "epochs": 4,
        "max_trainable_conv": 0,
        "storage": f"sqlite:///{root}/optuna/optuna.db",
        "study_name": "tiny",
        **over.pop("tune", {}),
    }
    return tiny_params(root, dense=64, tune=tune, **over)
