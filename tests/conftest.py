"""Shared fixtures and the rules for tests that need the data beside the checkout (``../shared``).

A fresh clone has no ``../shared``; ``make test`` must still pass there, and in CI (where it exists) no
test may skip. The rules:

- ``@pytest.mark.needs_shared("weights", "experimental", ...)`` (parts: :data:`SHARED_PARTS`) marks a test
  that reads those parts of ``../shared``; it is skipped, with one line naming the missing path, when
  one is absent. The fixtures ``bad_dir``, ``experimental_dir``, ``vgg16_weights`` and ``mp_dir`` imply
  their part the same way.
- ``cod_dir`` is ``../shared/cod`` when present, else the embedded CIFs (``data/embedded``, shipped in
  git), so tests that read COD CIFs by id run in a bare clone too. A test that fails there after trying
  to read a file the embedded data lacks (an id, ``INDEX.csv``, ``bad/``) is reported skipped, naming it.
- A test that touches ``../shared`` without declaring the part (marker or fixture) is an error, so that
  a missing marker shows up where ``../shared`` exists rather than in a user's bare clone.
- With ``CI=true`` any skipped test fails the run (``.ci/run``): ``../shared`` must be complete there.
"""

from __future__ import annotations

import os
import re
import sys
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("XRDVISION_SHARED", ROOT.parent / "shared"))
COD_DIR = SHARED / "cod"
BAD_DIR = COD_DIR / "bad"
EXPERIMENTAL_DIR = SHARED / "experimental"
MP_DIR = SHARED / "mp"
WEIGHTS = SHARED / "weights" / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
EMBEDDED_DIR = ROOT / "data" / "embedded"

# part -> (path, what it is). ``needs_shared`` takes these names.
SHARED_PARTS: dict[str, tuple[Path, str]] = {
    "cod": (COD_DIR, "the 852 COD CIFs with INDEX.csv and SOURCES.csv"),
    "cod/bad": (BAD_DIR, "the CIFs pymatgen rejects"),
    "experimental": (EXPERIMENTAL_DIR, "the measured patterns"),
    "mp": (MP_DIR, "the Materials Project structure shards"),
    "weights": (WEIGHTS, "the VGG16 ImageNet weights"),
}
# Fixtures that stand for a part: a test using one may touch that part. cod_dir falls back to the
# embedded CIFs, so it never skips by itself.
FIXTURE_PARTS = {
    "cod_dir": "cod",
    "bad_dir": "cod/bad",
    "experimental_dir": "experimental",
    "mp_dir": "mp",
    "vgg16_weights": "weights",
}
CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")


def _shown(path: Path | str) -> str:
    """A path as a user beside the checkout reads it: ``../shared/...``."""
    try:
        return os.path.relpath(path, ROOT)
    except ValueError:
        return str(path)


def missing_shared(parts: Iterable[str]) -> str | None:
    """The one-line skip reason for the absent ones among ``parts``, or None if all are there."""
    missing = []
    for part in dict.fromkeys(parts):
        if part not in SHARED_PARTS:
            raise pytest.UsageError(f"needs_shared({part!r}): not one of {sorted(SHARED_PARTS)}")
        path, what = SHARED_PARTS[part]
        if not path.exists():
            missing.append(f"{_shown(path)} ({what})")
    if not missing:
        return None
    return "needs " + " and ".join(missing) + ": absent in a clone without ../shared"


def _part_of(path: str) -> str:
    """The most specific part of ../shared that ``path`` lies in ("..." if none)."""
    full = os.path.normpath(ROOT / path)
    best = ("...", "")
    for part, (where, _) in SHARED_PARTS.items():
        w = str(where)
        if (full == w or full.startswith(w + os.sep)) and len(w) > len(best[1]):
            best = (part, w)
    return best[0]


def require_shared(*parts: str) -> None:
    reason = missing_shared(parts)
    if reason:
        pytest.skip(reason)


def declared_parts(item: pytest.Item) -> set[str]:
    parts = {p for mark in item.iter_markers("needs_shared") for p in mark.args}
    parts |= {FIXTURE_PARTS[f] for f in getattr(item, "fixturenames", ()) if f in FIXTURE_PARTS}
    return parts


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------

_CIF_ARCHIVES = (".tar.xz", ".tar.gz", ".tgz", ".tar.bz2", ".tar", ".zip")


def materialise_embedded(src: Path, out: Path) -> dict[str, Path]:
    """The embedded CIFs as ``out/<name>.cif`` files, whatever the layout of ``src``: loose ``*.cif``
    and/or archives of them (``.tar.xz``, ``.zip``, ...; members in any subfolder). Returns {stem: path}."""
    out.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        stem = Path(name).stem
        if stem not in found:
            found[stem] = out / f"{stem}.cif"
            found[stem].write_bytes(data)

    for path in sorted(src.rglob("*")) if src.is_dir() else ():
        name = path.name.lower()
        if not path.is_file():
            continue
        if name.endswith(".cif"):
            put(path.name, path.read_bytes())
        elif name.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.is_dir() and info.filename.lower().endswith(".cif"):
                        put(info.filename, zf.read(info))
        elif name.endswith(_CIF_ARCHIVES):
            with tarfile.open(path) as tf:
                for member in tf:
                    fh = tf.extractfile(member) if member.isfile() else None
                    if fh is not None and member.name.lower().endswith(".cif"):
                        put(member.name, fh.read())
    return dict(sorted(found.items()))


@pytest.fixture(scope="session")
def embedded_cifs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The embedded CIFs shipped in git (``data/embedded``: loose files or an archive), as
    {stem (COD id): path of a plain ``.cif`` file} in a session temp folder."""
    cifs = materialise_embedded(EMBEDDED_DIR, tmp_path_factory.mktemp("embedded-cifs"))
    if not cifs:
        pytest.skip(f"no CIFs found in {_shown(EMBEDDED_DIR)}")
    return cifs


@pytest.fixture(scope="session")
def cod_dir(request: pytest.FixtureRequest) -> Path:
    """The real COD CIFs: ``../shared/cod`` (852, with INDEX.csv, SOURCES.csv, bad/), or in a clone without
    it the embedded CIFs as ``<id>.cif`` (see the module docstring for what a missing one does)."""
    if COD_DIR.is_dir():
        return COD_DIR
    cifs: dict[str, Path] = request.getfixturevalue("embedded_cifs")
    folder = next(iter(cifs.values())).parent
    _GUARD.fallback = str(folder) + os.sep
    return folder


@pytest.fixture(scope="session")
def bad_dir() -> Path:
    """20 real CIFs that pymatgen rejects (``../shared/cod/bad``)."""
    require_shared("cod/bad")
    return BAD_DIR


@pytest.fixture(scope="session")
def experimental_dir() -> Path:
    """The 444 measured patterns (``../shared/experimental``)."""
    require_shared("experimental")
    return EXPERIMENTAL_DIR


@pytest.fixture(scope="session")
def mp_dir() -> Path:
    """The Materials Project structure shards (``../shared/mp``)."""
    require_shared("mp")
    return MP_DIR


@pytest.fixture(scope="session")
def vgg16_weights() -> Path:
    """The VGG16 ImageNet "notop" weights file in ``../shared/weights``."""
    require_shared("weights")
    return WEIGHTS


# --------------------------------------------------------------------------------------------------
# Skips, the ../shared access guard, and "nothing skips in CI"
# --------------------------------------------------------------------------------------------------


class _Guard:
    """Records, per test, the paths under ../shared it opens or lists (an audit hook sees them even when
    the open fails), and the files it looked for in the embedded fallback of ``cod_dir`` and missed."""

    EVENTS = frozenset(
        {"open", "os.listdir", "os.scandir", "os.symlink", "shutil.copyfile", "shutil.copytree"}
    )

    def __init__(self) -> None:
        self.item: pytest.Item | None = None
        self.shared: list[str] = []
        self.missed: list[str] = []
        self.fallback: str | None = None  # the embedded stand-in for ../shared/cod, once made
        self.skip_of: dict[int, tuple[BaseException, str]] = {}  # a cached fixture error -> its skip
        roots = {str(SHARED), os.path.realpath(SHARED)}
        self.roots = tuple(r.rstrip(os.sep) + os.sep for r in roots)
        self.words = tuple({Path(r).name for r in roots} | {"embedded-cifs"})  # a cheap first filter

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        if event not in self.EVENTS or self.item is None or not args:
            return
        try:
            path = args[0]
            if not isinstance(path, (str, bytes, os.PathLike)):
                return
            path = os.fsdecode(os.fspath(path))
            if not any(w in path for w in self.words):
                return
            full = os.path.normpath(os.path.join(os.getcwd(), path))
            if (full + os.sep).startswith(self.roots):
                self.shared.append(full)
            elif self.fallback and full.startswith(self.fallback) and not os.path.exists(full):
                self.missed.append(full)
        except Exception:  # an audit hook must never break the operation it watches
            return

    def note_named_in(self, exc: BaseException) -> None:
        """Missing embedded files named in an error message (code that checks before it opens)."""
        seen: set[int] = set()
        while exc is not None and id(exc) not in seen and self.fallback:
            seen.add(id(exc))
            for path in re.findall(re.escape(self.fallback) + r"[^\s'\":,;)]*", str(exc)):
                if not os.path.exists(path):
                    self.missed.append(path)
            exc = exc.__cause__ or exc.__context__

    def missed_reason(self) -> str:
        fallback = Path(self.fallback or "")
        names = list(dict.fromkeys(_shown(COD_DIR / Path(m).relative_to(fallback)) for m in self.missed))
        more = f" (+{len(names) - 1} more)" if len(names) > 1 else ""
        return f"needs {names[0]}{more}: not in the embedded data, and absent in a clone without ../shared"

    def undeclared(self, item: pytest.Item) -> list[str]:
        allowed = [str(SHARED_PARTS[p][0]) for p in declared_parts(item) if p in SHARED_PARTS]
        allowed += [os.path.realpath(a) for a in allowed]
        out = []
        for path in dict.fromkeys(self.shared):
            if not any(path == a or path.startswith(a.rstrip(os.sep) + os.sep) for a in allowed):
                out.append(_shown(path))
        return out


_GUARD = _Guard()
sys.addaudithook(_GUARD.audit)
_SKIPPED: list[str] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        # cod_dir alone does not skip: it falls back to the embedded CIFs
        marked = {p for mark in item.iter_markers("needs_shared") for p in mark.args}
        reason = missing_shared(marked | (declared_parts(item) - {"cod"}))
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item):
    _GUARD.item, _GUARD.shared, _GUARD.missed = item, [], []
    yield
    _GUARD.item = None


def _as_skip(report: pytest.TestReport, item: pytest.Item, reason: str) -> None:
    path, lineno, _ = item.location
    report.outcome = "skipped"
    report.longrepr = (str(ROOT / path), (lineno or 0) + 1, f"Skipped: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when != "teardown" and _GUARD.fallback is not None:
        # bare clone: a test that looked for a file the embedded CIFs lack did not run on its data
        exc = call.excinfo.value if call.excinfo is not None else None
        if report.failed and exc is not None:
            _GUARD.note_named_in(exc)
        if _GUARD.missed and (report.failed or (report.passed and report.when == "call")):
            reason = _GUARD.missed_reason()
            if exc is not None:
                _GUARD.skip_of[id(exc)] = (exc, reason)  # a module fixture's error is raised again, as is
            _as_skip(report, item, reason)
        elif report.failed and exc is not None and _GUARD.skip_of.get(id(exc), (None,))[0] is exc:
            _as_skip(report, item, _GUARD.skip_of[id(exc)][1])
    if report.when == "teardown" and not report.failed:
        undeclared = _GUARD.undeclared(item)
        if undeclared:
            parts = sorted({_part_of(u) for u in undeclared})
            report.outcome = "failed"
            report.longrepr = (
                f"{item.nodeid} touches {', '.join(undeclared[:3])} without declaring it: mark it "
                f"@pytest.mark.needs_shared({', '.join(map(repr, parts))}) so that a clone "
                "without ../shared skips it"
            )
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append(item.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if CI and _SKIPPED and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if CI and _SKIPPED:
        terminalreporter.write_line(
            f"CI=true: {len(_SKIPPED)} test(s) skipped, and in CI nothing may skip "
            "(is ../shared complete?): the run FAILS",
            red=True,
            bold=True,
        )
