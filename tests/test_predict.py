"""Prediction on real files with a real (tiny) model from a real MLflow registry, and the real-data check.

The model is trained once per module, as the pipeline does it: real COD CIFs simulated
(``simulate_file``) and rendered (``Renderer.save``) into training images, ``run_features`` +
``run_train`` into a sqlite MLflow store in a temp folder, registered as ``challenger``. It is weak (15
training images), which does not matter here: the tests check that every input reaches the model as the
training images did, that results, errors and figures are right, not that the model is good.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import COD_DIR, EXPERIMENTAL_DIR
from helpers_images import write_split_lists
from xrdvision.config import parse_params
from xrdvision.errors import InputError, XrdVisionError

# a tiny model trained on ../shared/cod CIFs (VGG16 features), asked about ../shared/experimental patterns
pytestmark = pytest.mark.needs_shared("cod", "weights", "experimental")
NAME = "xrdvision-crystal-system"
TRAIN_CLASSES = ("cubic", "hexagonal", "monoclinic")
PER_CLASS = {"train": 4, "val": 1}
RRUFF = EXPERIMENTAL_DIR / "rruff_agi" / "rruff_agi_0016_sg225.xy"
ROCKJOCK = EXPERIMENTAL_DIR / "rockjock" / "rockjock_pyrite.xy"
PYROCHLORE = EXPERIMENTAL_DIR / "other" / "RbNb2O5F_pxrd.xy"
UNSEEN_CIF = COD_DIR / "1000017.cif"  # corundum, trigonal: not among the training CIFs


def _small_cifs(system: str) -> list[str]:
    """COD ids of small cells of one crystal system from ../shared/cod/INDEX.csv, sorted."""
    with open(COD_DIR / "INDEX.csv", newline="", encoding="utf-8") as fh:
        rows = [
            r for r in csv.DictReader(fh) if r["crystal_system"] == system and int(r["n_atoms_in_cell"]) <= 40
        ]
    return sorted(r["cod_id"] for r in rows)


def _params(root: Path):
    return parse_params(
        {
            "mlflow": {"tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db", "experiment": "test"},
            "model": {"trainable_conv": 0, "dense": [32], "dropout": 0.0},
            "train": {"epochs": 4, "batch_size": 6, "learning_rate": 0.003, "patience": 4},
        }
    )


def _build_training_set(root: Path, params) -> dict[str, str]:
    """Simulate + render real CIFs exactly as the simulate and render stages do; write the split lists.
    Returns {cod_id: image path} of the training images."""
    from xrdvision.crystal.profile import grid
    from xrdvision.data.render import Renderer, image_name
    from xrdvision.data.simulate import simulate_file

    sim = params.simulate
    g = grid(sim.two_theta_min, sim.two_theta_max, sim.step)
    renderer = Renderer(params.render.size, params.render.line_width, (sim.two_theta_min, sim.two_theta_max))
    images = root / "data" / "images"
    images.mkdir(parents=True)
    rows: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}
    made: dict[str, str] = {}
    for system in TRAIN_CLASSES:
        need = sum(PER_CLASS.values())
        ids = []
        for cod_id in _small_cifs(system):
            try:
                record = simulate_file(COD_DIR / f"{cod_id}.cif", sim, params.labels)
            except InputError:
                continue
            assert record.labels.crystal_system == system
            renderer.save(g, record.pattern, images / image_name(cod_id, 0))
            made[cod_id] = str(images / image_name(cod_id, 0))
            ids.append((cod_id, record.labels.space_group))
            if len(ids) == need:
                break
        assert len(ids) == need, system
        splits = ["train"] * PER_CLASS["train"] + ["val"] * PER_CLASS["val"]
        for (cod_id, sg), split in zip(ids, splits, strict=True):
            rows[split].append(
                {
                    "image": image_name(cod_id, 0),
                    "cod_id": cod_id,
                    "group": cod_id,
                    "copy": "0",
                    "crystal_system": system,
                    "space_group": str(sg),
                }
            )
    rows["test"] = rows["val"]
    write_split_lists(root / "data" / "split", rows)
    return {r["cod_id"]: made[r["cod_id"]] for r in rows["train"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real tiny model: features + train on rendered real CIFs, registered as challenger v1."""
    from xrdvision.models.features import run_features
    from xrdvision.models.train import run_train

    root = tmp_path_factory.mktemp("predict")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        params = _params(root)
        train_images = _build_training_set(root, params)
        run_features(params, Path("data/split"), Path("data/images"), Path("data/features"))
        out = run_train(
            params,
            Path("data/features"),
            Path("models"),
            Path("metrics/train.json"),
            Path("plots/training.csv"),
        )
    assert out["version"] == "1" and out["registered_model"] == NAME
    return SimpleNamespace(
        root=root, params=params, out=out, models=root / "models", train_images=train_images
    )


@pytest.fixture(scope="module")
def loaded(trained):
    from xrdvision.serve.loading import load_model

    return load_model(trained.params, f"models:/{NAME}@challenger")


@pytest.fixture(scope="module")
def inputs(trained, tmp_path_factory):
    """Good and bad files, in the order they are predicted."""
    from xrdvision.models.features import load_image

    d = tmp_path_factory.mktemp("inputs")
    cod_id, png = next(iter(trained.train_images.items()))
    (d / "empty.xy").write_text("")
    (d / "junk.xy").write_bytes(bytes(range(256)) * 10)
    (d / "scan.raw").write_bytes(b"RAW1.01\x00" * 50)
    Image.fromarray(np.zeros((100, 120, 3), np.uint8)).save(d / "small.png")
    bad_cif = sorted((COD_DIR / "bad").glob("*.cif"))[0]
    files = {
        "train_cif": COD_DIR / f"{cod_id}.cif",
        "train_png": Path(png),
        "unseen_cif": UNSEEN_CIF,
        "rruff": RRUFF,
        "rockjock": ROCKJOCK,
        "pyrochlore": PYROCHLORE,
        "empty": d / "empty.xy",
        "junk": d / "junk.xy",
        "raw": d / "scan.raw",
        "missing": d / "missing.cif",
        "bad_cif": bad_cif,
        "small_png": d / "small.png",
        "folder": d,
    }
    assert load_image(Path(png)).shape == (224, 224, 3)
    return files


@pytest.fixture(scope="module")
def mixed(trained, loaded, inputs):
    from xrdvision.serve.predict import predict_files

    preds = predict_files(list(inputs.values()), trained.params, model=loaded, top_k=3, batch_size=4)
    return dict(zip(inputs, preds, strict=True))


def test_every_input_kind_predicted_bad_files_reported(mixed, inputs, loaded):
    assert [p.file for p in mixed.values()] == [str(v) for v in inputs.values()]
    ok = {k for k, p in mixed.items() if p.ok}
    assert ok == {"train_cif", "train_png", "unseen_cif", "rruff", "rockjock", "pyrochlore"}
    for k in ok:
        p = mixed[k]
        assert p.probabilities.shape == (7,) and p.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
        assert len(p.top) == 3 and p.top[0][0] == loaded.classes[int(np.argmax(p.probabilities))]
        probs = [pr for _, pr in p.top]
        assert probs == sorted(probs, reverse=True)
        assert p.model == f"models:/{NAME}@challenger" and p.label_mode == "crystal_system"
    assert {mixed[k].kind for k in ok} == {"cif", "image", "pattern"}
    expected_errors = {
        "empty": "empty file",
        "junk": "binary file, not a two-column text pattern",
        "raw": (
            "Bruker/Rigaku RAW is a binary format with no maintained reader here; export the pattern as "
            "two-column text"
        ),
        "missing": "file not found",
        "bad_cif": "pymatgen:",
        "small_png": "image is 120x100, expected 224x224",
        "folder": "is a folder; pass the files in it",
    }
    for k, reason in expected_errors.items():
        err = mixed[k].error
        assert err.startswith(f"{inputs[k]}: ") and reason in err and "\n" not in err, err
        assert mixed[k].probabilities is None and mixed[k].top == []


def test_cif_is_simulated_and_rendered_exactly_as_in_training(mixed, trained, inputs):
    """A training CIF predicted from the CIF and from its training PNG gives the same probabilities:
    same simulation, grid, renderer and image, and the PNG round trip is lossless."""
    np.testing.assert_allclose(mixed["train_cif"].probabilities, mixed["train_png"].probabilities, atol=1e-6)
    with open(COD_DIR / "INDEX.csv", newline="") as fh:
        index = {r["cod_id"]: r for r in csv.DictReader(fh)}
    for key in ("train_cif", "unseen_cif"):
        cod_id = Path(inputs[key]).stem
        assert mixed[key].reference == {
            "crystal_system": index[cod_id]["crystal_system"],
            "space_group": index[cod_id]["space_group_number"],
        }
    assert mixed["unseen_cif"].reference["crystal_system"] == "trigonal"


def test_batching_does_not_change_results(trained, loaded, inputs, mixed):
    from xrdvision.serve.predict import predict_files

    keys = ["rockjock", "empty", "unseen_cif", "rruff"]
    one_by_one = predict_files([inputs[k] for k in keys], trained.params, model=loaded, batch_size=1)
    for k, p in zip(keys, one_by_one, strict=True):
        if mixed[k].ok:
            np.testing.assert_allclose(p.probabilities, mixed[k].probabilities, atol=1e-6)
        else:
            assert p.error == mixed[k].error


def test_measured_pattern_notes_and_wavelength_option(trained, loaded, mixed):
    from xrdvision.serve.inputs import Preparer
    from xrdvision.serve.predict import predict_files

    assert mixed["rockjock"].notes[0] == "wavelength 1.5418 A (file)"
    (co,) = predict_files([ROCKJOCK], trained.params, model=loaded, wavelength=1.7902)
    assert co.notes[0] == "wavelength 1.7902 A (argument)"
    prep = Preparer(trained.params)
    cu_img, co_img = prep(ROCKJOCK).image, prep(ROCKJOCK, 1.7902).image
    assert cu_img.shape == co_img.shape == (224, 224, 3)
    # Co K-alpha is longer: the same d-spacings at Cu land at lower angles, i.e. further left
    lit_cu = np.flatnonzero(cu_img[:100].max(axis=(0, 2)) > 128)
    lit_co = np.flatnonzero(co_img[:100].max(axis=(0, 2)) > 128)
    assert lit_co.mean() < lit_cu.mean() - 5


def test_output_formats(mixed, inputs):
    from xrdvision.serve.predict import format_table, to_csv, to_json

    preds = list(mixed.values())
    table = format_table(preds).splitlines()
    assert table[0].split() == ["file", "kind", "label", "1st", "2nd", "3rd", "flag"]
    assert len(table) == 1 + len(preds) + 2
    assert table[-2].startswith(f"{len(preds)} file(s), 7 failed; model models:/{NAME}@challenger")
    assert table[-1] == "class prior train; uncertain: top-1 probability under 50%"
    for p in preds:
        if p.ok:
            assert p.uncertain == (p.top[0][1] < 0.5)
    row = next(line for line in table if line.startswith(str(inputs["unseen_cif"])))
    top = mixed["unseen_cif"].top
    assert row.split()[1:3] == ["cif", "trigonal"] and row.split()[3] == top[0][0]
    assert f"{top[0][1]:.1%}" in row
    err_row = next(line for line in table if line.startswith(str(inputs["empty"])))
    assert err_row.endswith(f"error: {inputs['empty']}: empty file")

    doc = json.loads(to_json(preds))
    assert doc["model"] == f"models:/{NAME}@challenger" and doc["label_mode"] == "crystal_system"
    assert [f["file"] for f in doc["files"]] == [str(v) for v in inputs.values()]
    by = {f["file"]: f for f in doc["files"]}
    rr = by[str(RRUFF)]
    assert rr["status"] == "ok" and rr["error"] is None and len(rr["top"]) == 3
    assert rr["uncertain"] == mixed["rruff"].uncertain
    assert rr["top"][0]["probability"] == pytest.approx(mixed["rruff"].top[0][1], abs=1e-6)
    assert by[str(inputs["junk"])]["status"] == "error" and by[str(inputs["junk"])]["top"] == []

    rows = list(csv.DictReader(to_csv(preds).splitlines()))
    assert len(rows) == len(preds)
    for r, p in zip(rows, preds, strict=True):
        assert r["file"] == p.file and r["status"] == ("ok" if p.ok else "error") and r["error"] == p.error
        if p.ok:
            assert [r["class_1"], r["class_2"], r["class_3"]] == [c for c, _ in p.top]
            assert float(r["p_1"]) >= float(r["p_2"]) >= float(r["p_3"])
            assert r["uncertain"] == ("yes" if p.uncertain else "no")
    assert rows[2]["label"] == "trigonal"


def test_model_uri_forms_give_the_same_model(trained, loaded, inputs):
    """Alias, version, run URI, logged model URI, the DVC models folder and the .keras file: one model,
    six doors; the class list comes from the version tag, the MLflow metadata or classes.json, and the
    input settings travel with each."""
    from xrdvision.models.features import load_image
    from xrdvision.serve.loading import load_model

    x = load_image(inputs["train_png"])[None]
    ref = loaded.predict(x)
    run_id = trained.out["run_id"]
    assert loaded.classes_from == f"model version tag 'classes' ({NAME} v1)"
    assert loaded.run_id == run_id and loaded.registered == (NAME, "1")
    assert loaded.model_id == trained.out["model_id"] and loaded.settings is not None
    cases = {
        f"models:/{NAME}/1": "model version tag 'classes'",
        f"runs:/{run_id}/model": "MLflow model metadata 'classes'",
        f"models:/{trained.out['model_id']}": "MLflow model metadata 'classes'",
        str(trained.models): str(trained.models / "classes.json"),
        str(trained.models / "model.keras"): str(trained.models / "classes.json"),
    }
    for uri, source in cases.items():
        lm = load_model(trained.params, uri)
        assert lm.classes_from.startswith(source), (uri, lm.classes_from)
        assert lm.classes == loaded.classes and lm.label_mode == "crystal_system"
        assert lm.run_id == run_id or uri.startswith("models:/m-"), uri
        assert lm.settings == loaded.settings and lm.warnings == [], uri
        np.testing.assert_allclose(lm.predict(x), ref, atol=1e-5)


def test_default_is_champion_and_a_missing_alias_says_what_exists(trained):
    import mlflow

    from xrdvision.serve.loading import default_model_uri, load_model

    params = trained.params
    assert default_model_uri(params) == f"models:/{NAME}@champion"
    with pytest.raises(XrdVisionError) as info:
        load_model(params)
    assert str(info.value) == (
        f"models:/{NAME}@champion: registered model '{NAME}' has no alias 'champion'; it has "
        f"@challenger -> v1 (e.g. models:/{NAME}@challenger)"
    )
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(NAME, "champion", "1")
    try:
        lm = load_model(params)
        assert lm.uri == f"models:/{NAME}@champion" and lm.registered == (NAME, "1")
    finally:
        client.delete_registered_model_alias(NAME, "champion")


def _old_model_folder(trained, root: Path) -> Path:
    """The models/ folder as train wrote it before input settings were stored (no preprocessing.json)."""
    old = root / "old-models"
    old.mkdir()
    for name in ("model.keras", "classes.json", "run.json"):
        (old / name).symlink_to(trained.models / name)
    return old


def test_inputs_are_prepared_with_the_models_own_settings(trained, loaded, mixed, inputs, tmp_path):
    """The settings stored with the model decide how a file becomes an image, whatever params.yaml says
    now; an older model without them falls back to params (with a warning naming what differs from its
    training run), or fails in one line when there are no params."""
    from xrdvision.serve.loading import load_model
    from xrdvision.serve.predict import format_table, predict_files, to_json

    assert loaded.warnings == [] and mixed["rruff"].warnings == []
    assert loaded.settings["simulate"]["step"] == 0.02 and loaded.settings["render"]["size"] == 224
    changed = replace(trained.params, simulate=replace(trained.params.simulate, step=0.01, kalpha2=True))
    keys = ["unseen_cif", "rruff"]
    same = predict_files([inputs[k] for k in keys], changed, model=load_model(changed, str(trained.models)))
    for k, p in zip(keys, same, strict=True):
        np.testing.assert_allclose(p.probabilities, mixed[k].probabilities, atol=1e-6)
        assert p.warnings == []

    old = _old_model_folder(trained, tmp_path)
    lm = load_model(changed, str(old))
    assert lm.settings is None and lm.warnings == [
        f"{old}: the model carries no input settings (trained before they were stored with it); inputs "
        "are prepared with params.yaml's simulate/render settings",
        "simulate.kalpha2 is True here but the model was trained with False",
        "simulate.step is 0.01 here but the model was trained with 0.02",
    ]
    (pred,) = predict_files([inputs["unseen_cif"]], changed, model=lm)
    assert not np.allclose(pred.probabilities, mixed["unseen_cif"].probabilities, atol=1e-6)
    assert format_table([pred]).splitlines()[-3:] == [f"warning: {w}" for w in lm.warnings]
    assert json.loads(to_json([pred]))["warnings"] == lm.warnings
    with pytest.raises(XrdVisionError) as err:
        load_model(None, str(old))
    assert str(err.value) == (
        f"{old}: the model carries no input settings (trained before they were stored with it) and there "
        "is no params.yaml here to take them from: run where its params.yaml is, or pass --params"
    )


def test_predict_from_a_folder_without_params_yaml(
    trained, loaded, mixed, inputs, tmp_path, capsys, monkeypatch
):
    """A scientist's data folder: no params.yaml. The models/ folder, or a registry URI with
    MLFLOW_TRACKING_URI, predicts exactly as in the checkout, and nothing is written there."""
    from xrdvision.cli import main

    work = tmp_path / "my-scans"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("XRDVISION_PARAMS", raising=False)
    keys = ["unseen_cif", "rruff"]
    files = [str(inputs[k]) for k in keys]

    def predict(model: str) -> list[np.ndarray]:
        """All 7 probabilities per file, in the model's class order, from ``xrdvision predict --json``."""
        assert main(["predict", "--model", model, "--json", "--top-k", "7", *files]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["warnings"] == [] and [f["file"] for f in doc["files"]] == files
        return [
            np.array([{t["class"]: t["probability"] for t in f["top"]}[c] for c in loaded.classes])
            for f in doc["files"]
        ]

    for key, probs in zip(keys, predict(str(trained.models)), strict=True):
        np.testing.assert_allclose(probs, mixed[key].probabilities, atol=1e-5)

    # the registry: no params.yaml names the store, so MLFLOW_TRACKING_URI must
    uri = f"models:/{NAME}@challenger"
    assert main(["predict", "--model", uri, files[0]]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"xrdvision: error: {uri}: no params.yaml here and MLFLOW_TRACKING_URI is not set")
    assert len(err.splitlines()) == 1
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.params.mlflow.tracking_uri)
    for key, probs in zip(keys, predict(uri), strict=True):
        np.testing.assert_allclose(probs, mixed[key].probabilities, atol=1e-5)

    # an older models/ folder (no stored settings) and no params.yaml: one clear line
    old = _old_model_folder(trained, tmp_path)
    assert main(["predict", "--model", str(old), files[0]]) == 1
    assert capsys.readouterr().err.strip() == (
        f"xrdvision: error: {old}: the model carries no input settings (trained before they were stored "
        "with it) and there is no params.yaml here to take them from: run where its params.yaml is, or "
        "pass --params"
    )
    assert list(work.iterdir()) == []  # no mlruns/ or anything else left in the user's folder


def test_error_line_names_the_file_once_and_keeps_one_line():
    """A failed file's line: an InputError as it is, an XrdVisionError with the path prefixed once, an
    unexpected exception as the path and ``errors.one_line`` (its type and first message line)."""
    from xrdvision.serve.inputs import error_line

    path = Path("scans/a.xy")
    assert error_line(path, InputError(path, "empty file")) == "scans/a.xy: empty file"
    assert error_line(path, XrdVisionError("no\n  signal")) == "scans/a.xy: no signal"
    assert error_line(path, XrdVisionError("scans/a.xy: bad")) == "scans/a.xy: bad"
    assert error_line(path, ValueError("broken\ntraceback detail")) == "scans/a.xy: ValueError: broken"
    assert error_line(path, KeyError()) == "scans/a.xy: KeyError"


def test_bad_model_references(trained, tmp_path):
    from xrdvision.serve.loading import load_model

    params = trained.params
    with pytest.raises(XrdVisionError, match=r"models:/nope@champion: no registered model 'nope'"):
        load_model(params, "models:/nope@champion")
    with pytest.raises(
        XrdVisionError, match=rf"models:/{NAME}/9: registered model '{NAME}' has no version 9"
    ):
        load_model(params, f"models:/{NAME}/9")
    with pytest.raises(XrdVisionError, match=r"model not found"):
        load_model(params, str(tmp_path / "nothing.keras"))
    # a .keras file on its own: the class order of its output width, said so
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "m.keras").symlink_to(trained.models / "model.keras")
    lm = load_model(params, str(lone / "m.keras"))
    assert lm.classes_from == "default crystal_system class order (no class list stored with the model)"
    # a class list that does not fit the model is refused, not used
    (lone / "classes.json").write_text(json.dumps({"mode": "crystal_system", "classes": ["a", "b", "c"]}))
    with pytest.raises(XrdVisionError, match=r"model has 7 outputs but its class list .* has 3 names"):
        load_model(params, str(lone / "m.keras"))


def _subset_folder(root: Path) -> Path:
    """A measured folder like ../shared/experimental with 7 of its rows: 2 RRUFF, 2 RockJock (one
    without a crystal system), 1 pyrochlore, 1 missing file, 1 corrupt copy. Files are symlinks."""
    with open(EXPERIMENTAL_DIR / "INDEX.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    by_file = {r["file"]: r for r in rows}
    pick = [
        "rruff_agi/rruff_agi_0016_sg225.xy",
        "rruff_agi/rruff_agi_0013_sg002.xy",
        "rockjock/rockjock_pyrite.xy",
        "rockjock/rockjock_calcite.xy",
        "other/RbNb2O5F_pxrd.xy",
    ]
    unlabelled = next(r for r in rows if r["file"].startswith("rockjock/") and not r["crystal_system"])
    folder = root / "measured"
    chosen = [by_file[f] for f in pick] + [unlabelled]
    for r in chosen:
        (folder / r["file"]).parent.mkdir(parents=True, exist_ok=True)
        (folder / r["file"]).symlink_to(EXPERIMENTAL_DIR / r["file"])
    missing = {**by_file[pick[2]], "file": "rockjock/not_there.xy"}
    corrupt = {**by_file[pick[3]], "file": "rockjock/corrupt.xy"}
    (folder / "rockjock" / "corrupt.xy").write_text("# header\n" + "12.0 abc\n" * 60)
    with open(folder / "INDEX.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([*chosen, missing, corrupt])
    return folder


def test_evaluate_measured_on_real_patterns(trained, loaded, tmp_path, caplog):
    import mlflow

    from xrdvision.serve.evaluate_measured import run_evaluate_measured
    from xrdvision.serve.predict import predict_files

    folder = _subset_folder(tmp_path)
    params = replace(trained.params, measured=replace(trained.params.measured, folder=str(folder)))
    out = tmp_path / "reports" / "measured"
    with caplog.at_level(logging.WARNING, logger="xrdvision"):
        m = run_evaluate_measured(
            params, f"models:/{NAME}@challenger", tmp_path / "metrics" / "measured.json", out
        )

    assert m["skipped"] is False and m["label_mode"] == "crystal_system"
    assert (m["n_index"], m["n"], m["n_unlabelled"], m["n_failed"]) == (8, 5, 1, 2)
    assert {s: d["n"] for s, d in m["per_source"].items()} == {"rruff_agi": 2, "rockjock": 2, "other": 1}
    assert {c: d["n"] for c, d in m["per_class"].items()} == {"triclinic": 1, "trigonal": 1, "cubic": 3}

    preds = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    assert [p["file"] for p in preds] == [
        "rruff_agi/rruff_agi_0016_sg225.xy",
        "rruff_agi/rruff_agi_0013_sg002.xy",
        "rockjock/rockjock_pyrite.xy",
        "rockjock/rockjock_calcite.xy",
        "other/RbNb2O5F_pxrd.xy",
    ]
    assert [p["actual"] for p in preds] == ["cubic", "triclinic", "cubic", "trigonal", "cubic"]
    correct = np.array([int(p["correct"]) for p in preds])
    assert m["measured_accuracy"] == pytest.approx(correct.mean())
    assert m["measured_accuracy_ci95_low"] <= m["measured_accuracy"] <= m["measured_accuracy_ci95_high"]
    assert m["per_source"]["rruff_agi"]["accuracy"] == pytest.approx(correct[:2].mean())
    assert m["measured_majority_baseline_accuracy"] == pytest.approx(3 / 5)
    # balanced accuracy: the mean over the true classes of the fraction right (scikit-learn's)
    recall = [correct[[p["actual"] == c for p in preds]].mean() for c in ("cubic", "triclinic", "trigonal")]
    assert m["measured_balanced_accuracy"] == pytest.approx(np.mean(recall))
    # the same pipeline as `predict`: the same probabilities for the same file
    direct = predict_files([EXPERIMENTAL_DIR / "rockjock" / "rockjock_pyrite.xy"], params, model=loaded)[0]
    assert float(preds[2]["p_predicted"]) == pytest.approx(direct.top[0][1], abs=1e-4)
    assert preds[2]["predicted"] == direct.top[0][0]

    failures = list(csv.DictReader((out / "failures.csv").read_text().splitlines()))
    assert [f["file"] for f in failures] == ["rockjock/not_there.xy", "rockjock/corrupt.xy"]
    assert failures[0]["reason"].endswith("not_there.xy: file not found")
    assert "line 2: 'abc' is not a number" in failures[1]["reason"]
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(skipped) == 2 and "not_there.xy: file not found" in skipped[0] and "corrupt.xy" in skipped[1]
    # the report tables keep the csv module's row ending
    head = (out / "predictions.csv").read_bytes().split(b"\n", 1)[0]
    assert head == b"file,source,half,actual,predicted,p_predicted,p_actual,top3,correct\r"

    matrix = list(csv.reader((out / "confusion_matrix.csv").read_text().splitlines()))
    assert sum(int(v) for r in matrix[1:] for v in r[1:]) == 5
    assert Image.open(out / "confusion_matrix.png").size[0] > 300
    on_disk = json.loads((tmp_path / "metrics" / "measured.json").read_text())
    assert on_disk["measured_accuracy"] == m["measured_accuracy"] and on_disk["per_source"] == m["per_source"]
    assert "accuracy" not in on_disk

    client = mlflow.MlflowClient()
    assert m["mlflow_run_id"] == trained.out["run_id"]
    run = client.get_run(m["mlflow_run_id"])
    assert run.data.metrics["measured_accuracy"] == pytest.approx(m["measured_accuracy"])
    assert run.data.metrics["measured_balanced_accuracy"] == pytest.approx(m["measured_balanced_accuracy"])
    assert run.data.metrics["measured_rockjock_n"] == 2
    # INDEX.csv as the measured dataset; the figures linked to the logged model and to that dataset
    (ds,) = [d for d in run.inputs.dataset_inputs if d.dataset.name == "measured-measured"]
    assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "measured"
    assert json.loads(ds.dataset.profile)["patterns_per_class"] == {"cubic": 4, "triclinic": 1, "trigonal": 2}
    linked = {x.key: x for x in client.get_logged_model(trained.out["model_id"]).metrics}
    assert linked["measured_balanced_accuracy"].dataset_name == "measured-measured"
    arts = {a.path for a in client.list_artifacts(m["mlflow_run_id"], "measured")}
    assert {"measured/predictions.csv", "measured/confusion_matrix.png"} <= arts
    tags = client.get_model_version(NAME, "1").tags
    assert float(tags["measured_accuracy"]) == pytest.approx(m["measured_accuracy"], abs=1e-6)
    assert float(tags["measured_balanced_accuracy"]) == pytest.approx(
        m["measured_balanced_accuracy"], abs=1e-6
    )


def test_evaluate_measured_skipped_without_a_folder(trained, tmp_path):
    from xrdvision.serve.evaluate_measured import run_evaluate_measured

    # the model is not even looked at: a path that does not exist is fine here
    empty = replace(trained.params, measured=replace(trained.params.measured, folder=""))
    m = run_evaluate_measured(empty, tmp_path / "no-model", tmp_path / "m.json", tmp_path / "out")
    assert m == {"skipped": True, "reason": "params measured.folder is empty"}
    assert json.loads((tmp_path / "m.json").read_text()) == m
    assert not (tmp_path / "out").exists()
    # a folder that is not there (a clone without ../shared/) is reported skipped, with its path
    gone = replace(trained.params, measured=replace(trained.params.measured, folder=str(tmp_path / "nope")))
    m = run_evaluate_measured(gone, tmp_path / "no-model", tmp_path / "m.json", tmp_path / "out")
    assert m["skipped"] is True and str(tmp_path / "nope") in m["reason"]


def test_evaluate_measured_reports_each_half(trained, tmp_path):
    """With a split table: tuning_half_* and report_half_* beside measured_*, the ECE, a half column."""
    from xrdvision.serve.evaluate_measured import run_evaluate_measured

    folder = _subset_folder(tmp_path)
    params = replace(trained.params, measured=replace(trained.params.measured, folder=str(folder)))
    split = tmp_path / "split.csv"
    split.write_text(
        "file,half\nrruff_agi/rruff_agi_0016_sg225.xy,tuning\nrruff_agi/rruff_agi_0013_sg002.xy,tuning\n"
        "rockjock/rockjock_pyrite.xy,report\nrockjock/rockjock_calcite.xy,report\n"
    )
    out = tmp_path / "out"
    m = run_evaluate_measured(params, f"models:/{NAME}@challenger", tmp_path / "m.json", out, split)
    assert (m["n_tuning_half"], m["n_report_half"], m["n_not_in_split"]) == (2, 2, 1)
    preds = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    for h in ("tuning", "report"):
        correct = [int(p["correct"]) for p in preds if p["half"] == h]
        assert m[f"{h}_half_accuracy"] == pytest.approx(np.mean(correct))
        assert 0 <= m[f"{h}_half_ece"] <= 1 and f"{h}_half_balanced_accuracy" in m
    assert 0 <= m["measured_ece"] <= 1 and m["split"] == str(split)
    assert "report_half_accuracy" in json.loads((tmp_path / "m.json").read_text())


def test_serving_payload_is_the_predicted_image(trained, inputs):
    from xrdvision.serve.inputs import Preparer
    from xrdvision.serve.predict import serving_payload

    payload = serving_payload(inputs["unseen_cif"], trained.params)
    x = np.asarray(payload["inputs"], dtype=np.float32)
    assert x.shape == (1, 224, 224, 3) and x.min() == 0 and x.max() == 255
    np.testing.assert_array_equal(x[0], Preparer(trained.params)(inputs["unseen_cif"]).image)
    assert json.loads(json.dumps(payload))["inputs"][0][223][0] == x[0, 223, 0].tolist()
    with pytest.raises(InputError, match=r"empty\.xy: empty file"):
        serving_payload(inputs["empty"], trained.params)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_like_predict(trained, mixed, inputs):
    """The registered challenger served by `mlflow models serve` on 127.0.0.1 scores a CIF's image
    as predict_files does (~15 s: the server imports TensorFlow and loads the model)."""
    from xrdvision.serve.predict import serving_payload

    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": trained.params.mlflow.tracking_uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    mlflow_bin = shutil.which("mlflow", path=env["PATH"])
    assert mlflow_bin is not None
    cmd = [mlflow_bin, "models", "serve", "-m", f"models:/{NAME}@challenger", "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port)]
    log = trained.root / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"server exited ({proc.returncode}): {log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"server not up after 180 s: {log.read_text()[-2000:]}"
            time.sleep(1)
        body = json.dumps(serving_payload(inputs["unseen_cif"], trained.params)).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
    served = np.asarray(answer["predictions"], dtype=np.float64)
    assert served.shape == (1, 7)
    np.testing.assert_allclose(served[0], mixed["unseen_cif"].probabilities, atol=1e-5)


def test_predict_command_json_csv_and_exit_status(trained, inputs, tmp_path, capsys, monkeypatch):
    """``xrdvision predict`` as a user types it: the registry's challenger, JSON / CSV / table, one
    error line per bad file on stderr, exit status 1 when any file failed and 0 when none did."""
    import yaml

    from xrdvision.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tmp_path / "params.yaml"
    cfg.write_text(
        yaml.safe_dump({"mlflow": {"tracking_uri": trained.params.mlflow.tracking_uri, "experiment": "test"}})
    )
    model = ["--model", f"models:/{NAME}@challenger"]
    good = [str(inputs["unseen_cif"]), str(inputs["rruff"])]

    assert (
        main(["--params", str(cfg), "predict", *model, "--json", "--top-k", "2", *good, str(inputs["empty"])])
        == 1
    )
    out, err = capsys.readouterr()
    doc = json.loads(out)
    files = {f["file"]: f for f in doc["files"]}
    assert set(files) == {*good, str(inputs["empty"])}
    assert all(len(files[g]["top"]) == 2 for g in good)
    assert "empty file" in files[str(inputs["empty"])]["error"]
    assert err.count("xrdvision: error:") == 1 and "empty.xy" in err and "Traceback" not in err

    assert main(["--params", str(cfg), "predict", *model, "--csv", *good]) == 0
    out, _ = capsys.readouterr()
    rows = list(csv.DictReader(out.splitlines()))
    assert [r["file"] for r in rows] == good

    assert main(["--params", str(cfg), "predict", *model, str(inputs["rockjock"])]) == 0
    out, _ = capsys.readouterr()
    assert "rockjock_pyrite.xy" in out and "%" in out

    # no champion yet in this registry: a one-line error naming the alias
    assert main(["--params", str(cfg), "predict", *good]) == 1
    _, err = capsys.readouterr()
    assert "champion" in err and len(err.strip().splitlines()) == 1


def test_class_prior_and_uncertain_flag_follow_params(trained, loaded, mixed, inputs, tmp_path):
    """measured.prior reweights the calibrated probabilities by new / training class frequencies (stored
    with the model), measured.uncertain_below flags low top-1 probabilities; a prior file naming a class
    the model lacks, or a prior a model without stored frequencies cannot apply, is one line."""
    from xrdvision.models.calibration import correct_prior
    from xrdvision.serve.predict import predict_files

    train_prior = np.asarray(loaded.train_prior)
    assert train_prior.shape == (len(loaded.classes),) and train_prior.sum() == pytest.approx(1, abs=1e-4)
    m = trained.params.measured
    uniform = replace(trained.params, measured=replace(m, prior="uniform", uncertain_below=0.9))
    (p,) = predict_files([RRUFF], uniform, model=loaded)
    seen = (train_prior > 0) / (train_prior > 0).sum()
    want = correct_prior(mixed["rruff"].probabilities[None], train_prior, seen)[0]
    np.testing.assert_allclose(p.probabilities, want, atol=1e-6)  # float32 model outputs
    assert p.uncertain == (p.probabilities.max() < 0.9) and "class prior uniform" in p.calibration

    prior_csv = tmp_path / "prior.csv"
    prior_csv.write_text("class,weight\nmonoclinic,3\northorhombic,1\n")
    (q,) = predict_files(
        [RRUFF], replace(trained.params, measured=replace(m, prior=str(prior_csv))), model=loaded
    )
    assert set(np.flatnonzero(q.probabilities > 0)) <= {
        loaded.classes.index("monoclinic"),
        loaded.classes.index("orthorhombic"),
    }
    prior_csv.write_text("class,weight\nrhombic,1\n")
    with pytest.raises(XrdVisionError, match="class 'rhombic' is not one of the model's classes"):
        predict_files(
            [RRUFF], replace(trained.params, measured=replace(m, prior=str(prior_csv))), model=loaded
        )

    old = _old_model_folder(trained, tmp_path)
    from xrdvision.serve.loading import load_model

    with pytest.raises(XrdVisionError, match="needs the model's training class frequencies"):
        predict_files([RRUFF], uniform, model=load_model(uniform, str(old)))
