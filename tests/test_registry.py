"""Promotion through a real MLflow model registry (sqlite store in a temp dir) with real Keras models.

Two kinds of registered versions: a model whose head was trained on the tiny synthetic patterns
(good) and the same network with an untrained head (poor). Promotion is checked both ways.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from helpers_images import make_split_data
from helpers_images import tune_params as _params
from xrdvision.errors import XrdVisionError

NAME = "xrdvision-crystal-system"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Tiny images and split lists (read-only); features are made by the test that trains."""
    root = tmp_path_factory.mktemp("tiny_registry")
    make_split_data(root)
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One MLflow store for the quick tests (creating one costs seconds); each uses its own model name."""
    return tmp_path_factory.mktemp("registry_store")


def _quick_params(store: Path, request) -> tuple:
    """Params pointing at the shared store, with a registered model name unique to the test."""
    prefix = "t-" + hashlib.md5(request.node.name.encode()).hexdigest()[:10]
    p = _params(store, mlflow={"registered_model_prefix": prefix})
    return p, f"{prefix}-crystal-system"


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _client(p):
    import mlflow

    from xrdvision.tracking import runs

    runs.setup(p.mlflow)
    return mlflow.MlflowClient()


def _register(p, tiny: Path, work: Path, trained: bool) -> str:
    """Train (or not) a tail, then log + register it as the train stage does; returns the version."""
    import mlflow

    from xrdvision.crystal.labels import class_names
    from xrdvision.models.features import load_features
    from xrdvision.models.train import fit_tail, log_and_register
    from xrdvision.models.vgg16 import build_model, resolve_weights
    from xrdvision.tracking import runs

    runs.setup(p.mlflow)
    runs.use_experiment(p.mlflow)
    classes = class_names("crystal_system")
    with mlflow.start_run():
        if trained:
            train = load_features(work / "data/features/train.npz")
            val = load_features(work / "data/features/val.npz")
            net, _, _ = fit_tail(p, train, val, weights=resolve_weights(), verbose=0)
        else:
            net = build_model(len(classes), p.model, weights=resolve_weights(), seed=p.seed + 1)
        version = log_and_register(net.full, p, classes)["version"]
    return version


def _aliases(client, name: str = NAME) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


@pytest.mark.slow  # ~60 s on 2 cores: five contests, each loading and running two VGG16 models
@pytest.mark.needs_shared("weights")
def test_promotion_both_ways_with_real_models(tiny, work):
    from xrdvision.models.features import run_features
    from xrdvision.models.scoring import test_split_scorer
    from xrdvision.tracking.registry import format_models_table, list_models, promote

    p = _params(work)
    run_features(p, tiny / "data/split", tiny / "data/images", work / "data/features")
    score = test_split_scorer(p, tiny / "data/split", tiny / "data/images")
    with pytest.raises(XrdVisionError, match=rf"no registered model '{NAME}'"):
        promote(p, score)
    assert list_models(p) == []
    client = _client(p)

    # The first model becomes champion without a contest.
    poor = _register(p, tiny, work, trained=False)
    first = promote(p, score)
    assert first["decision"] == "first" and first["champion"] is None and first["n_test"] == 9
    assert _aliases(client) == {"challenger": poor, "champion": poor}
    assert first["line"].startswith(f"promote: {NAME} v{poor} is the first champion (test_accuracy ")

    # A better challenger is promoted; both figures, measured on the same 9 test images, are recorded.
    good = _register(p, tiny, work, trained=True)
    won = promote(p, score)
    assert won["decision"] == "promoted" and won["promoted"], won["line"]
    assert won["challenger"]["test_accuracy"] > won["champion"]["test_accuracy"]
    assert won["challenger"]["n_test"] == won["champion"]["n_test"] == 9
    assert _aliases(client) == {"challenger": good, "champion": good}
    mv = client.get_model_version(NAME, good)
    assert mv.tags["promotion.decision"] == "promoted" and mv.tags["promotion.metric"] == "test_accuracy"
    assert float(mv.tags["promotion.challenger_test_accuracy"]) == pytest.approx(
        won["challenger"]["test_accuracy"], abs=1e-6
    )
    assert float(mv.tags["promotion.champion_test_accuracy"]) == pytest.approx(
        won["champion"]["test_accuracy"], abs=1e-6
    )
    assert mv.tags["promotion.champion_version"] == poor
    assert f"v{good} is the new champion" in mv.description
    assert (
        f"v{good} is the new champion"
        in client.get_model_version(NAME, poor).tags["promotion.last_challenge"]
    )

    # A worse challenger is not promoted: the champion alias stays where it was.
    client.set_registered_model_alias(NAME, "challenger", poor)
    lost = promote(p, score)
    assert lost["decision"] == "rejected" and not lost["promoted"]
    assert lost["challenger"]["test_accuracy"] < lost["champion"]["test_accuracy"]
    assert _aliases(client) == {"challenger": poor, "champion": good}
    mv_poor = client.get_model_version(NAME, poor)
    assert mv_poor.tags["promotion.decision"] == "rejected"
    lines = mv_poor.description.splitlines()  # appended: its first contest, v2's win over it, this one
    assert len(lines) == 3 and "first champion" in lines[0] and "new champion" in lines[1]
    assert "stays champion" in lines[2]
    assert lost["line"] == (
        f"promote: {NAME} v{good} stays champion; challenger not higher: test_accuracy "
        f"{lost['challenger']['test_accuracy']:.4f} (v{poor}) vs {lost['champion']['test_accuracy']:.4f} "
        f"(v{good}) on 9 test structures"
    )
    # The same figures as the first contest: same models, same test split.
    assert lost["challenger"]["test_accuracy"] == pytest.approx(won["champion"]["test_accuracy"])

    # --force promotes regardless, and says so.
    forced = promote(p, score, force=True)
    assert forced["decision"] == "forced" and _aliases(client)["champion"] == poor
    assert client.get_model_version(NAME, poor).tags["promotion.decision"] == "forced"
    again = promote(p, score)
    assert again["decision"] == "unchanged" and "already champion" in again["line"]

    # `models`: every version, newest first, with aliases and the evaluate stage's test figures.
    client.set_model_version_tag(NAME, good, "test_accuracy", "0.888889")  # as the evaluate stage does
    rows = list_models(p)
    assert [r["version"] for r in rows] == [good, poor]
    assert rows[0]["aliases"] == [] and rows[1]["aliases"] == ["challenger", "champion"]
    assert rows[0]["test_accuracy"] == pytest.approx(0.888889) and rows[1]["test_accuracy"] is None
    assert rows[0]["promotion"] == "promoted" and rows[1]["promotion"] == "forced"
    table = format_models_table(rows)
    assert table.splitlines()[0] == f"{NAME}:" and "challenger,champion" in table and "0.8889" in table


def test_decision_rule():
    from xrdvision.tracking.registry import decide, is_better

    assert is_better(0.8, 0.7, "test_accuracy") and not is_better(0.7, 0.8, "test_accuracy")
    assert is_better(0.3, 0.5, "test_loss") and not is_better(0.5, 0.3, "test_loss")
    assert is_better(0.3, 0.5, "loss")  # promote.metric's own spelling names the same figure
    assert not is_better(0.8, 0.8, "test_macro_f1")  # a tie keeps the champion
    assert not is_better(float("nan"), 0.1, "test_accuracy") and is_better(0.1, float("nan"), "test_accuracy")
    ch, cp = {"test_accuracy": 0.6, "test_loss": 0.9}, {"test_accuracy": 0.7, "test_loss": 1.2}
    assert decide(ch, None, "test_accuracy") == ("first", True)
    assert decide(ch, cp, "test_accuracy") == ("rejected", False)
    assert decide(ch, cp, "test_loss") == ("promoted", True)
    assert decide(ch, cp, "test_accuracy", force=True) == ("forced", True)


def _bare_registry(p, name: str, versions: int):
    """Registered versions without model files (enough for the registry's own error paths)."""
    client = _client(p)
    client.create_registered_model(name)
    for _ in range(versions):
        client.create_model_version(name, "file:///nowhere/model", tags={"label_mode": "crystal_system"})
    return client


def _never_called(uri: str) -> dict:
    raise AssertionError(f"scored {uri} although the registry checks failed")


def _figures(accuracy: float, loss: float) -> dict[str, float]:
    """Test figures as the scorer names them (``test_*``)."""
    return {
        "test_accuracy": accuracy,
        "test_loss": loss,
        "test_macro_f1": accuracy - 0.1,
        "test_top3_accuracy": 1.0,
    }


def _fake_scores(figures: dict[str, dict[str, float]], split_md5: str = "a" * 32):
    """A scoring function as promote receives it: model URI -> figures on one test split."""
    scored: list[str] = []

    def score(uri: str) -> dict:
        scored.append(uri)
        return {**figures[uri.rsplit("/", 1)[1]], "n_test": 9, "test_split_md5": split_md5}

    return score, scored


def test_promote_takes_its_scores_from_the_caller(store, request):
    """The registry moves aliases and records figures; scoring a model is the caller's function."""
    from xrdvision.tracking.registry import promote

    p, name = _quick_params(store, request)
    client = _bare_registry(p, name, 2)
    figures = {"1": _figures(0.5, 1.2), "2": _figures(0.7, 0.9)}
    client.set_registered_model_alias(name, "challenger", "1")
    score, scored = _fake_scores(figures)
    first = promote(p, score)
    assert first["decision"] == "first" and scored == [f"models:/{name}/1"]
    assert first["n_test"] == 9 and first["test_split_md5"] == "a" * 32

    client.set_registered_model_alias(name, "challenger", "2")
    score, scored = _fake_scores(figures)
    won = promote(p, score)
    assert won["decision"] == "promoted" and scored == [f"models:/{name}/2", f"models:/{name}/1"]
    assert _aliases(client, name) == {"challenger": "2", "champion": "2"}
    tags = client.get_model_version(name, "2").tags
    assert tags["promotion.metric"] == "test_accuracy"
    assert tags["promotion.challenger_test_accuracy"] == "0.700000"
    assert tags["promotion.champion_test_loss"] == "1.200000"
    assert tags["promotion.test_split_md5"] == "a" * 32 and tags["promotion.n_test"] == "9"


def test_scores_from_two_test_splits_are_not_compared(store, request):
    from xrdvision.tracking.registry import promote

    p, name = _quick_params(store, request)
    client = _bare_registry(p, name, 2)
    client.set_registered_model_alias(name, "champion", "1")
    client.set_registered_model_alias(name, "challenger", "2")
    md5 = iter(["a" * 32, "b" * 32])

    def score(uri: str) -> dict:
        return {**_figures(0.9, 0.1), "n_test": 9, "test_split_md5": next(md5)}

    with pytest.raises(XrdVisionError, match=r"scored now on different test splits"):
        promote(p, score)
    assert _aliases(client, name) == {"champion": "1", "challenger": "2"}
    assert "promotion.decision" not in client.get_model_version(name, "2").tags


def test_versions_scored_on_different_test_splits_are_not_compared_unless_forced(store, request):
    """The evaluate stage tags each version with its test split's md5: a champion from another split is
    refused in one line before any model is scored, and so is a split that changed since both were
    scored; --force promotes anyway and says so."""
    from xrdvision.tracking.registry import promote

    p, name = _quick_params(store, request)
    client = _bare_registry(p, name, 3)
    client.set_registered_model_alias(name, "champion", "1")
    client.set_registered_model_alias(name, "challenger", "2")
    for version, md5 in (("1", "b" * 32), ("2", "a" * 32), ("3", "a" * 32)):
        client.set_model_version_tag(name, version, "test_split_md5", md5)
    figures = {v: _figures(0.5 + 0.1 * int(v), 1.0) for v in ("1", "2", "3")}

    with pytest.raises(XrdVisionError) as err:
        promote(p, _never_called)
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        f"{name}: challenger and champion were scored on different test splits (v2 on aaaaaaaa, v1 on "
        "bbbbbbbb)"
    )
    assert message.endswith("retrain on one split or pass --force")
    assert _aliases(client, name) == {"champion": "1", "challenger": "2"}

    # the same split on both, but the split changed since: scored now, they would be compared on a
    # split neither was held out from
    client.set_model_version_tag(name, "1", "test_split_md5", "a" * 32)
    score, scored = _fake_scores(figures, split_md5="c" * 32)
    with pytest.raises(
        XrdVisionError, match=r"v2 on aaaaaaaa, v1 on aaaaaaaa, the test split now on cccccccc"
    ):
        promote(p, score)
    assert scored == [f"models:/{name}/2"] and _aliases(client, name)["champion"] == "1"

    # --force: compared anyway, recorded as such
    client.set_model_version_tag(name, "1", "test_split_md5", "b" * 32)
    score, _ = _fake_scores(figures, split_md5="a" * 32)
    forced = promote(p, score, force=True)
    assert forced["decision"] == "promoted" and forced["line"].endswith("; test splits differ (--force)")
    assert client.get_model_version(name, "2").tags["promotion.split_mismatch_forced"] == "true"

    # same split everywhere: an ordinary contest
    client.set_registered_model_alias(name, "challenger", "3")
    score, _ = _fake_scores(figures, split_md5="a" * 32)
    client.set_model_version_tag(name, "2", "test_split_md5", "a" * 32)
    won = promote(p, score)
    assert won["decision"] == "promoted" and "differ" not in won["line"]


def test_promote_metric_names_the_test_figure():
    from xrdvision.tracking.registry import LOWER_IS_BETTER, METRICS, metric_name

    assert [metric_name(m) for m in ("accuracy", "loss", "macro_f1", "top3_accuracy")] == list(METRICS)
    assert metric_name("test_loss") == "test_loss" and {"test_loss"} == LOWER_IS_BETTER


def test_missing_challenger_is_one_line_and_changes_nothing(tiny, store, request):
    from xrdvision.tracking.registry import list_models, promote

    p, name = _quick_params(store, request)
    client = _bare_registry(p, name, 2)
    client.set_registered_model_alias(name, "champion", "1")
    with pytest.raises(XrdVisionError) as err:
        promote(p, _never_called)
    assert f"registered model '{name}' has no 'challenger' version" in str(err.value)
    assert "\n" not in str(err.value)
    assert _aliases(client, name) == {"champion": "1"}
    assert [r["aliases"] for r in list_models(p)] == [[], ["champion"]]
    assert all("promotion.decision" not in client.get_model_version(name, v).tags for v in ("1", "2"))


def test_unloadable_challenger_is_one_line_and_changes_nothing(tiny, store, request):
    from xrdvision.models.scoring import test_split_scorer
    from xrdvision.tracking.registry import promote

    p, name = _quick_params(store, request)
    client = _bare_registry(p, name, 2)
    client.set_registered_model_alias(name, "champion", "1")
    client.set_registered_model_alias(name, "challenger", "2")
    score = test_split_scorer(p, tiny / "data/split", tiny / "data/images")
    with pytest.raises(XrdVisionError, match=rf"^models:/{name}/2: cannot load the registered model \("):
        promote(p, score)
    assert _aliases(client, name) == {"champion": "1", "challenger": "2"}
    assert "promotion.decision" not in client.get_model_version(name, "2").tags


@pytest.mark.parametrize("old_champion", ["1", None])
def test_alias_is_put_back_when_the_record_cannot_be_written(store, request, monkeypatch, old_champion):
    from xrdvision.tracking.registry import record_decision

    p, name = _quick_params(store, request)
    client = _bare_registry(p, name, 2)
    if old_champion:
        client.set_registered_model_alias(name, "champion", old_champion)
    figures = {**_figures(0.9, 0.3), "n_test": 9}
    result = {
        "registered_model": name,
        "metric": "test_accuracy",
        "decision": "promoted" if old_champion else "first",
        "promoted": True,
        "challenger_version": "2",
        "champion_version": old_champion,
        "challenger": figures,
        "champion": {**figures, "test_accuracy": 0.5} if old_champion else None,
        "n_test": 9,
        "test_split_md5": "0" * 32,
        "line": "promote: test",
    }

    def broken(*args, **kwargs):
        raise RuntimeError("store went away")

    monkeypatch.setattr(type(client), "set_model_version_tag", broken)
    with pytest.raises(
        XrdVisionError,
        match=r"recording the decision failed \(RuntimeError: store went away\); champion alias",
    ):
        record_decision(client, result)
    assert _aliases(client, name) == ({"champion": old_champion} if old_champion else {})


def test_list_models_reads_real_test_tags(store, request):
    from xrdvision.tracking.registry import format_models_table, list_models

    p, name = _quick_params(store, request)
    client = _bare_registry(p, name, 1)
    for k, v in {"test_accuracy": "0.75", "test_loss": "0.61", "test_macro_f1": "0.7"}.items():
        client.set_model_version_tag(name, "1", k, v)
    rows = list_models(p)
    assert (
        len(rows) == 1
        and rows[0]["test_loss"] == pytest.approx(0.61)
        and rows[0]["test_top3_accuracy"] is None
    )
    assert np.isclose(rows[0]["test_macro_f1"], 0.7)
    assert rows[0]["name"] == name and "v1" in format_models_table(rows).splitlines()[2]
    client.set_model_version_tag(name, "1", "test_split_md5", "0123456789" + "a" * 22)
    assert list_models(p)[0]["test_split"] == "01234567"
    assert "test_split" in format_models_table(list_models(p)).splitlines()[1]
    assert format_models_table([]).startswith("no registered versions")
