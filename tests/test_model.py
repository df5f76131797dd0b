"""The split VGG16 model: cut points, cached path == end-to-end, and where the weights come from."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import WEIGHTS
from xrdvision.config import ModelParams
from xrdvision.errors import XrdVisionError
from xrdvision.models import vgg16 as xm


@pytest.mark.parametrize(
    ("trainable_conv", "cut", "shape"),
    [
        (0, "block5_pool", (7, 7, 512)),
        (3, "block4_pool", (14, 14, 512)),
        (6, "block3_pool", (28, 28, 256)),
        (1, "block5_conv2", (14, 14, 512)),
    ],
)
def test_cut_point_follows_trainable_conv(trainable_conv, cut, shape):
    net = xm.build_model(7, ModelParams(trainable_conv=trainable_conv, dense=[8]), weights=None)
    assert net.cut_layer == cut
    assert tuple(net.front.output.shape[1:]) == shape
    n_trainable_conv = (
        sum(1 for w in net.tail.trainable_weights if w.path.split("/")[0].startswith("block")) // 2
    )
    assert n_trainable_conv == trainable_conv
    assert not net.front.trainable_weights  # the cached part is frozen
    assert net.tail.output.shape[-1] == 7


@pytest.mark.needs_shared("weights")
def test_cached_path_equals_end_to_end_with_real_weights():
    net = xm.build_model(7, ModelParams(), weights=WEIGHTS, seed=1)
    images = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3)).astype(np.float32)
    cached = net.tail.predict(net.front.predict(images, verbose=0), verbose=0)
    direct = net.full.predict(images, verbose=0)
    np.testing.assert_allclose(cached, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(direct.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.needs_shared("weights")
def test_front_equals_keras_preprocess_input_then_vgg16():
    import keras
    from keras.applications.vgg16 import preprocess_input

    net = xm.build_model(7, ModelParams(trainable_conv=3), weights=WEIGHTS)
    base = keras.applications.VGG16(weights=str(WEIGHTS), include_top=False, input_shape=(224, 224, 3))
    ref = keras.Model(base.input, base.get_layer("block4_pool").output)
    images = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3)).astype(np.float32)
    expected = ref.predict(preprocess_input(images.copy()), verbose=0)
    got = net.front.predict(images, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)
    assert expected.max() > 10  # real ImageNet activations, not zeros


def test_saved_full_model_reloads_without_xrdvision_code(tmp_path):
    import keras

    net = xm.build_model(3, ModelParams(trainable_conv=0, dense=[4]), weights=None)
    path = tmp_path / "m.keras"
    net.full.save(path)
    again = keras.models.load_model(path, compile=False)  # standard layers only
    x = np.full((1, 224, 224, 3), 128.0, np.float32)
    np.testing.assert_allclose(again.predict(x, verbose=0), net.full.predict(x, verbose=0), rtol=1e-6)


@pytest.mark.needs_shared("weights")
def test_resolve_weights_order(tmp_path, monkeypatch):
    monkeypatch.delenv(xm.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    # ../shared beside the checkout is found when nothing explicit is set
    assert xm.resolve_weights("", allow_download=False) == WEIGHTS.resolve() or xm.resolve_weights(
        "", allow_download=False
    ).samefile(WEIGHTS)
    # an explicit param wins
    own = tmp_path / "own.h5"
    own.write_bytes(b"x")
    assert xm.resolve_weights(str(own), allow_download=False) == own
    # the environment variable wins over the param
    env = tmp_path / "env.h5"
    env.write_bytes(b"y")
    monkeypatch.setenv(xm.WEIGHTS_ENV, str(env))
    assert xm.resolve_weights(str(own), allow_download=False) == env


def test_explicit_missing_weights_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv(xm.WEIGHTS_ENV, str(tmp_path / "missing.h5"))
    with pytest.raises(
        XrdVisionError, match=r"missing.h5: VGG16 weights file not found \(set by XRDVISION_VGG16_WEIGHTS\)"
    ):
        xm.resolve_weights("")
    monkeypatch.delenv(xm.WEIGHTS_ENV)
    with pytest.raises(
        XrdVisionError, match=r"nowhere.h5: VGG16 weights file not found \(set by model.weights\)"
    ):
        xm.resolve_weights(str(tmp_path / "nowhere.h5"))


def test_corrupt_weights_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(XrdVisionError, match=r"bad.h5: cannot load VGG16 weights"):
        xm.build_model(7, ModelParams(), weights=bad)


@pytest.fixture
def weights_server():
    """A real HTTP server on 127.0.0.1 serving the shared weights file, as Keras' host serves it."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(WEIGHTS.parent))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.needs_shared("weights")
def test_download_through_keras_with_hash_check(weights_server, tmp_path):
    md5 = xm.weights_fingerprint(WEIGHTS)  # the shared copy's md5 (its bytes differ from Keras' file)
    path = xm.download_weights(f"{weights_server}/{xm.WEIGHTS_FILE}", md5, cache_dir=tmp_path)
    assert path == tmp_path / "models" / xm.WEIGHTS_FILE
    assert xm.weights_fingerprint(path) == md5
    # a wrong hash is refused with one line naming the URL
    (tmp_path / "models" / xm.WEIGHTS_FILE).unlink()
    with pytest.raises(XrdVisionError, match=r"127.0.0.1.*download failed"):
        xm.download_weights(f"{weights_server}/{xm.WEIGHTS_FILE}", "0" * 32, cache_dir=tmp_path)


def test_nothing_found_and_no_network_explains_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv(xm.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    monkeypatch.setattr(xm, "_repo_root", lambda: tmp_path / "repo")
    monkeypatch.setattr(xm, "KERAS_WEIGHTS_URL", "http://127.0.0.1:9/vgg16.h5")
    monkeypatch.setattr(
        xm.download_weights, "__defaults__", ("http://127.0.0.1:9/vgg16.h5", xm.KERAS_WEIGHTS_MD5, None)
    )
    with pytest.raises(XrdVisionError) as err:
        xm.resolve_weights("")
    msg = str(err.value)
    assert "looked in" in msg and str(tmp_path / "kh" / "models") in msg and xm.WEIGHTS_ENV in msg
    assert "\n" not in msg
    assert not Path(tmp_path / "kh" / "models" / xm.WEIGHTS_FILE).exists()
