"""Frozen VGG16 features of peak lists drawn in memory: the image model on data that has no PNG files.

Why: the pipeline's images come from the render stage, one PNG per COD structure and copy. Training
the head on thousands of Materials Project structures, or scoring it on every COD structure, only
needs each image once, on its way into VGG16; writing and reading PNGs would add nothing. The drawing
is the render stage's, step for step: the peak list profiled on ``simulate``'s grid
(:func:`xrdvision.crystal.profile.profile_pattern`: pseudo-Voigt ``fwhm``, ``eta``, optional K-alpha2)
and drawn by :class:`xrdvision.data.render.Renderer` over ``simulate``'s 2-theta range; the features
are the training model's front (:func:`xrdvision.models.vgg16.build_model`, ``block5_pool`` when
``model.trainable_conv`` is 0), and the head is fitted by the train stage's
:func:`xrdvision.models.train.fit_tail`. VGG16 is the cost: 4-7 images per second on two cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.crystal.profile import grid, profile_pattern


def draw(renderer: Any, two_theta: np.ndarray, intensity: np.ndarray, params: Params) -> np.ndarray:
    """The render stage's unaugmented image (copy 0) of one peak list: uint8 (size, size, 3)."""
    sim = params.simulate
    g = grid(sim.two_theta_min, sim.two_theta_max, sim.step)
    y = profile_pattern(
        two_theta, intensity, g, sim.fwhm, sim.eta, kalpha2=sim.kalpha2, wavelength=sim.wavelength
    )
    return renderer.render(g, y)


def image_features(
    front: Any,
    peak_lists: Iterable[tuple[np.ndarray, np.ndarray]],
    params: Params,
    *,
    batch_size: int = 32,
    progress: Callable[[int, float], None] | None = None,
) -> np.ndarray:
    """``front`` over the drawn image of every ``(two_theta, intensity)`` peak list, in order.

    ``progress(n_done, seconds)`` after each batch."""
    from xrdvision.data.render import Renderer

    sim = params.simulate
    renderer = Renderer(params.render.size, params.render.line_width, (sim.two_theta_min, sim.two_theta_max))
    out: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    t0 = time.perf_counter()
    n = 0

    def flush() -> None:
        nonlocal n
        if batch:
            # the compiled graph, as the features stage: ~25 % faster than an eager call on 2 cores
            out.append(np.asarray(front.predict_on_batch(np.stack(batch).astype(np.float32))))
            n += len(batch)
            batch.clear()
            if progress:
                progress(n, time.perf_counter() - t0)

    for tt, amp in peak_lists:
        batch.append(draw(renderer, tt, amp, params))
        if len(batch) == batch_size:
            flush()
    flush()
    shape = tuple(int(d) for d in front.output.shape[1:])
    return np.concatenate(out) if out else np.zeros((0, *shape), np.float32)


def vgg_front(params: Params, weights: str | Path) -> Any:
    """The training model's frozen front (``model.trainable_conv`` decides where it is cut)."""
    from xrdvision.models.vgg16 import build_model

    return build_model(7, params.model, weights=weights, seed=params.seed).front


def fit_head(
    params: Params,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    weights: str | Path,
) -> tuple[Any, dict[str, Any]]:
    """The train stage's head (``model.dense``, ``dropout``, ``train.*``; early stopping on ``val``)
    fitted on ``(features, labels)``; returns ``(tail, info)`` with epochs and seconds."""
    from xrdvision.models.train import fit_tail

    mode = params.labels.mode

    def as_split(features: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "features": features,
            mode: np.asarray(labels, dtype=str),
            "copy": np.zeros(len(labels), np.int32),
        }

    net, history, info = fit_tail(params, as_split(*train), as_split(*val), weights=weights, verbose=0)
    info = {**info, "val_loss": history.get("val_loss", []), "val_accuracy": history.get("val_accuracy", [])}
    return net.tail, info
