"""VGG16 features cut at any ``trainable_conv`` for the tuner's trials, derived or computed once and cached.

The cache from the ``features`` stage holds the output of the frozen layers for ``model.trainable_conv``
of ``params.yaml``; a trial with another depth needs the output of another layer. Deeper cuts are
*derived* from the cache by running the frozen VGG16 layers between the two cuts on the cached tensors
(exact: the same layers on the same inputs); shallower cuts are computed from the images listed in the
cache. Either way the result is cached once per depth under ``data/cache/tune_features/<cut layer>/``
and keyed by the source features, so a rerun reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np

from xrdvision.config import Params
from xrdvision.errors import XrdVisionError
from xrdvision.formats.atomic import atomic_path
from xrdvision.models.features import load_features

log = logging.getLogger(__name__)

SPLITS = ("train", "val")  # what a trial trains and is scored on


class DepthFeatures:
    """Train/val features cut at any ``trainable_conv``, derived or computed once and cached on disk.

    Holds one depth in memory at a time: the block 3 tensors of a few thousand images take GBs.
    """

    def __init__(
        self,
        params: Params,
        base: dict[str, dict[str, np.ndarray]],
        image_dir: Path,
        cache_dir: Path,
        weights: Path,
    ) -> None:
        self.params = params
        self.base = base
        self.image_dir = Path(image_dir)
        self.cache_dir = Path(cache_dir)
        self.weights = Path(weights)
        self.base_cut = str(base["train"]["cut_layer"])
        self._vgg = None
        self._source_key: str | None = None
        self._current: tuple[int, tuple[dict, dict]] | None = None

    def vgg(self):
        """VGG16's conv base with the weights (built once; only its layer order and weights are used)."""
        if self._vgg is None:
            import keras

            from xrdvision.models.vgg16 import IMAGE_SIZE

            self._vgg = keras.applications.VGG16(
                weights=str(self.weights), include_top=False, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3)
            )
        return self._vgg

    def source_key(self) -> str:
        """md5 of the cached source tensors + their cut + the weights: what every derived cache depends on."""
        if self._source_key is None:
            h = hashlib.md5(f"{self.base_cut}\n{self.base['train'].get('weights_md5', '')}\n".encode())
            for s in SPLITS:
                h.update(np.ascontiguousarray(self.base[s]["features"]).view(np.uint8))
                h.update("\n".join(map(str, self.base[s]["image"])).encode())
            self._source_key = h.hexdigest()
        return self._source_key

    def get(self, trainable_conv: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(train, val) features cut for ``trainable_conv`` (the layout of :func:`load_features`)."""
        if self._current is not None and self._current[0] == trainable_conv:
            return self._current[1]
        from xrdvision.models.vgg16 import cut_layer_name

        self._current = None  # free the previous depth before building the next
        target = cut_layer_name(trainable_conv)
        if target == self.base_cut:
            pair = (self.base["train"], self.base["val"])
        else:
            pair = tuple(self._cached(s, target, trainable_conv) for s in SPLITS)
        self._current = (trainable_conv, pair)
        return pair

    def _cached(self, split: str, target: str, trainable_conv: int) -> dict[str, np.ndarray]:
        path = self.cache_dir / target / f"{split}.npz"
        if path.is_file():
            data = load_features(path)
            if str(data.get("source_key", "")) == self.source_key():
                return data
        src = self.base[split]
        names = [layer.name for layer in self.vgg().layers]
        if names.index(target) > names.index(self.base_cut):
            feats = derive_features(
                src["features"], self.vgg(), self.base_cut, target, desc=f"{target} {split}"
            )
        else:
            feats = self._from_images(src, trainable_conv, f"{target} {split}")
        data = {
            **src,
            "features": feats,
            "cut_layer": np.array(target),
            "source_key": np.array(self.source_key()),
        }
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **data)
        return data

    def _from_images(self, src: dict[str, np.ndarray], trainable_conv: int, desc: str) -> np.ndarray:
        from xrdvision.models.features import compute_features
        from xrdvision.models.vgg16 import build_model

        model_params = dataclasses.replace(self.params.model, trainable_conv=trainable_conv)
        net = build_model(7, model_params, weights=self.weights, seed=self.params.seed)
        paths = [self.image_dir / str(n) for n in src["image"]]
        feats, _, problems = compute_features(net.front, paths, desc=desc)
        if problems:
            raise XrdVisionError(f"{problems[0]} (needed to cut features at trainable_conv={trainable_conv})")
        return feats


def derive_features(
    x: np.ndarray, vgg, from_layer: str, to_layer: str, batch_size: int = 32, desc: str = "derive"
) -> np.ndarray:
    """Run VGG16's layers after ``from_layer`` up to ``to_layer`` on cached ``from_layer`` outputs.

    Exact: the frozen network is a chain, so the output of a deeper layer is the later layers applied
    to the output of a shallower one.
    """
    import keras
    from tqdm import tqdm

    names = [layer.name for layer in vgg.layers]
    i, j = names.index(from_layer), names.index(to_layer)
    if j <= i:
        raise ValueError(f"{to_layer} is not after {from_layer}")
    inp = keras.Input(tuple(x.shape[1:]))
    y = inp
    for layer in vgg.layers[i + 1 : j + 1]:
        y = layer(y)
    model = keras.Model(inp, y)
    out = []
    quiet = not log.isEnabledFor(logging.INFO)  # the CLI's --quiet hides progress bars too
    for start in tqdm(range(0, len(x), batch_size), desc=desc, unit="batch", disable=quiet):
        out.append(np.asarray(model(x[start : start + batch_size], training=False), dtype=np.float32))
    return np.concatenate(out) if out else np.zeros((0, *model.output.shape[1:]), np.float32)
