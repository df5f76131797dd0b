"""The 1-D pattern model (``model.kind: cnn1d``): a residual 1-D CNN on the full-resolution pattern.

Why: a 224-pixel image spans 85 degrees at ~0.4 degrees per pixel, and the line positions and
splittings that decide the crystal system are lost before VGG16 sees them; every system that works on
measured data reads the 1-D pattern at full resolution (Schopmans 2023, AlphaDiffract 2026,
XRD-AutoAnalyzer). The network here is small enough to train on 10^5 patterns on two CPU cores:

- a stem (``kernel``-wide convolution, stride 2, then max-pool 2: 8 501 points -> 2 125),
- ``depth`` stages that each halve the length, with ``width`` channels doubled at the next two stages
  (capped at 4 x width); a stage is a residual block (two convolutions and a strided 1x1 shortcut) for
  ``architecture: resnet``, or one strided convolution for ``plain`` (the simpler variant it is
  measured against),
- a max-pool and a flatten (positions matter: a global pooling would throw away where the lines are),
  dropout, a dense layer and the class logits; a ``temperature`` rescaling and the softmax make the
  served model.

Training sees logits; the saved model divides them by the temperature fitted on the synthetic
held-out patterns (:func:`xrdvision.models.calibration.fit_temperature`) before the softmax, so its
probabilities are calibrated.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from xrdvision.config.patterns import Cnn1dParams

log = logging.getLogger(__name__)


def build_logits_model(n_classes: int, length: int, p: Cnn1dParams, seed: int = 0):
    """The trainable network: pattern (length, 1) -> class logits."""
    import keras
    from keras import layers

    init = keras.initializers.HeNormal(seed=seed)

    def conv(x, ch: int, k: int, stride: int = 1):
        x = layers.Conv1D(ch, k, strides=stride, padding="same", use_bias=False, kernel_initializer=init)(x)
        return layers.BatchNormalization()(x)

    inp = keras.Input((length, 1), name="pattern")
    x = layers.ReLU()(conv(inp, p.width, p.kernel, 2))
    x = layers.MaxPooling1D(2)(x)
    for stage in range(p.depth):
        ch = p.width * 2 ** min(stage, 2)
        if p.architecture == "resnet":
            y = layers.ReLU()(conv(x, ch, p.kernel, 2))
            y = conv(y, ch, p.kernel)
            x = layers.ReLU()(layers.Add()([y, conv(x, ch, 1, 2)]))
        else:
            x = layers.ReLU()(conv(x, ch, p.kernel, 2))
    # Flattened, not globally pooled: the crystal system is in where the lines are across the whole
    # pattern (ratios of d-spacings), beyond the ~11 degrees one feature sees; a global pooling would
    # make the network blind to it (measured: chance-level training accuracy on COD).
    x = layers.Flatten()(layers.MaxPooling1D(2)(x))
    x = layers.Dropout(p.dropout, seed=seed)(x)
    x = layers.Dense(p.dense, activation="relu", kernel_initializer=init)(x)
    x = layers.Dropout(p.dropout, seed=seed + 1)(x)
    logits = layers.Dense(
        n_classes, name="logits", kernel_initializer=keras.initializers.GlorotUniform(seed)
    )(x)
    return keras.Model(inp, logits, name="cnn1d")


def with_temperature(logits_model, temperature: float):
    """The served model: logits / temperature -> softmax (class probabilities)."""
    import keras
    from keras import layers

    scaled = layers.Rescaling(1.0 / float(temperature), name="temperature")(logits_model.output)
    probs = layers.Softmax(name="probabilities")(scaled)
    return keras.Model(logits_model.input, probs, name="cnn1d_calibrated")


def compile_logits(model, learning_rate: float, top_k: int) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=top_k, name=f"top{top_k}_accuracy"),
        ],
    )


def predict_batches(model, make_batch: Any, n: int, batch_size: int = 256) -> np.ndarray:
    """``model`` outputs for ``n`` inputs made ``batch_size`` at a time by ``make_batch(start, stop)``
    (patterns are rendered per batch, never all at once: 10^4 patterns are 340 MB)."""
    out = []
    for start in range(0, n, batch_size):
        x = make_batch(start, min(n, start + batch_size))
        out.append(np.asarray(model.predict_on_batch(x)))
    return np.concatenate(out) if out else np.zeros((0, 0))
