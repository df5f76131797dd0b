"""What a ``peaklists`` run reports: ``manifest.csv`` (one row per structure) and ``summary.json``.

Kept apart from :mod:`xrdvision.data.peaklists` because none of it decides a shard's content: the
report is rebuilt from the shards on disk at the end of every run (finished, resumed or moved), so it
always describes exactly the files that are there. Counts only, no times or paths: the same shards give
the same bytes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.crystal.systems import CRYSTAL_SYSTEMS
from xrdvision.formats.peaklists import read_shard
from xrdvision.formats.tables import write_table

MANIFEST_COLUMNS = (
    "id",
    "shard",
    "source",
    "reduced_formula",
    "crystal_system",
    "space_group",
    "source_space_group",
    "icsd",
    "n_peaks",
    "status",
    "reason",
)
_KEEP_LINES = 50  # error lines quoted in summary.json (all are in manifest.csv / the log)


def _reason_kind(line: str) -> str:
    """``structures-03.jsonl.xz:mp-1: overlapping atoms: ...`` -> ``overlapping atoms``."""
    reason = line.split(": ", 1)[1] if ": " in line else line
    return reason.split(":")[0].split("(")[0].strip()[:60]


def summarise(
    out_dir: Path, files: Sequence[Path], base: dict[str, Any], counts: dict[str, Any], read_errors: list[str]
) -> dict[str, Any]:
    """Read every shard of the run (``files``, in order), write ``out_dir/manifest.csv`` and return the
    summary: ``base`` (source, format, params), ``counts`` (what reading, filtering and the leakage
    rule did), then what the shards hold."""
    rows: list[list[Any]] = []
    per_system: Counter[str] = Counter()
    failures: list[str] = []
    shards_info = []
    n_ok = n_disagree = n_lines = 0
    for path in files:
        shard = read_shard(path)
        name = path.name.removesuffix(".npz")
        n_peaks = np.diff(shard.offsets)
        for i, sid in enumerate(shard.ids):
            sg, src = int(shard.space_group[i]), int(shard.source_space_group[i])
            n_disagree += bool(src) and src != sg
            per_system[shard.crystal_system[i]] += 1
            icsd = str(bool(shard.icsd[i])).lower()
            row = [sid, name, shard.source, shard.reduced_formula[i], shard.crystal_system[i], sg, src or ""]
            rows.append([*row, icsd, int(n_peaks[i]), "ok", ""])
        for sid, reason in zip(shard.failed_ids, shard.failed_reasons, strict=True):
            rows.append([sid, name, shard.source, "", "", "", "", "", 0, "failed", reason])
        failures.extend(shard.failed_reasons)
        n_ok += len(shard)
        n_lines += len(shard.two_theta)
        size = path.stat().st_size
        shards_info.append(
            {
                "name": path.name,
                "n_structures": len(shard),
                "n_failed": len(shard.failed_ids),
                "bytes": size,
            }
        )
    write_table(out_dir / "manifest.csv", MANIFEST_COLUMNS, rows)
    return {
        **base,
        "enabled": True,
        **counts,
        "n_read_errors": len(read_errors),
        "read_errors": read_errors[:_KEEP_LINES],
        "n_structures": n_ok,
        "n_failed": len(failures),
        "failure_kinds": dict(
            sorted(Counter(map(_reason_kind, failures)).items(), key=lambda kv: (-kv[1], kv[0]))
        ),
        "failures": failures[:_KEEP_LINES],
        "labels": {
            "method": "spglib on the shard's arrays at labels.symprec (fallbacks 0.1, 0.001)",
            "n_disagree_with_source_sg": n_disagree,
            "disagreement_rate": round(n_disagree / n_ok, 6) if n_ok else 0.0,
            "per_crystal_system": {c: per_system[c] for c in CRYSTAL_SYSTEMS},
        },
        "honest_external_test": "cod" not in base["params"]["split.train_sources"],
        "n_peaks": n_lines,
        "shards": shards_info,
        "bytes": sum(s["bytes"] for s in shards_info),
    }


def summary_line(s: dict[str, Any]) -> str:
    """The CLI's one line about a run."""
    if not s.get("enabled"):
        return f"peaklists: off ({s['reason']}); empty manifest written"
    leak, lab = s["leakage"], s["labels"]
    return (
        f"peaklists: {s['n_structures']} Materials Project structures in {len(s['shards'])} shards "
        f"({s['bytes'] / 1e6:.1f} MB), {s['n_failed']} failed, {s['n_read_errors']} unreadable; "
        f"{leak['n_mp_dropped']} dropped for leakage ({leak['n_cod_structures']} COD structures: "
        f"{leak['reference'].split(' (')[0]}); labels differ from the shard's sg for "
        f"{lab['disagreement_rate']:.2%}"
    )
