"""Atomic writes: all or nothing, and ordinary file modes."""

from __future__ import annotations

import os
import stat

import pytest

from xrdvision.formats.atomic import atomic_dir, atomic_open, write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_open(target) as fh:
        fh.write('{"half": ')
        raise RuntimeError("interrupted")
    assert target.read_text().strip().startswith('{\n  "a": 1')
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_outputs_get_umask_modes_not_mkstemp_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", [1])
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_atomic_dir_replaces_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "cifs"
    with atomic_dir(target) as d:
        (d / "a.cif").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as d:
        (d / "b.cif").write_text("new")
        raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["a.cif"]
    with atomic_dir(target) as d:
        (d / "b.cif").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.cif"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifs"]
