"""Removing files nothing will read again: `noisy-student gc URL`.

Readers trust manifests, never listings, so a shard that no manifest names is invisible:
an append killed before its commit, or a first ingest killed before its manifest, leaves
`part-*` files that nothing reads and nothing removes. This finds them.

What counts as named, folder by folder (a dataset split, a run's pseudo labels or
selection, any folder holding `part-*` files):

- a `part-*` file is named when `_manifest.json` or any version under `_manifests/` in
  the same folder lists it in `shards`, a `removed-*` file (ids that left a split) when
  one lists it in `removed`; named files are never touched;
- a folder of shards with no manifest at all is a write that never finished;
- inside a pipeline run (`…/runs/<run-id>/`, as `artifacts` lays runs out), only a run
  that finished (its `summary.json` exists) is looked at: an unfinished run's files are
  what a resume picks up, so all of them are kept, manifest or not. Checkpoints, training
  states, reports and Prefect's results are never collected: only shards and the
  temporary files (`*.tmp-*`) a killed write leaves behind.

Only files older than the threshold go (one day by default), so that a write still in
progress, which has written its shards but not yet its manifest, keeps them. A manifest
that cannot be read stops gc for that URL: a folder whose names are unknown is not
cleaned by guesswork.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass

from noisy_student.data import dataset, storage
from noisy_student.errors import UserError

SHARD_PREFIX = "part-"
# the files a manifest names: shards, and the ids that left the split
NAMED_PREFIXES = (SHARD_PREFIX, dataset.REMOVED_PREFIX)
RUNS = "runs"  # <artifacts>/runs/<run-id>/…: see flows/noisy_student.py
SUMMARY = "summary.json"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Orphan:
    url: str
    size: int
    age_seconds: float
    reason: str


def parse_age(text: str) -> float:
    """'1d', '12h', '30m', '90s', '2w' or a number of seconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise UserError(
            f"--older-than {text!r}: expected a number with a unit s, m, h, d or w (e.g. 1d, 12h)"
        )
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _split(url: str) -> tuple[str, str]:
    folder, _, name = url.rstrip("/").rpartition("/")
    return folder, name


def _run_folder(folder: str) -> str | None:
    """The pipeline run a folder belongs to, from the layout `…/runs/<run-id>/…`."""
    parts = folder.split("/")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == RUNS:
            return "/".join(parts[: i + 2])
    return None


def _named_shards(folder: str, names: set[str], history: list[str]) -> set[str]:
    """Every shard file any manifest version in `folder` lists."""
    manifests = [storage.join(folder, dataset.MANIFEST)] if dataset.MANIFEST in names else []
    manifests += history
    named: set[str] = set()
    for url in manifests:
        try:
            manifest = storage.read_json(url)
            named.update(s["file"] for s in manifest["shards"] + manifest.get("removed", []))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"{url}: unreadable manifest ({type(e).__name__}); gc leaves this folder alone "
                "until it is fixed"
            ) from None
    return named


def find_orphans(url: str, older_than: float, now: float | None = None) -> list[Orphan]:
    """The files under `url` that no manifest or run names, older than `older_than`
    seconds, sorted by URL. Reads only listings and manifests."""
    root = storage.resolve(url)
    if not storage.exists(root):
        raise UserError(f"{root}: no such folder")
    now = time.time() if now is None else now
    by_folder: dict[str, dict[str, storage.FileInfo]] = defaultdict(dict)
    for info in storage.find_files(root):
        folder, name = _split(info.url)
        by_folder[folder][name] = info
    finished: dict[str, bool] = {}

    def run_finished(run: str) -> bool:
        if run not in finished:
            finished[run] = SUMMARY in by_folder.get(run, {})
        return finished[run]

    def old(info: storage.FileInfo) -> float | None:
        # a store that gives no modification time gives no age: such a file is kept
        if info.modified is None:
            return None
        age = now - info.modified
        return age if age >= older_than else None

    orphans = []
    for folder, files in sorted(by_folder.items()):
        run = _run_folder(folder)
        if run is not None and not run_finished(run):
            continue
        for name, info in files.items():
            if storage.TMP_SUFFIX in name and (age := old(info)) is not None:
                orphans.append(Orphan(info.url, info.size, age, "left by a killed write"))
        shards = {n: i for n, i in files.items() if n.startswith(NAMED_PREFIXES)}
        shards = {n: i for n, i in shards.items() if storage.TMP_SUFFIX not in n}
        if not shards:
            continue
        history = [
            i.url
            for n, i in sorted(by_folder.get(storage.join(folder, dataset.HISTORY), {}).items())
            if n.endswith(".json")
        ]
        has_manifest = dataset.MANIFEST in files or bool(history)
        named = _named_shards(folder, set(files), history) if has_manifest else set()
        reason = "named by no manifest version" if has_manifest else "in a folder with no manifest"
        for name, info in sorted(shards.items()):
            if name not in named and (age := old(info)) is not None:
                orphans.append(Orphan(info.url, info.size, age, reason))
    return sorted(orphans, key=lambda o: o.url)


def remove(orphans: list[Orphan]) -> None:
    """Delete what `find_orphans` found. Each folder's manifests are read again first, so
    a commit that landed since the listing keeps the shards it now names."""
    by_folder: dict[str, list[Orphan]] = defaultdict(list)
    for o in orphans:
        by_folder[_split(o.url)[0]].append(o)
    for folder, found in by_folder.items():
        history_url = storage.join(folder, dataset.HISTORY)
        history = (
            [f.url for f in storage.find_files(history_url) if f.url.endswith(".json")]
            if storage.exists(history_url)
            else []
        )
        current = storage.exists(storage.join(folder, dataset.MANIFEST))
        named = _named_shards(folder, {dataset.MANIFEST} if current else set(), history)
        for o in found:
            if _split(o.url)[1] not in named:
                storage.remove(o.url)


def format_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f}{unit}"
    return f"{seconds:.0f}s"
