"""Model promotion through the MLflow model registry: ``challenger`` vs ``champion``.

The train stage registers every model it trains as a new version of ``<prefix>-<label mode>`` and
points the ``challenger`` alias at it; users (and the predict command) take the ``champion``.
Promotion evaluates both versions *now, on the same test split* rather than comparing the figures
each one got when it was evaluated: the split may have changed since, and two numbers measured on
different test sets say nothing about which model is better.

Test figures measured on different test splits are not comparable, and a model trained with another
split held out may have trained on this split's test structures: every run and version carries the md5
of its test split (tag ``test_split_md5``, set by the train and evaluate stages), and promotion refuses
a challenger and a champion whose splits differ, or differ from the split they would be scored on now,
unless forced.

Order of work, so that nothing is left half-changed: resolve both aliases, score both models, decide;
only then move the alias and write the record (tags + description). If writing the record fails, the
alias is put back. Scoring is the caller's: :func:`promote` takes a ``score(model_uri)`` function
(``xrdvision.models.scoring.test_split_scorer``), so this module never loads a model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.errors import XrdVisionError, one_line
from xrdvision.tracking import runs

Score = Callable[[str], dict[str, Any]]  # model URI -> test_* figures, with n_test and test_split_md5

CHAMPION = "champion"
CHALLENGER = "challenger"
# The figures recorded with a decision; ``promote.metric: accuracy`` compares ``test_accuracy``.
METRICS = ("test_accuracy", "test_loss", "test_macro_f1", "test_top3_accuracy")
LOWER_IS_BETTER = frozenset({"test_loss"})
TAG_PREFIX = "promotion."


def metric_name(promote_metric: str) -> str:
    """``params.promote.metric`` (``accuracy``) as the figure it compares (``test_accuracy``)."""
    return promote_metric if promote_metric.startswith("test_") else f"test_{promote_metric}"


def check_same_split(name: str, splits: dict[str, str], current: str | None = None) -> None:
    """One line if the versions (``{"v3": md5}``) were scored on different test splits, or on another
    split than ``current`` (the one they would be scored on now)."""
    seen = {**splits, **({"the test split now": current} if current else {})}
    if len(set(seen.values())) > 1:
        which = ", ".join(f"{k} on {v[:8]}" for k, v in seen.items())
        raise XrdVisionError(
            f"{name}: challenger and champion were scored on different test splits ({which}): their "
            "figures are not comparable and one may have trained on the other's test structures; "
            "retrain on one split or pass --force"
        )


def is_better(challenger: float, champion: float, metric: str) -> bool:
    """Strictly better on ``metric`` (a tie keeps the champion: promotion needs evidence)."""
    if not np.isfinite(challenger):
        return False
    if not np.isfinite(champion):
        return True
    return challenger < champion if metric_name(metric) in LOWER_IS_BETTER else challenger > champion


def decide(
    challenger: dict[str, float], champion: dict[str, float] | None, metric: str, force: bool = False
) -> tuple[str, bool]:
    """(decision, promote?): ``first`` (no champion), ``forced``, ``promoted`` or ``rejected``."""
    if champion is None:
        return "first", True
    if is_better(challenger[metric], champion[metric], metric):
        return "promoted", True
    if force:
        return "forced", True
    return "rejected", False


def _client():
    import mlflow

    return mlflow.MlflowClient()


def registered_versions(client, name: str, uri: str) -> dict[str, str]:
    """The registered model's aliases ``{alias: version}``; a model never registered is an error."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise XrdVisionError(
                f"{uri}: no registered model '{name}' (the registry is empty for this label mode): "
                "run `dvc repro train` first"
            ) from None
        raise XrdVisionError(f"{uri}: cannot read registered model '{name}' ({one_line(exc)})") from None
    return {str(k): str(v) for k, v in (model.aliases or {}).items()}


def promote(params: Params, score: Score, *, force: bool = False) -> dict[str, Any]:
    """Score challenger and champion with ``score``; move ``champion`` if the challenger wins.

    ``score(model_uri)`` returns both versions' ``test_*`` figures on the same test split (including
    ``n_test`` and ``test_split_md5``); it is called only after the registry checks passed. The figure
    compared is ``test_<promote.metric>``. Challenger and champion tagged with different test splits
    (``test_split_md5``), or with another split than the one scored now, are refused unless ``force``.
    No champion yet: the challenger becomes champion. ``force``: it becomes champion regardless. Returns
    the decision, both sets of figures and ``line`` (the one line the CLI prints).
    """
    uri = runs.setup(params.mlflow)
    client = _client()
    name = runs.registered_model_name(params.mlflow, params.labels.mode)
    metric = metric_name(params.promote.metric)
    aliases = registered_versions(client, name, uri)
    if CHALLENGER not in aliases:
        raise XrdVisionError(
            f"{uri}: registered model '{name}' has no '{CHALLENGER}' version: train one (`dvc repro train`)"
        )
    ch_v, cp_v = aliases[CHALLENGER], aliases.get(CHAMPION)
    base = {"registered_model": name, "metric": metric, "challenger_version": ch_v, "champion_version": cp_v}
    if cp_v == ch_v:
        line = f"promote: {name} v{ch_v} is already {CHAMPION}; nothing to do"
        return {
            **base,
            "decision": "unchanged",
            "promoted": False,
            "challenger": None,
            "champion": None,
            "n_test": 0,
            "line": line,
        }
    splits: dict[str, str] = {}
    for v in filter(None, (ch_v, cp_v)):
        tags = client.get_model_version(name, v).tags or {}
        mode = tags.get("label_mode")
        if mode is not None and mode != params.labels.mode:
            raise XrdVisionError(
                f"models:/{name}/{v}: trained for {mode}, params say labels.mode={params.labels.mode}"
            )
        if tags.get(runs.TEST_SPLIT_TAG):
            splits[f"v{v}"] = tags[runs.TEST_SPLIT_TAG]
    contest = cp_v is not None  # the first champion is compared with nothing
    if contest and not force:
        check_same_split(name, splits)

    ch_m = score(f"models:/{name}/{ch_v}")
    if contest and not force:
        check_same_split(name, splits, ch_m.get("test_split_md5"))
    cp_m = score(f"models:/{name}/{cp_v}") if cp_v is not None else None
    if cp_m is not None and cp_m.get("test_split_md5") != ch_m.get("test_split_md5"):
        raise XrdVisionError(f"{name}: challenger and champion were scored now on different test splits")
    decision, move = decide(ch_m, cp_m, metric, force)
    mixed = contest and len({*splits.values(), ch_m.get("test_split_md5")} - {None}) > 1
    result = {
        **base,
        "decision": decision,
        "promoted": move,
        "challenger": ch_m,
        "champion": cp_m,
        "n_test": int(ch_m["n_test"]),
        "test_split_md5": str(ch_m.get("test_split_md5", "")),
        "split_mismatch_forced": mixed,
    }
    result["line"] = decision_line(result) + ("; test splits differ (--force)" if mixed else "")
    record_decision(client, result)
    return result


def decision_line(r: dict[str, Any]) -> str:
    """One line saying what was decided and why (both figures, same test split)."""
    name, m, ch_v, cp_v = r["registered_model"], r["metric"], r["challenger_version"], r["champion_version"]
    ch = r["challenger"][m]
    n = f"on {r['n_test']} test structures"
    if r["decision"] == "first":
        return f"promote: {name} v{ch_v} is the first {CHAMPION} ({m} {ch:.4f} {n})"
    cp = r["champion"][m]
    vs = f"{m} {ch:.4f} (v{ch_v}) vs {cp:.4f} (v{cp_v}) {n}"
    if r["decision"] == "promoted":
        return f"promote: {name} v{ch_v} is the new {CHAMPION}: {vs}"
    if r["decision"] == "forced":
        return f"promote: {name} v{ch_v} made {CHAMPION} by --force although not better: {vs}"
    better = "lower" if m in LOWER_IS_BETTER else "higher"
    return f"promote: {name} v{cp_v} stays {CHAMPION}; challenger not {better}: {vs}"


def record_decision(client, r: dict[str, Any]) -> None:
    """Move the alias (if promoted), then tag both versions and append the line to their descriptions.

    Everything was computed before this point. If the record cannot be written after the alias moved,
    the alias is put back, so the registry never says one thing and points at another.
    """
    name, ch_v, cp_v = r["registered_model"], r["challenger_version"], r["champion_version"]
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tags = {
        f"{TAG_PREFIX}decision": r["decision"],
        f"{TAG_PREFIX}metric": r["metric"],
        f"{TAG_PREFIX}time": when,
        f"{TAG_PREFIX}n_test": str(r["n_test"]),
        f"{TAG_PREFIX}test_split_md5": r["test_split_md5"],
        f"{TAG_PREFIX}champion_version": str(cp_v or ""),
        **({f"{TAG_PREFIX}split_mismatch_forced": "true"} if r.get("split_mismatch_forced") else {}),
        **{f"{TAG_PREFIX}challenger_{k}": f"{r['challenger'][k]:.6f}" for k in METRICS},
    }
    if r["champion"] is not None:
        tags.update({f"{TAG_PREFIX}champion_{k}": f"{r['champion'][k]:.6f}" for k in METRICS})
    line = f"{when} {r['line'].removeprefix('promote: ')}"
    if r["promoted"]:
        client.set_registered_model_alias(name, CHAMPION, ch_v)
    try:
        for k, v in tags.items():
            client.set_model_version_tag(name, ch_v, k, v)
        _append_description(client, name, ch_v, line)
        if cp_v is not None:
            client.set_model_version_tag(name, cp_v, f"{TAG_PREFIX}last_challenge", line)
            _append_description(client, name, cp_v, line)
    except Exception as exc:
        if r["promoted"]:
            try:
                if cp_v is None:
                    client.delete_registered_model_alias(name, CHAMPION)
                else:
                    client.set_registered_model_alias(name, CHAMPION, cp_v)
            except Exception:  # the store went away mid-way: say so rather than hide the first error
                raise XrdVisionError(
                    f"{name}: recording the decision failed ({one_line(exc)}) and the {CHAMPION} alias "
                    f"could not be restored to v{cp_v}: check the registry"
                ) from None
        raise XrdVisionError(
            f"{name}: recording the decision failed ({one_line(exc)}); {CHAMPION} alias left as it was"
        ) from None


def _append_description(client, name: str, version: str, line: str) -> None:
    old = client.get_model_version(name, version).description or ""
    client.update_model_version(name, version, description=(old + "\n" + line).strip())


def list_models(params: Params) -> list[dict[str, Any]]:
    """Registered versions of the label mode's model, newest first, with aliases and test figures.

    Figures come from the tags the evaluate stage writes (``test_accuracy`` ...), ``test_split`` is the
    first 8 characters of its test split's md5; a version never evaluated shows None. An unregistered
    model gives an empty list.
    """
    from mlflow.exceptions import MlflowException

    uri = runs.setup(params.mlflow)
    client = _client()
    name = runs.registered_model_name(params.mlflow, params.labels.mode)
    try:
        aliases = registered_versions(client, name, uri)
    except XrdVisionError:
        return []
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(v, []).append(alias)
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        raise XrdVisionError(f"{uri}: cannot list versions of '{name}' ({one_line(exc)})") from None
    rows = []
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        tags = mv.tags or {}
        rows.append(
            {
                "name": name,
                "version": str(mv.version),
                "aliases": sorted(by_version.get(str(mv.version), [])),
                "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(mv.creation_timestamp / 1000)),
                "run_id": mv.run_id,
                **{k: _float(tags.get(k)) for k in METRICS},
                "test_split": tags.get(runs.TEST_SPLIT_TAG, "")[:8],
                "promotion": tags.get(f"{TAG_PREFIX}decision", ""),
            }
        )
    return rows


def format_models_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`list_models` rows (the ``xrdvision models`` output)."""
    if not rows:
        return "no registered versions (run `dvc repro train` first)"
    head = [
        "version",
        "aliases",
        "created",
        "test_accuracy",
        "test_loss",
        "test_macro_f1",
        "test_split",
        "promotion",
        "run_id",
    ]
    cells = [
        [
            f"v{r['version']}",
            ",".join(r["aliases"]) or "-",
            r["created"],
            *(
                f"{r[k]:.4f}" if r[k] is not None else "-"
                for k in ("test_accuracy", "test_loss", "test_macro_f1")
            ),
            r["test_split"] or "-",
            r["promotion"] or "-",
            (r["run_id"] or "-")[:12],
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = [f"{rows[0]['name']}:", "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None
