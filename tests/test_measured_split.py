"""The tuning / report split of the measured patterns: by mineral, balanced per crystal system, seeded;
the committed table; and the figures evaluate_measured gives per half (with the calibration error)."""

from __future__ import annotations

import csv
from collections import Counter, defaultdict

import numpy as np
import pytest

from conftest import EXPERIMENTAL_DIR, ROOT
from xrdvision.errors import InputError
from xrdvision.serve.evaluate_measured import half_metrics, overall_figures
from xrdvision.serve.measured_split import (
    COLUMNS,
    HALVES,
    assign_halves,
    group_minerals,
    make_split,
    mineral_name,
    read_split,
)

SPLIT = ROOT / "data" / "measured_split.csv"


@pytest.mark.parametrize(
    ("phase", "name"),
    [
        ("Kaolinite (disordered)", "kaolinite"),
        ("Kaolinite", "kaolinite"),
        ("Mg-calcite", "calcite"),
        ("Fe-dolomite", "dolomite"),
        ("Illite 1M (RM30)", "illite"),
        ("Chert (microcrystalline quartz)", "chert"),
        ("unknown (RRUFF mineral; name not shipped)", ""),
        ("", ""),
    ],
)
def test_mineral_name(phase, name):
    assert mineral_name(phase) == name


def _print(lines: list[float]) -> np.ndarray:
    g = np.arange(5, 90, 0.05)
    v = sum(np.exp(-0.5 * ((g - x) / 0.1) ** 2) for x in lines)
    return v / np.linalg.norm(v)


def test_groups_join_names_formulas_and_look_alikes_of_one_space_group():
    rows = [
        {"phase_name": "Quartz", "formula": "SiO2", "space_group": "154"},
        {"phase_name": "Chert (microcrystalline quartz)", "formula": "SiO2", "space_group": "154"},
        {"phase_name": "Cristobalite", "formula": "SiO2", "space_group": "92"},  # same formula
        {"phase_name": "Oligoclase", "formula": "", "space_group": "2"},
        {"phase_name": "Oligoclase", "formula": "", "space_group": "2"},  # same name
        {"phase_name": "unknown", "formula": "", "space_group": "225"},
        {"phase_name": "unknown", "formula": "", "space_group": "225"},  # looks like the one before
        {"phase_name": "unknown", "formula": "", "space_group": "229"},  # same lines, other group
        {"phase_name": "unknown", "formula": "", "space_group": "225"},  # other lines
    ]
    same, other = _print([20, 30, 40, 50]), _print([25, 37, 61])
    prints = [None] * 5 + [same, same + 0.0, same, other]
    g = group_minerals(rows, prints)
    assert g[0] == g[1] == g[2] and g[3] == g[4] and g[5] == g[6]
    assert len({g[0], g[3], g[5], g[7], g[8]}) == 5


def test_halves_keep_groups_whole_balance_systems_and_follow_the_seed():
    rng = np.random.default_rng(0)
    systems = [str(s) for s in rng.choice(["cubic", "monoclinic", "triclinic"], 300)]
    groups = [int(x) for x in rng.integers(0, 120, 300)]
    halves = assign_halves(systems, groups, seed=7)
    for grp in set(groups):
        assert len({h for h, gg in zip(halves, groups, strict=True) if gg == grp}) == 1
    counts = Counter(zip(systems, halves, strict=True))
    for s in set(systems):
        assert abs(counts[(s, "tuning")] - counts[(s, "report")]) <= 8
    assert halves == assign_halves(systems, groups, seed=7)
    assert halves != assign_halves(systems, groups, seed=8)


def test_read_split_rejects_an_unknown_half(tmp_path):
    bad = tmp_path / "split.csv"
    bad.write_text("file,half\na.xy,tuning\nb.xy,test\n")
    with pytest.raises(InputError, match=r"line 3: half 'test' is not one of tuning, report"):
        read_split(bad)


def test_half_figures_and_calibration_error():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 200)
    probs = rng.dirichlet(np.ones(3), 200)
    halves = ["tuning"] * 90 + ["report"] * 100 + [""] * 10
    m = half_metrics(probs, y, halves, ["a", "b", "c"], seed=1)
    assert m["n_tuning_half"] == 90 and m["n_report_half"] == 100
    whole = overall_figures(probs[90:190], y[90:190], ["a", "b", "c"], 1)
    for k in ("accuracy", "balanced_accuracy", "ece", "top3_accuracy", "accuracy_ci95_low"):
        assert m[f"report_half_{k}"] == pytest.approx(whole[k])
        assert f"tuning_half_{k}" in m
    # confident and always right: no calibration error; 90 % sure and right half the time: 0.4
    one_hot = np.eye(3)[y]
    assert overall_figures(one_hot, y, ["a", "b", "c"], 1)["ece"] == pytest.approx(0.0)
    p = np.full((200, 3), 0.05)
    p[np.arange(200), y] = 0.9
    p[1::2] = p[1::2][:, [1, 2, 0]]  # every other one: 0.9 on a wrong class
    assert overall_figures(p, y, ["a", "b", "c"], 1)["ece"] == pytest.approx(0.4)
    assert half_metrics(probs, y, [""] * 200, ["a", "b", "c"], 1) == {"n_tuning_half": 0, "n_report_half": 0}


def _committed() -> list[dict[str, str]]:
    return list(csv.DictReader(SPLIT.read_text().splitlines()))


def test_committed_split_keeps_minerals_apart():
    rows = _committed()
    assert list(rows[0]) == COLUMNS and {r["half"] for r in rows} == set(HALVES)
    halves_of = defaultdict(set)
    for r in rows:
        halves_of[r["group"]].add(r["half"])
    assert all(len(h) == 1 for h in halves_of.values())
    n = Counter(r["half"] for r in rows)
    assert abs(n["tuning"] - n["report"]) <= 10


@pytest.mark.needs_shared("experimental")
def test_committed_split_covers_the_index_and_names_stay_apart():
    index = list(csv.DictReader((EXPERIMENTAL_DIR / "INDEX.csv").read_text().splitlines()))
    half = {r["file"]: r["half"] for r in _committed()}
    assert sorted(half) == sorted(r["file"] for r in index)
    by_name = defaultdict(set)
    for r in index:
        if mineral_name(r["phase_name"]):
            by_name[mineral_name(r["phase_name"])].add(half[r["file"]])
    assert all(len(h) == 1 for h in by_name.values())


@pytest.mark.slow
@pytest.mark.needs_shared("experimental")
def test_committed_split_is_what_the_command_makes():
    made = make_split(EXPERIMENTAL_DIR, "INDEX.csv", 42)
    assert [dict(zip(COLUMNS, r, strict=True)) for r in made] == _committed()
