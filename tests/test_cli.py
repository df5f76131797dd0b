"""The ``xrdvision`` command line: every ``--help`` works; -v and -q decide what library logging shows."""

from __future__ import annotations

import argparse
import logging

import pytest

from xrdvision.cli import build_parser, configure_logging, main


def _subcommands() -> list[str]:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def test_every_subcommand_is_covered():
    assert {"ingest", "split", "evaluate", "predict", "evaluate_measured"} <= set(_subcommands())


@pytest.mark.parametrize(
    "argv", [[], *([name] for name in _subcommands())], ids=lambda a: " ".join(a) or "top"
)
def test_help_works(argv, capsys):
    # A bare "%" in a help text ("95% CI") used to make argparse raise ValueError here.
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(" ".join(["usage: xrdvision", *argv]))
    if not argv:
        assert "--verbose" in out and "--quiet" in out and "95% CI" in out


def test_verbose_and_quiet_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as done:
        main(["-v", "-q", "models"])
    assert done.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "level"),
    [({}, logging.INFO), ({"verbose": True}, logging.DEBUG), ({"quiet": True}, logging.WARNING)],
)
def test_logging_level(flags, level):
    logger = logging.getLogger("xrdvision")
    before = logger.level
    try:
        configure_logging(**flags)
        assert logger.level == level
    finally:
        logger.setLevel(before)


def test_main_sets_the_level_before_reading_params(tmp_path, capsys):
    logger = logging.getLogger("xrdvision")
    before = logger.level
    try:
        assert main(["-q", "--params", str(tmp_path / "none.yaml"), "split"]) == 1
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(before)
    assert "none.yaml: params file not found" in capsys.readouterr().err
