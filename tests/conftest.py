"""Shared fixtures: paths to the real data beside the checkout (``../shared``) and a temp params file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("XRDVISION_SHARED", ROOT.parent / "shared"))
COD_DIR = SHARED / "cod"
BAD_DIR = COD_DIR / "bad"
EXPERIMENTAL_DIR = SHARED / "experimental"
WEIGHTS = SHARED / "weights" / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
EMBEDDED_DIR = ROOT / "data" / "embedded"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def cod_dir() -> Path:
    """The 852 real COD CIFs (``../shared/cod``)."""
    assert COD_DIR.is_dir(), f"{COD_DIR} missing: tests need ../shared beside the checkout"
    return COD_DIR


@pytest.fixture(scope="session")
def bad_dir() -> Path:
    """20 real CIFs that pymatgen rejects."""
    assert BAD_DIR.is_dir(), f"{BAD_DIR} missing"
    return BAD_DIR
