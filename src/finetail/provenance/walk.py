"""The lineage walk: from one result back to its run, inputs, parent runs and datasets.

Every training job leaves two records of itself: ``metrics.json`` in its output folder and an
MLflow run (:mod:`finetail.record` defines both). Both name the job's inputs with their
sha256. :func:`lineage` follows them, and :func:`format_lineage` prints the chain.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..layout import Layout, parse_train_dir
from ..record import (
    CONFIG_DIGEST,
    GIT_COMMIT,
    GIT_DIRTY,
    INPUT,
    METRICS_JSON,
    OUTPUT_DIR,
    RULE,
    RUN_JSON,
    MetricsRecord,
    RunFile,
    final_of,
    parent_runs,
    tagged_files,
    wildcards_of,
)
from ..tracking import StoredRun, TrackingStore
from .files import OK, Hasher, metrics_index, open_store, recorded_uris, resolve, results_dir_of, short
from .sources import manifest_sources

__all__ = ["Walker", "format_lineage", "lineage"]

_RUN_ID = re.compile(r"[0-9a-f]{32}")
_INIT_MODEL = "init_model"


class Walker:
    """Follows runs and their records within one study (``results_dir``) and one store."""

    def __init__(self, results_dir: Path | None, store: TrackingStore) -> None:
        self.results_dir = results_dir
        self.store = store
        self.hash = Hasher()
        self._index: dict[str, Path] | None = None
        self._data: dict[Path, list[dict]] = {}

    @property
    def base(self) -> Path | None:
        """The folder Snakemake ran in: relative recorded paths start there."""
        return Path(Layout.at(self.results_dir).base()) if self.results_dir is not None else None

    def data_rows(self, manifest: Path) -> list[dict]:
        """The bytes a manifest's rows point to, against the digests the manifest records
        (array stores: ``store_sha256``; image files: ``sha256``, hashed at prepare time).
        One row per changed, missing or unrecorded file and one ``ok`` row for the rest."""
        from pyarrow import ArrowException

        from ..manifest import data_files

        manifest = Path(manifest)
        if manifest not in self._data:
            rows, ok = [], 0
            try:
                files = data_files(manifest) if manifest.suffix == ".parquet" and manifest.is_file() else []
            except (OSError, ValueError, ArrowException):
                files = []  # an unreadable manifest: its own row already says it changed
            for path, expected in files:
                actual, status = self.hash.check(path, expected)
                if status == OK:
                    ok += 1
                else:
                    rows.append({"path": str(path), "resolved": str(path), "expected": expected,
                                 "actual": actual, "status": status})
            if ok:
                rows.append({"path": f"{manifest} (data: {ok} file(s))", "resolved": f"{manifest}#data",
                             "expected": None, "actual": None, "status": OK})
            self._data[manifest] = rows
        return self._data[manifest]

    def metrics_for(self, run_id: str, run: StoredRun | None = None) -> Path | None:
        """The metrics.json naming ``run_id``: in the run's output_dir, else any training
        job's under results_dir."""
        if run is not None:
            out = run.tags.get(OUTPUT_DIR)
            if out:
                p = resolve(out, self.results_dir) / METRICS_JSON
                if p.is_file() and MetricsRecord.read(p).run_id == run_id:
                    return p.resolve()
        if self._index is None:
            self._index = metrics_index(self.results_dir)
        return self._index.get(run_id)

    def run_node(self, run_id: str | None, metrics_path: Path | None, seen: set[str]) -> dict:
        """A run node (see :func:`lineage`), its parents walked recursively."""
        rec = MetricsRecord.read(metrics_path) if metrics_path is not None else MetricsRecord()
        run_id = run_id or rec.run_id
        run = self.store.get_run(run_id) if run_id else None
        tags = run.tags if run is not None else {}
        warnings: list[str] = []
        if run_id and run is None:
            warnings.append("run not found in the tracking store" if self.store.available
                            else "no tracking store to look the run up in")
        if metrics_path is None:
            warnings.append("no metrics.json names this run")
        final = rec.final
        if final is None and run is not None:
            final = final_of(run.metrics)
        if rec.config_digest and tags.get(CONFIG_DIGEST) not in (None, rec.config_digest):
            warnings.append("config digest differs between metrics.json and the run's tags")
        dirty = tags.get(GIT_DIRTY)
        node: dict[str, Any] = {
            "type": "run",
            "run_id": run_id,
            "rule": rec.rule or tags.get(RULE),
            "wildcards": dict(rec.wildcards if rec.wildcards is not None else wildcards_of(tags)),
            "status": run.status if run is not None else "unknown",
            "config_digest": rec.config_digest or tags.get(CONFIG_DIGEST),
            "git_commit": rec.git_commit or tags.get(GIT_COMMIT),
            "git_dirty": None if dirty is None else dirty == "true",
            "final": {k: v for k, v in (final or {}).items() if not isinstance(v, list | dict)},
            "metrics_json": str(metrics_path) if metrics_path is not None else None,
        }
        node["inputs"] = self._inputs(rec, tags, warnings)
        if rec.extra.get("plugin"):
            node["plugin"] = plugin_node(rec.extra["plugin"])
        if rec.model_sha256 is not None and metrics_path is not None:
            model = metrics_path.parent / "model.pt"
            actual, status = self.hash.check(model, rec.model_sha256)
            node["model"] = {"path": str(model), "sha256": rec.model_sha256, "actual": actual, "status": status}
        node["parents"] = self._parents(run_id, rec, tags, node["inputs"], seen, warnings)
        node["warnings"] = warnings
        return node

    def _inputs(self, rec: MetricsRecord, tags: dict[str, str], warnings: list[str]) -> list[dict]:
        """The run's inputs: metrics.json's record, cross-checked against the run's tags,
        each re-hashed; a manifest also gets its ``kind`` and dataset ``sources``."""
        recorded: dict[str, dict[str, str | None]] = {f.name: {"path": f.path, "sha256": f.sha256}
                                                      for f in rec.input_files()}
        for f in tagged_files(tags, INPUT):
            entry = recorded.setdefault(f.name, {"path": f.path, "sha256": f.sha256})
            if entry.get("sha256") != f.sha256:
                warnings.append(f"input {f.name}: sha256 differs between metrics.json and the run's tags")
        inputs = []
        for name, entry in recorded.items():
            if not entry.get("path"):
                continue
            path = resolve(entry["path"], self.results_dir, self.base)
            actual, status = self.hash.check(path, entry.get("sha256"))
            item: dict[str, Any] = {"type": "input", "role": name, "path": entry["path"], "resolved": str(path),
                                    "sha256": entry.get("sha256"), "actual": actual, "status": status}
            if path.suffix == ".parquet" and path.is_file():
                stage = Layout.at(self.results_dir).stage_of(path) if self.results_dir is not None else None
                item["kind"] = stage or "manifest"
                item["sources"] = manifest_sources(path, self.results_dir)
            inputs.append(item)
        return inputs

    def _parents(self, run_id: str | None, rec: MetricsRecord, tags: dict[str, str], inputs: list[dict],
                 seen: set[str], warnings: list[str]) -> list[dict]:
        """Parent run nodes: the recorded ids, else the run that wrote the init model."""
        parent_ids = [p for p in dict.fromkeys([rec.parent_run_id or "", *parent_runs(tags)]) if p]
        init = next((i for i in inputs if i["role"] == _INIT_MODEL), None)
        init_metrics = Path(init["resolved"]).parent / METRICS_JSON if init else None
        init_run = _run_id_of(init_metrics)
        if not parent_ids and init_run:
            parent_ids.append(init_run)
            warnings.append("parent run found from the init model's folder, not recorded by the run")
        seen = seen | {run_id} if run_id else seen
        parents = []
        for pid in parent_ids:
            if pid in seen:
                warnings.append(f"parent run {pid} already in the chain (cycle)")
                continue
            prun = self.store.get_run(pid)
            pmetrics = self.metrics_for(pid, prun)
            if pmetrics is None and init_run == pid:
                pmetrics = init_metrics.resolve()
            if prun is None and pmetrics is None:
                parents.append({"type": "run", "run_id": pid, "status": "not found", "inputs": [], "parents": [],
                                "warnings": ["parent run is neither in the tracking store nor in a metrics.json"]})
                continue
            pnode = self.run_node(pid, pmetrics, seen)
            if init is not None and pnode.get("model") and init.get("sha256") not in (None, pnode["model"]["sha256"]):
                warnings.append(f"init model sha256 is not the final model of parent run {pid}")
            parents.append(pnode)
        return parents


def _run_id_of(metrics_path: Path | None) -> str | None:
    """The run id a metrics.json names, None when there is no such (readable) file."""
    if metrics_path is None or not metrics_path.is_file():
        return None
    try:
        return MetricsRecord.read(metrics_path).run_id or None
    except (OSError, ValueError):
        return None


def _cell_path(cell: str, results_dir: Path) -> Path:
    """A report cell's metrics.json (:meth:`finetail.layout.Layout.cell`); FileNotFoundError
    naming what the folder above holds when it does not exist."""
    folder = Path(Layout.at(results_dir).cell(cell))
    path = folder / METRICS_JSON
    if not path.is_file():
        near = folder.parent
        options = sorted(p.name for p in near.iterdir() if p.is_dir()) if near.is_dir() else []
        hint = f"; {near} holds {options}" if options else ""
        raise FileNotFoundError(f"no result for cell {cell!r}: {path} does not exist{hint}")
    return path


def _table_row_run(text: str, rd: Path | None) -> str:
    """The run id in row ``n`` of a report table ``"<table>.csv:<n>"``."""
    if rd is None:
        raise ValueError(f"a report row ({text!r}) needs results_dir")
    table, row = text.rsplit(":", 1)
    tpath = Path(table) if Path(table).is_absolute() else rd / table
    if not tpath.is_file():
        raise FileNotFoundError(f"report table {tpath} does not exist")
    import pandas as pd

    df = pd.read_csv(tpath)
    if "run_id" not in df.columns:
        raise ValueError(f"{tpath} has no run_id column")
    if not 0 <= int(row) < len(df):
        raise ValueError(f"{tpath} has rows 0..{len(df) - 1}, not {row}")
    return str(df["run_id"].iloc[int(row)])


def _parse_target(target: str | os.PathLike, rd: Path | None) -> tuple[str | None, Path | None]:
    """``(run id, metrics.json)`` a lineage target names (one of them None)."""
    text = os.fspath(target)
    path = Path(text)
    if path.is_dir():
        path = path / METRICS_JSON
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent} holds no metrics.json")
        return None, path.resolve()
    if path.is_file():
        return None, path.resolve()
    if _RUN_ID.fullmatch(text):
        return text, None
    if re.fullmatch(r".+\.csv:\d+", text):
        return _table_row_run(text, rd), None
    if ":" in text and not path.suffix:
        if rd is None:
            raise ValueError(f"a report cell ({text!r}) needs results_dir")
        return None, _cell_path(text, rd).resolve()
    if path.suffix or os.sep in text:
        raise FileNotFoundError(f"{text} does not exist")
    raise ValueError(f"{text!r} is neither a metrics.json, a run id (32 hex digits) nor a cell "
                     "like 'cbloss:gen10:if10:cb_focal:0' or 'finetune:natural:cub200:seed0' (the seed last)")


def _uris_of(metrics_path: Path) -> list[str | None]:
    """The tracking URIs a job recorded: its metrics.json's, then its run.json's."""
    uris: list[str | None] = [MetricsRecord.read(metrics_path).tracking_uri]
    parsed = parse_train_dir(metrics_path)
    if parsed is not None:
        root, rule, wildcards = parsed
        try:
            uris.append(RunFile.read(Layout.at(root).checkpoint(rule, RUN_JSON, **wildcards)).tracking_uri)
        except (OSError, ValueError, TypeError):
            pass
    return uris


def lineage(target: str | os.PathLike, results_dir: str | os.PathLike | None = None,
            tracking_uri: str | None = None) -> dict:
    """The chain behind one result: run, inputs, parent runs, dataset sources.

    Parameters
    ----------
    target : str or path-like
        One of

        - a ``metrics.json`` (or the folder holding it);
        - an MLflow run id (32 hex digits);
        - a report cell ``"<rule>:<wildcard>:..."`` naming a result folder under
          ``results_dir`` (:meth:`finetail.layout.Layout.cell`), the training seed last:
          ``"cbloss:gen10:if10:cb_focal:0"``, ``"finetune:natural:cub200:seed1"``,
          ``"pretrain:generic:0"``, ``"cbloss_natural:natural:resnet8:softmax:0"``;
        - a row of a report table holding a ``run_id`` column:
          ``"report/transfer_cells.csv:0"`` (path relative to ``results_dir``, row number).
    results_dir : str or path-like, optional
        ``results/<study>``. Read from a metrics.json's place when not given; needed for
        run ids (unless a store is found otherwise) and report cells.
    tracking_uri : str, optional
        MLflow store. Default (:func:`finetail.tracking.choose_tracking_uri`):
        ``MLFLOW_TRACKING_URI``, else the store the job recorded (metrics.json, run.json; a
        SQLite file in the study folder re-rooted with it) if it still exists, else
        ``results_dir/mlflow.db``. Without a store the chain is built from the metrics.json
        files alone (run status ``"unknown"``).

    Returns
    -------
    dict
        A run node: ``type`` ("run"), ``run_id``, ``rule``, ``wildcards``, ``status`` (MLflow's
        FINISHED/FAILED/..., or "unknown"), ``config_digest``, ``git_commit``, ``git_dirty``,
        ``final`` (final metrics), ``metrics_json``, ``inputs`` (each: ``role``, ``path`` as
        recorded, ``resolved``, ``sha256`` recorded, ``actual``, ``status`` ok / changed /
        missing, and for manifests ``kind`` and ``sources``: dataset nodes with ``origin``
        "finetail.world" (``seed``, ``world``, ``sizes``), "registry" (``files``: filename,
        sha256, url) or "imagefolder"), ``model`` (jobs that saved one: path, sha256, actual,
        status), ``parents`` (run nodes, recursively) and ``warnings``.

    Raises
    ------
    FileNotFoundError
        The metrics.json, cell or report table does not exist.
    ValueError
        An unknown run id, a malformed target, or a run id / cell without a results_dir.
    """
    rd = Path(results_dir).resolve() if results_dir is not None else None
    run_id, metrics_path = _parse_target(target, rd)
    if metrics_path is not None:
        rd = rd or results_dir_of(metrics_path)
        store = open_store(tracking_uri, rd, _uris_of(metrics_path))
    else:
        store = open_store(tracking_uri, rd, recorded_uris(rd))
    walker = Walker(rd, store)
    if run_id is not None:
        if not store.available and rd is None:
            raise ValueError(f"looking up run {run_id} needs results_dir or tracking_uri")
        run = store.get_run(run_id)
        metrics_path = walker.metrics_for(run_id, run)
        if run is None and metrics_path is None:
            where = store.uri if store.available else f"the metrics.json files under {rd}"
            raise ValueError(f"unknown run id {run_id}: not in {where}")
    return walker.run_node(run_id, metrics_path, set())


# --------------------------------------------------------------------------- formatting
def _fmt_dataset(node: dict, pad: str) -> list[str]:
    if node.get("type") != "dataset":
        return [f"{pad}? {node.get('note', 'unknown source')}: {', '.join(node.get('folders', []))}"]
    origin = node.get("origin")
    if origin == "finetail.world":
        w = node.get("world", {})
        rest = ", ".join(f"{k}={v}" for k, v in w.items() if k != "seed")
        sizes = ", ".join(f"{k}={v}" for k, v in node.get("sizes", {}).items() if v is not None and k.endswith("per_class"))
        return [f"{pad}dataset {node['name']}: generated (finetail.world) seed={node.get('seed')} {sizes}".rstrip(),
                f"{pad}  world: {rest}", f"{pad}  folder: {node['folder']}"]
    if origin == "registry":
        lines = [f"{pad}dataset {node['name']}: registry {node.get('dataset')} ({node.get('license') or 'licence n/a'})",
                 f"{pad}  folder: {node['folder']}"]
        for f in node.get("files", []):
            lines.append(f"{pad}  file {f['filename']} sha256 {short(f['sha256'])} from {f.get('url') or '?'}")
        return lines
    if origin == "imagefolder":
        return [f"{pad}dataset {node['name']}: imagefolder {node.get('source')} (store {node.get('store')})",
                f"{pad}  folder: {node['folder']}"]
    return [f"{pad}dataset {node['name']}: source.json {json.dumps(node.get('source_json'))[:200]}"]


def _fmt_run(node: dict, indent: int, label: str = "run") -> list[str]:
    pad = "  " * indent
    wc = " ".join(f"{k}={v}" for k, v in (node.get("wildcards") or {}).items())
    lines = [f"{pad}{label} {node.get('run_id')}  {node.get('rule') or '?'} {wc}  [{node.get('status')}]".rstrip()]
    p2 = pad + "  "
    if node.get("status") == "not found" and not node.get("rule"):
        lines += [f"{p2}! {w}" for w in node.get("warnings", [])]
        return lines
    final = node.get("final") or {}
    metric = next((k for k in ("top1_error", "top1_acc") if k in final), None)
    git = (node.get("git_commit") or "?")[:12] + (" (dirty)" if node.get("git_dirty") else "")
    lines.append(f"{p2}config {short(node.get('config_digest'))}  git {git}"
                 + (f"  {metric} {final[metric]:.4f}" if metric else ""))
    if node.get("metrics_json"):
        lines.append(f"{p2}metrics.json {node['metrics_json']}")
    if node.get("model"):
        m = node["model"]
        lines.append(f"{p2}model {m['path']} sha256 {short(m['sha256'])} {m['status']}")
    if node.get("plugin"):
        lines += _fmt_plugin(node["plugin"], p2)
    for inp in node.get("inputs", []):
        note = "" if inp["status"] in (OK, "unrecorded") else f" (now {short(inp['actual'])})" if inp["actual"] else ""
        kind = f" [{inp['kind']}]" if inp.get("kind") else ""
        lines.append(f"{p2}input {inp['role']}{kind} {inp['path']} sha256 {short(inp['sha256'])} {inp['status']}{note}")
        for src in inp.get("sources", []):
            lines += _fmt_dataset(src, p2 + "    ")
    for w in node.get("warnings", []):
        lines.append(f"{p2}! {w}")
    for parent in node.get("parents", []):
        lines += _fmt_run(parent, indent + 1, "parent run")
    return lines


def plugin_node(info: dict) -> dict:
    """A run's plugin (its ``metrics.json`` record, :meth:`finetail.plugins.Plugin.info`) with
    the digest of its files as they are now: ``ok``, ``changed`` (edited since the run: a
    rerun would train other code) or ``missing``."""
    from ..plugins import files_digest

    files = [(rel, Path(path)) for rel, path in info.get("files") or []]
    if not files or not all(p.is_file() for _, p in files):
        status, now = "missing", None
    else:
        now = files_digest(files)
        status = OK if now == info.get("digest") else "changed"
    return {**info, "status": status, "actual": now}


def _fmt_plugin(p: dict, pad: str) -> list[str]:
    dist = f"  {p['distribution']} {p.get('version') or '?'}" if p.get("distribution") else "  (not installed)"
    ep = f"  entry point {p['entry_point']}" if p.get("entry_point") else ""
    note = f" (now {short(p['actual'])})" if p.get("status") == "changed" and p.get("actual") else ""
    lines = [f"{pad}plugin {p.get('kind')} {p.get('ref')} -> {p.get('module')}:{p.get('callable')}{dist}{ep}",
             f"{pad}  code sha256 {p.get('digest')} {p.get('status')}{note}"]
    lines += [f"{pad}  file {rel} {path}" for rel, path in p.get("files") or []]
    return lines


def format_lineage(chain: dict) -> str:
    """A lineage chain (from :func:`lineage`) as an indented tree for the terminal.

    Parameters
    ----------
    chain : dict
        The run node :func:`lineage` returns.

    Returns
    -------
    str
        One line per run, input, dataset and parent, children indented by two spaces;
        inputs end with ok / changed / missing, warnings start with ``!``.
    """
    return "\n".join(_fmt_run(chain, 0))
