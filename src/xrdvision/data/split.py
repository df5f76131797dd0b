"""Grouped, stratified, seeded train/validation/test split of structures (and so of their images).

Why grouped: COD holds many entries of the same compound (68 alpha-iron and 28 corundum entries among
the 852 shared CIFs). Their patterns are near-identical, so an entry in training and its twin in test
would measure memory, not generalisation. A *group* is every structure sharing a reduced formula and
space group (joined transitively, and with any repeated COD id); a group sits in one split only.
Augmented copies follow their structure, since the split assigns structures, not images.

Why stratified: crystal systems are unbalanced (cubic 201 vs hexagonal 77 here); each system is split
70/20/10 on its own so that validation and test measure every class.
"""

from __future__ import annotations

import csv
import zlib
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from xrdvision.config import Params
from xrdvision.crystal.systems import CRYSTAL_SYSTEMS
from xrdvision.errors import InputError
from xrdvision.formats.atomic import atomic_open, write_json
from xrdvision.formats.tables import SPLIT_COLUMNS, read_table

SPLITS = ("train", "val", "test")
# Written into summary.json (a DVC output): "union-find" names the grouping relation and stays word for
# word so that the split's bytes do not change; compound_groups computes it as connected components.
METHOD = (
    "groups = union-find over (reduced formula, space group) and COD id; per crystal system, groups "
    "shuffled (seeded), sorted by size (largest first); when a system has >= 3 groups, the smallest "
    "three seed test, val and train; the rest go one by one to the split with the smallest "
    "(structures + size/2) / target (Sainte-Lague apportionment)"
)


def _compound_key(row: Mapping[str, Any]) -> str | None:
    formula = str(row.get("reduced_formula") or row.get("formula") or "").strip()
    sg = str(row.get("space_group") or "").strip()
    if not formula or not sg:
        return None
    return f"{formula}|{sg}"


def compound_groups(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A group id per row: rows sharing ``(reduced_formula, space_group)`` or ``cod_id`` share a group.

    The two relations are joined transitively (connected components of the graph whose nodes are COD
    ids and compound keys, ``scipy.sparse.csgraph``), so a COD id listed twice with different labels
    pulls both compounds into one group. The id is ``"<formula>|<space group>"`` (the smallest
    such key in the group), or ``"id:<cod_id>"`` for a row without labels; it does not depend on the
    order of ``rows``. ``reduced_formula`` is used, falling back to ``formula``.
    """
    if not rows:
        return []
    ids = [str(row["cod_id"]).strip() for row in rows]
    keys = [_compound_key(row) for row in rows]
    # One graph node per distinct COD id, then one per distinct compound key; an edge joins a row's two.
    node = {x: i for i, x in enumerate(dict.fromkeys(ids))}
    key_node = {k: len(node) + j for j, k in enumerate(dict.fromkeys(k for k in keys if k is not None))}
    edges = np.array([(node[x], key_node[k]) for x, k in zip(ids, keys, strict=True) if k is not None], int)
    edges = edges.reshape(-1, 2)
    n = len(node) + len(key_node)
    graph = coo_array((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    names: dict[int, str] = {}  # a group is named by its smallest key; a row without one stands alone
    for k, i in sorted(key_node.items()):
        names.setdefault(int(component[i]), k)
    return [names.get(int(component[node[x]]), f"id:{x}") for x in ids]


def _label_rng(seed: int, label: str) -> np.random.Generator:
    # One stream per label: a class's split does not change when another class gains members.
    return np.random.default_rng([int(seed), zlib.crc32(label.encode("utf-8"))])


def assign_splits(
    groups: Sequence[str], labels: Sequence[str], fractions: Mapping[str, float], seed: int
) -> dict[str, str]:
    """Assign each group to a split (``fractions``' keys, e.g. train/val/test); deterministic per seed.

    ``groups`` and ``labels`` have one entry per structure; a group's label is its most common one.
    Method, per label separately (stratification): the label's groups are shuffled with a generator
    seeded by ``(seed, label)`` and stably sorted by size, largest first (big groups are the hardest to
    place, so they go while every split still has room). If there are at least as many groups as
    splits, the smallest groups first seed each split with one group (smallest fraction first, so a
    small split never has to take a big group), so every class appears everywhere. The remaining
    groups go one at a time to the split with the smallest ``(count + size / 2) / target``, where
    ``count`` is the structures already there and ``target = fraction * structures of the label``:
    the Sainte-Lague rule, which for groups of one structure gives the proportional split rounded
    without bias, and for a large group picks the split it overfills least.
    """
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups but {len(labels)} labels")
    names = list(fractions)
    if not names or any(fractions[n] <= 0 for n in names):
        raise ValueError(f"fractions must be positive: {dict(fractions)}")
    size: Counter[str] = Counter(groups)
    votes: dict[str, Counter[str]] = defaultdict(Counter)
    for g, lab in zip(groups, labels, strict=True):
        votes[g][str(lab)] += 1
    group_label = {g: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for g, c in votes.items()}
    by_label: dict[str, list[str]] = defaultdict(list)
    for g in sorted(group_label):
        by_label[group_label[g]].append(g)

    # Splits with the smallest fraction are seeded first, from the smallest groups.
    seed_order = sorted(names, key=lambda n: (fractions[n], names.index(n)))
    total_fraction = sum(fractions.values())
    out: dict[str, str] = {}
    for label in sorted(by_label):
        members = by_label[label]
        rng = _label_rng(seed, label)
        shuffled = [members[i] for i in rng.permutation(len(members))]
        order = sorted(shuffled, key=lambda g: -size[g])  # stable: ties keep the shuffled order
        n_structures = sum(size[g] for g in members)
        target = {n: fractions[n] / total_fraction * n_structures for n in names}
        count = dict.fromkeys(names, 0)
        if len(order) >= len(names):
            for name in seed_order:
                g = order.pop()  # the smallest remaining group
                out[g] = name
                count[name] += size[g]
        for g in order:
            best = min(names, key=lambda n: ((count[n] + size[g] / 2) / target[n], -fractions[n]))
            out[g] = best
            count[best] += size[g]
    return out


def run_split(params: Params, manifest_path: Path, image_index_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir/{train,val,test}.csv`` and ``out_dir/summary.json``; returns the summary.

    Only ``status == ok`` structures that have an image of copy 0 take part. Groups come from
    :func:`compound_groups`; the split is stratified by crystal system whatever ``labels.mode`` is
    (most space groups have only one to three structures, too few to stratify on). Train lists every
    copy of its structures, val and test copy 0 only. ``image`` is as in the image index (a file name
    in the images folder).
    """
    manifest_path, image_index_path, out_dir = Path(manifest_path), Path(image_index_path), Path(out_dir)
    manifest = read_table(manifest_path, ["cod_id", "status", "crystal_system", "space_group"], "manifest")
    if manifest and not ({"reduced_formula", "formula"} & set(manifest[0])):
        raise InputError(manifest_path, "manifest lacks column reduced_formula (or formula)")
    index = read_table(image_index_path, ["image", "cod_id", "copy"], "image index")

    images: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for row in index:
        try:
            copy = int(row["copy"])
        except ValueError:
            raise InputError(image_index_path, f"copy {row['copy']!r} is not an integer") from None
        images[row["cod_id"].strip()].append((copy, row["image"]))

    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    n_failed = n_no_image = 0
    for row in manifest:
        cod_id = row["cod_id"].strip()
        if row["status"].strip() != "ok":
            n_failed += 1
            continue
        if cod_id in seen:
            continue
        if not any(c == 0 for c, _ in images.get(cod_id, [])):
            n_no_image += 1
            continue
        seen.add(cod_id)
        rows.append(row)

    groups = compound_groups(rows)
    systems = [r["crystal_system"].strip() for r in rows]
    fractions = {"train": params.split.train, "val": params.split.val, "test": params.split.test}
    assignment = assign_splits(groups, systems, fractions, params.seed)

    lines: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
    structures: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    group_sets: dict[str, set[str]] = {s: set() for s in SPLITS}
    for row, group, system in zip(rows, groups, systems, strict=True):
        split = assignment[group]
        cod_id = row["cod_id"].strip()
        structures[split][system] += 1
        group_sets[split].add(group)
        for copy, image in sorted(images[cod_id]):
            if split == "train" or copy == 0:
                lines[split].append([image, cod_id, group, system, row["space_group"].strip()])

    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        with atomic_open(out_dir / f"{split}.csv", "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(SPLIT_COLUMNS)
            writer.writerows(lines[split])

    order = [s for s in CRYSTAL_SYSTEMS if s in set(systems)] + sorted(set(systems) - set(CRYSTAL_SYSTEMS))
    n = len(rows)
    summary = {
        "n_structures": n,
        "n_groups": len(set(groups)),
        "excluded": {"failed": n_failed, "no_image": n_no_image},
        "structures": {s: sum(structures[s].values()) for s in SPLITS},
        "fraction": {s: round(sum(structures[s].values()) / n, 4) if n else 0.0 for s in SPLITS},
        "images": {s: len(lines[s]) for s in SPLITS},
        "groups": {s: len(group_sets[s]) for s in SPLITS},
        "per_crystal_system": {s: {c: structures[s][c] for c in order} for s in SPLITS},
        "method": METHOD,
        "params": {
            "seed": params.seed,
            # the fractions only: train_sources does not change COD's split (and its bytes stay the same)
            "split": {k: getattr(params.split, k) for k in ("train", "val", "test")},
            "labels.mode": params.labels.mode,
            "stratified_by": "crystal_system",
        },
    }
    write_json(out_dir / "summary.json", summary)
    return summary
