"""The VGG16 transfer-learning model, split at the first trainable layer.

The seed recipe trains only VGG16's last conv block and a small head; everything below is frozen and
sees the same images every epoch. We therefore build the network as three parts that share layer
objects (and so weights):

- ``front``: the frozen VGG16 layers (with VGG16's own preprocessing), run once per image by the
  ``features`` stage, whose outputs are cached;
- ``tail``: the trainable conv layers + GlobalAveragePooling2D + Dense ReLU + dropout + softmax,
  trained on the cached tensors;
- ``full``: front and tail chained, taking raw 0-255 RGB images; this is what is saved, logged to
  MLflow and used for prediction.

Because the parts share layers, training ``tail`` updates ``full`` in place, and the cached path and
the end-to-end model give the same predictions (tested).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from xrdvision.config import ModelParams
from xrdvision.errors import XrdVisionError, one_line
from xrdvision.formats.atomic import file_digest

WEIGHTS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
WEIGHTS_ENV = "XRDVISION_VGG16_WEIGHTS"
# Keras' own source for the file, and the md5 Keras checks it against.
KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + WEIGHTS_FILE
KERAS_WEIGHTS_MD5 = "6d6bbae143d832006294945121d1f1fc"
IMAGE_SIZE = 224
# ImageNet channel means in BGR order, as keras.applications.vgg16.preprocess_input ("caffe" mode).
_BGR_MEAN = (103.939, 116.779, 123.68)


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def _keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


def weight_candidates(explicit: str = "") -> list[tuple[str, Path]]:
    """Where the weights are looked for, in order: (description, path)."""
    out: list[tuple[str, Path]] = []
    env = os.environ.get(WEIGHTS_ENV, "")
    if env:
        out.append((f"${WEIGHTS_ENV}", Path(env)))
    if explicit:
        out.append(("params model.weights", Path(explicit)))
    out.append(
        (
            "../shared beside the checkout",
            _repo_root().parent / "shared" / "weights" / "models" / WEIGHTS_FILE,
        )
    )
    out.append(("Keras cache", _keras_cache_dir() / "models" / WEIGHTS_FILE))
    return out


def download_weights(
    url: str = KERAS_WEIGHTS_URL, md5: str = KERAS_WEIGHTS_MD5, cache_dir: Path | None = None
) -> Path:
    """Keras' own download (with its hash check) into the Keras cache; returns the local path."""
    import keras

    try:
        path = keras.utils.get_file(
            WEIGHTS_FILE,
            origin=url,
            file_hash=md5,
            hash_algorithm="md5",
            cache_subdir="models",
            cache_dir=str(cache_dir) if cache_dir is not None else None,
        )
    except Exception as exc:  # Keras raises plain Exception subclasses for network/hash failures
        raise XrdVisionError(f"{url}: VGG16 weights download failed ({one_line(exc)})") from None
    return Path(path)


def resolve_weights(explicit: str = "", *, allow_download: bool = True) -> Path:
    """Find the VGG16 ImageNet "notop" weights file, or explain where we looked.

    An explicit path (environment variable or param) that does not exist is an error rather than a
    reason to look elsewhere: the user asked for that file. Otherwise: ``../shared/weights`` beside the
    checkout, then Keras' cache, then Keras' download (the natural source on a machine online).
    """
    explicit_env = os.environ.get(WEIGHTS_ENV, "")
    for desc, path in weight_candidates(explicit):
        if path.is_file():
            return path
        if desc.startswith("$") or desc.startswith("params"):
            who = WEIGHTS_ENV if desc.startswith("$") else "model.weights"
            raise XrdVisionError(f"{path}: VGG16 weights file not found (set by {who})")
    if explicit_env:  # unreachable: handled above; kept for clarity of the order
        raise XrdVisionError(f"{explicit_env}: VGG16 weights file not found")
    if allow_download:
        try:
            return download_weights()
        except XrdVisionError as exc:
            looked = "; ".join(str(p) for _, p in weight_candidates(explicit))
            raise XrdVisionError(
                f"VGG16 weights not found (looked in: {looked}) and {exc}. Put {WEIGHTS_FILE} in one of "
                f"those places or set {WEIGHTS_ENV}=/path/to/it"
            ) from None
    looked = "; ".join(str(p) for _, p in weight_candidates(explicit))
    raise XrdVisionError(f"VGG16 weights not found (looked in: {looked}); set {WEIGHTS_ENV}=/path/to/it")


def weights_fingerprint(path: Path) -> str:
    """md5 of the weights file (logged with each run, so a result names the weights it used)."""
    return file_digest(path, "md5")


def vgg_preprocess_layer():
    """VGG16's ``preprocess_input`` as a frozen standard layer: RGB 0-255 -> BGR minus ImageNet means.

    The channel flip and mean subtraction are one affine map on the last axis, so a ``Dense(3)`` with a
    permutation kernel and the negated means as bias does it exactly (0/1 weights add no rounding).
    A standard layer rather than a custom one so that the saved model needs no xrdvision code to load:
    ``mlflow models serve`` and plain ``keras.models.load_model`` take it as it is.
    """
    import keras
    import numpy as np

    layer = keras.layers.Dense(3, trainable=False, name="vgg_preprocess")
    layer.build((None, 3))
    flip = np.eye(3, dtype="float32")[::-1]  # out[c] = in[2 - c]: RGB -> BGR
    layer.set_weights([flip, -np.asarray(_BGR_MEAN, dtype="float32")])
    return layer


@dataclass
class SplitModel:
    """The three views of one network (see module docstring)."""

    front: object  # keras.Model: raw RGB image -> cached tensor
    tail: object  # keras.Model: cached tensor -> class probabilities
    full: object  # keras.Model: raw RGB image -> class probabilities
    cut_layer: str  # name of the last frozen layer (its output is what is cached)


def cut_layer_name(trainable_conv: int) -> str:
    """The last frozen layer for ``trainable_conv`` trainable conv layers (counted from the top).

    With 0 the whole conv base is frozen and the cache holds ``block5_pool``; with 3 (the seed's "last
    block") it holds ``block4_pool``.
    """
    import keras

    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return _cut_layer(base, trainable_conv)


def _cut_layer(base, trainable_conv: int) -> str:
    convs = [layer.name for layer in base.layers if layer.name.endswith(("conv1", "conv2", "conv3"))]
    if not 0 <= trainable_conv <= len(convs):
        raise XrdVisionError(f"params: model.trainable_conv: must be in [0, {len(convs)}]")
    if trainable_conv == 0:
        return base.layers[-1].name
    first_trainable = convs[len(convs) - trainable_conv]
    names = [layer.name for layer in base.layers]
    return names[names.index(first_trainable) - 1]


def build_model(
    n_classes: int,
    params: ModelParams,
    *,
    weights: str | Path | None = "resolve",
    seed: int = 42,
    image_size: int = IMAGE_SIZE,
) -> SplitModel:
    """Build front/tail/full sharing VGG16's layers.

    ``weights="resolve"`` finds the ImageNet file (:func:`resolve_weights`); ``None`` gives random
    weights (only for tests of shapes); a path loads that file.
    """
    import keras

    keras.utils.set_random_seed(seed)
    if isinstance(weights, str) and weights == "resolve":
        weights = resolve_weights(params.weights)
    try:
        base = keras.applications.VGG16(
            weights=str(weights) if weights is not None else None,
            include_top=False,
            input_shape=(image_size, image_size, 3),
        )
    except (OSError, ValueError) as exc:
        raise XrdVisionError(f"{weights}: cannot load VGG16 weights ({one_line(exc)})") from None
    cut = _cut_layer(base, params.trainable_conv)
    names = [layer.name for layer in base.layers]
    cut_index = names.index(cut)

    image = keras.Input((image_size, image_size, 3), name="image")
    x = vgg_preprocess_layer()(image)
    for layer in base.layers[1 : cut_index + 1]:
        layer.trainable = False
        x = layer(x)
    front = keras.Model(image, x, name="vgg16_front")

    cached = keras.Input(tuple(x.shape[1:]), name="features")
    y = cached
    for layer in base.layers[cut_index + 1 :]:
        layer.trainable = True
        y = layer(y)
    y = keras.layers.GlobalAveragePooling2D(name="gap")(y)
    for i, width in enumerate(params.dense):
        y = keras.layers.Dense(width, activation="relu", name=f"dense_{i}")(y)
        if params.dropout > 0:
            y = keras.layers.Dropout(params.dropout, seed=seed + i, name=f"dropout_{i}")(y)
    probs = keras.layers.Dense(n_classes, activation="softmax", name="probabilities")(y)
    tail = keras.Model(cached, probs, name="head")

    full = keras.Model(image, tail(front(image)), name="xrdvision_vgg16")
    return SplitModel(front=front, tail=tail, full=full, cut_layer=cut)


def compile_tail(tail, learning_rate: float, top_k: int = 3) -> None:
    """Adam + categorical cross-entropy, with accuracy and top-k accuracy (the seed's recipe)."""
    import keras

    tail.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="categorical_crossentropy",
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(k=top_k, name=f"top{top_k}_accuracy"),
        ],
    )


def load_full_model(path: str | Path):
    """Load a saved full model (``.keras``), registering our custom layer first."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise XrdVisionError(f"{path}: model file not found (run `dvc repro train` first)")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # corrupt/truncated archive: Keras raises various types
        raise XrdVisionError(f"{path}: cannot load model ({one_line(exc)})") from None
