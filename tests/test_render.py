"""Rendering: pixel contents of single images, and run_render on patterns of real COD CIFs."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from helpers_patterns import SMALL_CIFS, build_patterns
from xrdvision.config import AugmentParams, Params, RenderParams
from xrdvision.crystal.profile import grid, profile_pattern
from xrdvision.data.augment import augment_pattern, copy_rng
from xrdvision.data.render import STATE_FILE, Renderer, encode_png, run_render
from xrdvision.errors import InputError
from xrdvision.formats.patterns import load_patterns

SIZE = 224
G = grid(5.0, 90.0, 0.02)


def _single_peak(x: float, fwhm: float = 0.1) -> np.ndarray:
    return profile_pattern(np.array([x]), np.array([1.0]), G, fwhm)


def _column_of(two_theta: float) -> float:
    """Where 2-theta should land: the pixel centre convention puts pixel c's centre at x = c + 0.5."""
    return (two_theta - 5.0) / 85.0 * SIZE - 0.5


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


@pytest.fixture(scope="module")
def patterns_dir(cod_dir, tmp_path_factory):
    """patterns.npz + manifest.csv of 6 real CIFs (and one unreadable CIF: a failed manifest row)."""
    out = tmp_path_factory.mktemp("patterns")
    cifs = [cod_dir / f"{i}.cif" for i in SMALL_CIFS]
    build_patterns([*cifs, cod_dir / "bad" / sorted(p.name for p in (cod_dir / "bad").glob("*.cif"))[0]], out)
    return out


def test_image_is_black_with_a_grey_line(renderer):
    rng = np.random.default_rng(0)
    y = profile_pattern(rng.uniform(5, 90, 40), rng.uniform(0.05, 1, 40), G, 0.1)
    img = renderer.render(G, y)
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    # Only greys: every pixel has R == G == B (white line, antialiased edges, black background).
    assert np.all(img[..., 0] == img[..., 1]) and np.all(img[..., 1] == img[..., 2])
    lit = img[..., 0] > 0
    assert 0.01 < lit.mean() < 0.4  # a line, not a filled area nor nothing
    assert img.max() == 255  # the line's core is pure white
    assert np.all(img[0:3, :, :] == 0)  # headroom above the tallest peak stays black
    # The background is exactly black (0, 0, 0), not a dark grey.
    assert np.all(img[~lit] == 0) and (~lit).mean() > 0.6


@pytest.mark.parametrize("two_theta", [10.0, 27.3, 47.5, 71.0, 88.0])
def test_peak_lands_on_its_pixel_column(renderer, two_theta):
    img = renderer.render(G, _single_peak(two_theta))[..., 0]
    upper = img[: SIZE // 2]  # only the peak rises above half height
    cols = np.flatnonzero(upper.max(axis=0) > 0)
    assert cols.size >= 1 and cols.max() - cols.min() <= 3
    weights = upper[:, cols].sum(axis=0).astype(float)
    centre = float(np.sum(cols * weights) / weights.sum())
    assert centre == pytest.approx(_column_of(two_theta), abs=0.5)  # measured within 0.1 px
    # The top of a peak of height 1 is at y = 1 / 1.05 of the height: row 224 - 224 / 1.05 = 10.7.
    top_row = int(np.flatnonzero(img.max(axis=1) > 0)[0])
    assert abs(top_row - (SIZE - SIZE / 1.05)) <= 1.5


def test_all_zero_pattern_is_a_flat_line_at_the_bottom(renderer):
    img = renderer.render(G, np.zeros_like(G))
    assert np.all(img[: SIZE - 2] == 0)
    assert np.all(img[-1, :, 0] > 0)  # half of a 1-px line centred on the bottom edge: grey all along


def test_empty_pattern_is_black(renderer):
    img = renderer.render(np.zeros(0), np.zeros(0))
    assert img.shape == (SIZE, SIZE, 3) and not img.any()


def test_shape_mismatch_is_an_error(renderer):
    with pytest.raises(ValueError, match="differ in shape"):
        renderer.render(G, np.zeros(10))


def test_reused_renderer_matches_a_fresh_one():
    rng = np.random.default_rng(1)
    patterns = [profile_pattern(rng.uniform(5, 90, 30), rng.uniform(0, 1, 30), G, 0.15) for _ in range(5)]
    reused = Renderer()
    first = [reused.render(G, y) for y in patterns]
    for _ in range(20):  # many unrelated images in between, including the degenerate ones
        reused.render(G, rng.uniform(0, 1, G.size))
        reused.render(G, np.zeros_like(G))
        reused.render(np.zeros(0), np.zeros(0))
    for y, before in zip(patterns, first, strict=True):
        again = reused.render(G, y)
        fresh = Renderer().render(G, y)
        np.testing.assert_array_equal(again, fresh)
        np.testing.assert_array_equal(before, fresh)
    assert not np.array_equal(first[0], first[1])


def test_size_and_line_width():
    y = _single_peak(47.5, fwhm=2.0)
    small = Renderer(size=64).render(G, y)
    assert small.shape == (64, 64, 3)
    thin = (Renderer(line_width=1.0).render(G, y)[..., 0] > 0).sum()
    thick = (Renderer(line_width=3.0).render(G, y)[..., 0] > 0).sum()
    assert thick > 1.8 * thin


def test_save_writes_the_rendered_png(renderer, tmp_path):
    y = _single_peak(30.0)
    path = tmp_path / "sub" / "x_0.png"
    renderer.save(G, y, path)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
        np.testing.assert_array_equal(np.asarray(im), renderer.render(G, y))
    assert [p.name for p in path.parent.iterdir()] == ["x_0.png"]  # no temp file left


def _params(copies: int = 2, workers: int = 1, seed: int = 42) -> Params:
    return dataclasses.replace(
        Params(seed=seed),
        augment=AugmentParams(copies=copies, noise=0.005, background=0.05),
        render=RenderParams(workers=workers),
    )


def _index(out_dir):
    with open(out_dir / "index.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.needs_shared("cod")
def test_run_render_images_and_index(patterns_dir, tmp_path):
    params = _params(copies=2, workers=2)
    out = tmp_path / "images"
    summary = run_render(params, patterns_dir, out)
    pats = load_patterns(patterns_dir / "patterns.npz")
    assert pats.ids == list(SMALL_CIFS)
    assert summary["n_structures"] == 6 and summary["n_images"] == 18 and summary["n_drawn"] == 18
    assert summary["skipped"] == [] and summary["seconds"] > 0
    rows = _index(out)
    assert [(r["image"], r["cod_id"], r["copy"]) for r in rows] == [
        (f"{i}_{k}.png", i, str(k)) for i in SMALL_CIFS for k in range(3)
    ]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["image"] for r in rows)
    fresh = Renderer()
    for i, cod_id in enumerate(pats.ids):
        imgs = []
        for k in range(3):
            with Image.open(out / f"{cod_id}_{k}.png") as im:
                assert im.size == (SIZE, SIZE) and im.mode == "RGB"
                imgs.append(np.asarray(im))
        # Copy 0 is the stored pattern; copy k is augment_pattern with the (seed, id, k) generator,
        # whichever worker process drew it.
        np.testing.assert_array_equal(imgs[0], fresh.render(pats.two_theta, pats.intensity[i]))
        for k in (1, 2):
            g, y = augment_pattern(*pats.peaks(i), copy_rng(42, cod_id, k), params.augment, params.simulate)
            np.testing.assert_array_equal(imgs[k], fresh.render(g, y))
            assert not np.array_equal(imgs[k], imgs[0])
    # The two corundum entries (same structure, two COD ids) give the same copy 0 but their own copies.
    a, b = (np.asarray(Image.open(out / f"{i}_1.png")) for i in ("1000017", "1000032"))
    assert not np.array_equal(a, b)


@pytest.mark.needs_shared("cod")
def test_run_render_copies_zero_means_no_augmentation(patterns_dir, tmp_path):
    out = tmp_path / "images"
    summary = run_render(_params(copies=0), patterns_dir, out)
    assert summary["n_images"] == 6
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{i}_0.png" for i in SMALL_CIFS)
    assert {r["copy"] for r in _index(out)} == {"0"}


@pytest.mark.needs_shared("cod")
def test_run_render_resumes_and_restarts_cleanly(patterns_dir, tmp_path, monkeypatch):
    out = tmp_path / "images"
    run_render(_params(copies=2), patterns_dir, out)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.png")}
    state = json.loads((out / STATE_FILE).read_text())
    assert state["augment"]["copies"] == 2 and len(state["patterns_sha256"]) == 64

    # An interrupted run: one image missing and a temp file left behind. Only that image is drawn.
    (out / "1000026_1.png").unlink()
    (out / ".1000026_2.png.abc.png.tmp").write_bytes(b"partial")
    calls = []
    original = Renderer.save

    def counting_save(self, two_theta, intensity, path):
        calls.append(path.name)
        original(self, two_theta, intensity, path)

    monkeypatch.setattr(Renderer, "save", counting_save)
    summary = run_render(_params(copies=2), patterns_dir, out)
    assert calls == ["1000026_1.png"] and summary["n_drawn"] == 1 and summary["resumed"] is True
    assert summary["n_images"] == 18 and len(_index(out)) == 18
    assert not list(out.glob(".*.tmp"))
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.png")}
    assert after["1000026_1.png"][1] == before["1000026_1.png"][1]  # redrawn identically
    assert {k: v for k, v in after.items() if k != "1000026_1.png"} == {
        k: v for k, v in before.items() if k != "1000026_1.png"
    }

    # A complete run again: nothing redrawn.
    calls.clear()
    assert run_render(_params(copies=2), patterns_dir, out)["n_drawn"] == 0 and calls == []

    # Other settings: the folder is cleared first, never a mix of old and new images.
    calls.clear()
    summary = run_render(_params(copies=1, seed=7), patterns_dir, out)
    assert summary["resumed"] is False and summary["n_drawn"] == 12 and len(calls) == 12
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        f"{i}_{k}.png" for i in SMALL_CIFS for k in (0, 1)
    )
    assert json.loads((out / STATE_FILE).read_text())["seed"] == 7


def test_run_render_bad_patterns_file(tmp_path):
    with pytest.raises(InputError, match=r"patterns\.npz: patterns file not found"):
        run_render(_params(), tmp_path, tmp_path / "images")
    np.savez(tmp_path / "patterns.npz", ids=np.array(["1"]), two_theta=G)
    with pytest.raises(InputError, match=r"patterns\.npz: missing arrays: peak_offsets"):
        run_render(_params(), tmp_path, tmp_path / "images")


@pytest.mark.parametrize("shape", [(224, 224, 3), (17, 33, 3), (1, 1, 3)])
def test_encode_png_round_trips_through_pillow(shape, tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(encode_png(rgb))
    with Image.open(path) as im:
        im.verify()  # checks the chunk CRCs
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.asarray(im), rgb)
    with pytest.raises(ValueError, match=r"expected an \(h, w, 3\) array"):
        encode_png(rgb[..., 0])
