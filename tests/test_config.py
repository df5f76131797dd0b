"""params.yaml validation: the shipped file is valid and every kind of mistake names its key."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from pydantic import ValidationError

from conftest import ROOT
from xrdvision.config import Params, SplitParams, default_params_dict, load_params, parse_params
from xrdvision.errors import ConfigError


def test_shipped_params_are_the_documented_defaults():
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert parse_params(data) == Params()
    assert data == default_params_dict()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"simulate": {"two_theta_mx": 80}},
            "simulate.two_theta_mx: unknown key (did you mean simulate.two_theta_max?)",
        ),
        ({"simulat": {}}, "simulat: unknown key (did you mean simulate?)"),
        ({"simulate": {"wavelength": -1.5}}, "simulate.wavelength: must be > 0"),
        ({"simulate": {"two_theta_min": 90, "two_theta_max": 10}}, "two_theta_min < two_theta_max"),
        ({"split": {"train": 0.8}}, "must sum to 1 (they sum to 1.1)"),
        (
            {"split": {"train_sources": ["cod", "icsd"]}},
            "split.train_sources.1: 'icsd' is not one of cod, mp",
        ),
        (
            {"split": {"train_sources": []}},
            "split.train_sources: need one or more of cod, mp, synth, each once",
        ),
        (
            {"mp": {"scheduler": "dask-head:8786"}},
            "mp.scheduler: 'dask-head:8786' is neither local nor a Dask",
        ),
        ({"mp": {"max_structures": -1}}, "mp.max_structures: must be >= 0"),
        ({"mp": {"max_structure": 10}}, "mp.max_structure: unknown key (did you mean mp.max_structures?)"),
        ({"seed": "42"}, "seed: expected an integer"),
        ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer"),
        ({"simulate": {"kalpha2": "yes"}}, "simulate.kalpha2: expected true/false"),
        (
            {"labels": {"mode": "spacegroup"}},
            "labels.mode: 'spacegroup' is not one of crystal_system, space_group",
        ),
        ({"model": {"dense": []}}, "model.dense: need 1-3 positive layer widths"),
        ({"augment": {"fwhm_range": [0.2, 0.1]}}, "augment.fwhm_range"),
        ({"model": {"trainable_conv": 14}}, "model.trainable_conv: must be in [0, 13]"),
        ({"simulate": []}, "simulate: expected a mapping"),
        ({"simulate": {"eta": 2}}, "simulate.eta: must be in [0, 1]"),
        ({"augment": {"strain": 0.5}}, "augment.strain: must be in [0, 0.1)"),
        ({"simulate": {"step": 10.0}}, "simulate.step: must give at least 10 points"),
        ({"model": {"dense": [256, "wide"]}}, "model.dense.1: expected an integer, got 'wide'"),
        ({"ingest": {"cod_query": {1: "Si"}}}, "ingest.cod_query.1: expected a string"),
        (
            {"ingest": {"embedded": "data/embedded"}},
            "ingest.embedded: expected a tar archive of CIFs (.tar, .tar.gz, .tgz, .tar.xz, .txz, .tar.bz2, "
            ".tbz2); for a folder use ingest.source: folder",
        ),
        (
            {"ingest": {"embedded_dir": "data/embedded"}},
            "ingest.embedded_dir: unknown key (did you mean ingest.embedded?)",
        ),
        ({1: {}}, "params: 1: unknown key"),
        ({"seed": True}, "seed: expected an integer, got True"),
        ({"train": {"learning_rate": "1e-4"}}, "train.learning_rate: expected a number, got '1e-4'"),
    ],
)
def test_invalid_params_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        parse_params(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_int_widens_to_float_and_partial_sections_keep_defaults():
    p = parse_params({"simulate": {"two_theta_max": 80}})
    assert p.simulate.two_theta_max == 80.0 and isinstance(p.simulate.two_theta_max, float)
    assert p.simulate.two_theta_min == 5.0 and p.train == Params().train


def test_load_params_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope.yaml: params file not found"):
        load_params(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("simulate:\n  step: [0.1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+ not valid YAML"):
        load_params(broken)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  epoch: 3\n")
    with pytest.raises(
        ConfigError, match=r"typo.yaml: params: train.epoch: unknown key \(did you mean train.epochs\?\)"
    ):
        load_params(typo)


def test_flat_keys_are_what_dvc_exp_run_S_takes():
    flat = Params().flat()
    assert flat["simulate.two_theta_max"] == 90.0
    assert flat["seed"] == 42
    n_leaves = sum(
        len(dataclasses.fields(getattr(Params(), f.name)))
        if dataclasses.is_dataclass(getattr(Params(), f.name))
        else 1
        for f in dataclasses.fields(Params)
    )
    assert len(flat) == n_leaves


def test_copies_are_validated_too():
    """``dataclasses.replace`` (how the code derives settings) validates the copy like params.yaml."""
    p = Params()
    assert dataclasses.replace(p, seed=7).seed == 7 and p.seed == 42
    with pytest.raises(ValidationError, match="must sum to 1"):
        dataclasses.replace(p.split, train=0.9)
    with pytest.raises(ValidationError):
        SplitParams(train="0.7")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.seed = 1
