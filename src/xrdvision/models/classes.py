"""Class indices, class weights and class coverage: what both model kinds' training needs of the labels.

One home for them, below the training modules of either kind (the VGG16 tail in
:mod:`xrdvision.models.train`, the 1-D model in :mod:`xrdvision.models.train_cnn1d`), so neither has to
import the other for them.
"""

from __future__ import annotations

import numpy as np

from xrdvision.errors import XrdVisionError


def encode_labels(values: np.ndarray, classes: list[str], where: str) -> np.ndarray:
    """Class indices for label strings; an unknown label is an error naming the file."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise XrdVisionError(f"{where}: labels not among the classes: {', '.join(unknown[:5])}")
    return np.array([index[str(v)] for v in values], dtype=np.int64)


def check_class_coverage(
    train_y: np.ndarray, other: dict[str, np.ndarray], classes: list[str], mode: str
) -> list[str]:
    """Classes that appear in validation/test but never in training cannot be learned.

    For crystal systems (7 classes, all common) that means the data or split is wrong: an error. For
    space groups (230 classes, most rare) it is expected on small data: returned as warnings.
    """
    seen = set(train_y.tolist())
    warnings = []
    for split, y in other.items():
        missing = sorted({classes[i] for i in set(y.tolist()) - seen})
        if missing:
            msg = f"{split} split has classes with no training images: {', '.join(missing[:10])}"
            if mode == "crystal_system":
                raise XrdVisionError(f"data/split/train.csv: {msg}")
            warnings.append(msg + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    return warnings


def class_weight_map(y: np.ndarray) -> dict[int, float]:
    """scikit-learn's 'balanced' weights n / (k * count) for the k classes present (cubic vs triclinic)."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(y)
    weights = compute_class_weight("balanced", classes=present, y=y)
    return {int(c): float(w) for c, w in zip(present, weights, strict=True)}
