"""What lineage and audit share: file digests, recorded paths re-rooted, the records of a
study and the tracking store to read.

Recorded paths are relative to the folder Snakemake ran in (``results/<study>/...``) or
absolute; :func:`resolve` finds where they lie now, so that a study folder moved or copied
elsewhere is followed in its new place. The tracking store is chosen by
:func:`finetail.tracking.choose_tracking_uri` (the same rule as ``finetail train``), the
URI each run recorded re-rooted the same way.
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ..fileio import file_sha256
from ..layout import TRAINING, Layout, parse_train_dir
from ..record import METRICS_JSON, RUN_JSON, MetricsRecord, RunFile
from ..tracking import TrackingStore, choose_tracking_uri, sqlite_path, sqlite_uri

__all__ = [
    "CHANGED",
    "MISSING",
    "OK",
    "Hasher",
    "metrics_index",
    "open_store",
    "recorded_uris",
    "resolve",
    "results_dir_of",
    "short",
]

OK, CHANGED, MISSING = "ok", "changed", "missing"


class Hasher:
    """sha256 of files, each read once per call of the public functions."""

    def __init__(self) -> None:
        self._cache: dict[Path, str | None] = {}

    def __call__(self, path: Path) -> str | None:
        path = Path(path)
        if path not in self._cache:
            self._cache[path] = file_sha256(path) if path.is_file() else None
        return self._cache[path]

    def check(self, path: Path, expected: str | None) -> tuple[str | None, str]:
        """(actual digest, status) of a file against the digest a run recorded."""
        actual = self(path)
        if actual is None:
            return None, MISSING
        if expected is None:
            return actual, "unrecorded"
        return actual, OK if actual == expected else CHANGED


def short(sha: str | None) -> str:
    """The first 12 hex digits of a digest, for text output."""
    return sha[:12] if sha else "-"


def resolve(recorded: str | os.PathLike, results_dir: Path | None, base: Path | None = None) -> Path:
    """Where a recorded path lies now.

    A path containing ``<results>/<study>/`` (the last two parts of ``results_dir``) is
    re-rooted under ``results_dir``; otherwise an absolute path is kept and a relative one is
    taken relative to ``base`` (the directory Snakemake ran in), else the current directory.
    """
    p = Path(recorded)
    if results_dir is not None:
        head, study = results_dir.parent.name, results_dir.name
        parts = p.parts
        for i in range(len(parts) - 1):
            if parts[i] == head and parts[i + 1] == study:
                return results_dir.joinpath(*parts[i + 2 :])
    if p.is_absolute():
        return p
    if base is not None:
        return (base / p).resolve()
    if results_dir is not None:
        return (Path(Layout.at(results_dir).base()) / p).resolve()
    return p.resolve()


def results_dir_of(metrics_path: Path) -> Path | None:
    """``results/<study>`` of a metrics.json: from its folder's place in the layout, else the
    nearest ancestor holding the study's tracking store (``mlflow.db``)."""
    parsed = parse_train_dir(metrics_path)
    if parsed is not None:
        return parsed[0].resolve()
    for anc in metrics_path.parent.parents:
        if Path(Layout.at(anc).mlflow_db()).is_file():
            return anc
    return None


def _records(results_dir: Path | None, file: str) -> list[Path]:
    """Every ``file`` (metrics.json, or run.json beside a checkpoint) of the study's
    training jobs, found through the layout."""
    if results_dir is None or not results_dir.is_dir():
        return []
    lay = Layout.at(glob.escape(str(results_dir)))
    pattern = lay.train_glob if file == METRICS_JSON else lay.checkpoint_glob
    return sorted(Path(p) for rule in TRAINING for p in glob.glob(pattern(rule, file)))


def metrics_index(results_dir: Path | None) -> dict[str, Path]:
    """run id -> metrics.json, for every training job's metrics.json under ``results_dir``."""
    out: dict[str, Path] = {}
    for p in _records(results_dir, METRICS_JSON):
        try:
            rid = MetricsRecord.read(p).run_id
        except (OSError, ValueError, TypeError):
            continue
        if rid:
            out[str(rid)] = p.resolve()
    return out


def recorded_uris(results_dir: Path | None) -> list[str]:
    """The tracking URIs the study's jobs recorded (metrics.json, run.json), most used first."""
    uris: Counter[str] = Counter()
    for file, reader in ((METRICS_JSON, MetricsRecord.read), (RUN_JSON, RunFile.read)):
        for p in _records(results_dir, file):
            try:
                uri = reader(p).tracking_uri
            except (OSError, ValueError, TypeError):
                continue
            if uri:
                uris[uri] += 1
    return [u for u, _ in uris.most_common()]


def _reroot_uri(uri: str, results_dir: Path | None) -> str:
    """A recorded SQLite URI whose file lay in ``<results>/<study>/``, re-rooted like any
    recorded path (a moved or copied study reads its own store); other URIs unchanged."""
    db = sqlite_path(uri)
    if db is None or results_dir is None:
        return uri
    query = uri.split("?", 1)[1] if "?" in uri else ""
    return sqlite_uri(resolve(db, results_dir)) + (f"?{query}" if query else "")


def open_store(tracking_uri: str | None, results_dir: Path | None, recorded: Iterable[str | None] = ()) -> TrackingStore:
    """The store lineage and audit read: ``tracking_uri``, else MLFLOW_TRACKING_URI, else the
    first ``recorded`` URI whose store exists, else ``results_dir``'s ``mlflow.db`` if it
    exists (:func:`finetail.tracking.choose_tracking_uri`); a store with no URI when none."""
    default = Layout.at(results_dir).mlflow_db() if results_dir is not None else None
    candidates = [_reroot_uri(u, results_dir) for u in recorded if u]
    return TrackingStore(choose_tracking_uri(tracking_uri, candidates, default, read_only=True))
