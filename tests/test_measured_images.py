"""VGG16 training images drawn from peak-list shards (models/measured_images.py, the features stage with
``split.train_sources`` holding ``synth`` or ``mp``): the 1-D model's draw, the rows it adds to training
only, a resume that computes only the chunks it lacks, and a bad shard as one line.

Real data: a shard of real structures (embedded COD CIFs, batch-simulated as the generate stage does),
so these run in a clone without ../shared; only the full stage needs the VGG16 weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from helpers_images import make_split_data, tiny_params
from xrdvision.cli import main
from xrdvision.config import parse_params
from xrdvision.crystal.powder import simulate_batch
from xrdvision.data import measurement
from xrdvision.data.cod_set import read_cod_entry
from xrdvision.data.peak_table import from_shard, powder_settings
from xrdvision.errors import InputError
from xrdvision.formats.peaklists import PeakListShard, read_shard, shard_bytes, write_shard_bytes
from xrdvision.models import measured_images
from xrdvision.models.features import load_features, run_features
from xrdvision.models.train_cnn1d import measured_batch

N_STRUCTURES = 5


@pytest.fixture(scope="module")
def shard_file(embedded_cifs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``synth-00000.npz``: five real structures batch-simulated into the generate stage's shard format."""
    entries = []
    for path in embedded_cifs.values():
        try:
            entries.append(read_cod_entry(path, 0.01, 5.0))
        except InputError:
            continue
        if len(entries) == N_STRUCTURES:
            break
    batch = simulate_batch([e["record"] for e in entries], powder_settings(parse_params({})))
    assert not batch.errors
    shard = PeakListShard(
        ids=[f"synth-{k:06d}" for k in range(len(entries))],
        reduced_formula=[e["reduced_formula"] for e in entries],
        crystal_system=[e["crystal_system"] for e in entries],
        space_group=np.array([e["space_group"] for e in entries], dtype=np.int16),
        source_space_group=np.array([e["space_group"] for e in entries], dtype=np.int16),
        icsd=np.zeros(len(entries), dtype=bool),
        offsets=batch.offsets,
        two_theta=batch.two_theta,
        intensity=batch.intensity,
        failed_ids=[],
        failed_reasons=[],
        source="synth",
        wavelength=1.5406,
        plan="test",
        normal=batch.normal,
    )
    path = tmp_path_factory.mktemp("generated") / "synth-00000.npz"
    write_shard_bytes(path, shard_bytes(shard))
    return path


class FakeFront:
    """A stand-in for VGG16's front (the caching is under test, not the network): 4 numbers per image,
    its mean brightness in four vertical bands; counts the images it sees and can stop after ``stop``."""

    class _Out:
        shape = (None, 4)

    output = _Out()

    def __init__(self, stop: int | None = None) -> None:
        self.seen = 0
        self.stop = stop

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        if self.stop is not None and self.seen + len(images) > self.stop:
            raise KeyboardInterrupt  # an interrupt in the middle of a chunk
        self.seen += len(images)
        return images.mean(axis=(1, 3)).reshape(len(images), 4, -1).mean(axis=2)


def test_drawn_pattern_is_the_1d_models_draw(shard_file: Path) -> None:
    """The image is drawn from the pattern the 1-D model would get from the same generator state: equal
    to measured_batch's output with the network's sqrt scaling undone."""
    p = parse_params({})
    table = from_shard(read_shard(shard_file), "synth")
    x = measurement.grid(p.pattern)
    idx = np.arange(len(table))
    drawn = measurement.draw_patterns(table, idx, p, x, np.random.default_rng(7))
    one_d = measured_batch(table, idx, p, x, np.random.default_rng(7))[..., 0] ** 2
    assert drawn.shape == (N_STRUCTURES, len(x)) and np.allclose(drawn, one_d, atol=1e-5)
    clean = measurement.draw_patterns(table, idx, p, x, None)
    assert not np.allclose(clean, drawn, atol=1e-3)  # noiseless scoring images differ from the draws


def test_resume_computes_only_the_chunks_it_lacks(
    shard_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(measured_images, "CHUNK", 2)  # 5 structures: chunks of 2, 2, 1
    p = parse_params({"split": {"train_sources": ["cod", "synth"]}})
    inputs = measured_images.read_sources(["synth"], {"synth": shard_file.parent})
    cache = tmp_path / "chunks"

    def run(front: FakeFront) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return measured_images.shard_features(front, p, inputs, cache, "block5_pool", "md5")

    with pytest.raises(KeyboardInterrupt):
        run(FakeFront(stop=3))  # killed in the second chunk
    assert [f.name[:16] for f in sorted(cache.iterdir())] == ["synth-00000-0000"]  # no half-written file
    front = FakeFront()
    rows, s = run(front)
    assert front.seen == 3 and (s["chunks_computed"], s["chunks_reused"]) == (2, 1)
    assert rows["features"].shape == (N_STRUCTURES, 4) and s["per_source"] == {"synth": N_STRUCTURES}
    again, s2 = run(front := FakeFront())
    assert front.seen == 0 and s2["chunks_reused"] == 3
    assert np.array_equal(again["features"], rows["features"])
    (cache / s["chunk_files"][0]).write_bytes(b"damaged")  # a cached chunk that cannot be read: redone, said
    redo, s_redo = run(front := FakeFront())
    assert front.seen == 2 and s_redo["chunks_computed"] == 1 and "unreadable cached chunk" in caplog.text
    assert np.array_equal(redo["features"], rows["features"])
    fresh, _ = measured_images.shard_features(
        FakeFront(), p, inputs, tmp_path / "fresh", "block5_pool", "md5"
    )
    assert np.array_equal(
        fresh["features"], rows["features"]
    )  # an interrupted run ends where a whole one does
    # Another setting that changes the images: every chunk again; the older ones are then pruned.
    noisier = parse_params({"conditions": {"noise": [0.01, 0.05]}})
    _, s3 = measured_images.shard_features(FakeFront(), noisier, inputs, cache, "block5_pool", "md5")
    assert s3["chunks_computed"] == 3
    (cache / ".synth-00000-0001-x.npz.tmp").write_bytes(b"left by a kill -9")
    assert measured_images.prune_chunks(cache, s3["chunk_files"]) == 4
    assert sorted(f.name for f in cache.iterdir()) == sorted(s3["chunk_files"])


def _workspace(root: Path, shard_file: Path) -> Path:
    make_split_data(root, {"train": 1, "val": 1, "test": 1})
    generated = root / "data" / "generated"
    generated.mkdir()
    (generated / shard_file.name).write_bytes(shard_file.read_bytes())
    return generated


def test_bad_or_missing_shard_is_one_line_before_any_image(
    shard_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    generated = _workspace(tmp_path, shard_file)
    (generated / "synth-00001.npz").write_bytes(b"PK\x03\x04 not a whole zip")
    p = tiny_params(tmp_path, split={"train_sources": ["cod", "synth"]})
    with pytest.raises(InputError) as err:
        run_features(p, Path("data/split"), Path("data/images"), Path("data/features"), {"synth": generated})
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"{generated / 'synth-00001.npz'}: unreadable peak-list shard")
    assert not Path("data/features").exists()  # nothing written, VGG16 never started
    Path("params.yaml").write_text("split:\n  train_sources: [cod, synth]\n")
    assert main(["-q", "--params", "params.yaml", "features", "--generated", str(generated)]) == 1
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1 and "synth-00001.npz: unreadable peak-list shard" in out[0], out
    for f in generated.iterdir():
        f.unlink()
    with pytest.raises(InputError, match=r"no synth-\*\.npz peak-list shards.*generate"):
        run_features(p, Path("data/split"), Path("data/images"), Path("data/features"), {"synth": generated})


@pytest.mark.needs_shared("weights")
def test_drawn_structures_join_the_training_features_only(
    shard_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[cod, synth]: COD's 3 training images + the shard's 5 structures, labelled by the shard; val and
    test are COD's. A rerun reuses every chunk; [synth] alone trains on the drawn structures only."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(measured_images, "CHUNK", 3)
    generated = _workspace(tmp_path, shard_file)
    shard = read_shard(shard_file)
    p = tiny_params(tmp_path, split={"train_sources": ["cod", "synth"]})
    args = (Path("data/split"), Path("data/images"), Path("data/features"), {"synth": generated})
    s = run_features(p, *args)
    assert {k: v["n_images"] for k, v in s["splits"].items()} == {
        "train": 3 + N_STRUCTURES,
        "val": 3,
        "test": 3,
    }
    assert s["drawn_train_images"] == {"synth": N_STRUCTURES} and s["drawn_chunks"]["chunks_computed"] == 2
    tr = load_features(Path("data/features/train.npz"))
    assert tr["features"].shape == (3 + N_STRUCTURES, 7, 7, 512) and tr["features"][3:].max() > 0
    assert tr["crystal_system"][3:].tolist() == shard.crystal_system
    assert tr["space_group"][3:].tolist() == [str(g) for g in shard.space_group]
    assert tr["image"][3:].tolist() == [f"synth/{i}" for i in shard.ids]
    for split in ("val", "test"):
        assert not any(
            str(n).startswith("synth/") for n in load_features(Path(f"data/features/{split}.npz"))["image"]
        )
    only = tiny_params(tmp_path, split={"train_sources": ["synth"]})
    s2 = run_features(only, *args)
    assert s2["drawn_chunks"] == {"chunks_computed": 0, "chunks_reused": 2}
    tr2 = load_features(Path("data/features/train.npz"))
    assert s2["splits"]["train"]["n_images"] == N_STRUCTURES
    assert np.array_equal(tr2["features"], tr["features"][3:])
