"""Lineage and audit: from a number in the report back to the bytes it came from.

Every training job leaves two records of itself: ``metrics.json`` in its output folder and an
MLflow run (see :mod:`finetail.cli` ``cmd_train`` and :mod:`finetail.tracking`). Both name the
job's inputs with their sha256. This module follows those records:

- :func:`lineage` walks from one result (a ``metrics.json``, an MLflow run id or a report cell)
  to the run that made it, its inputs (and whether each file on disk still has the digest the
  run recorded), its parent runs (fine-tune -> pretrain) and, through the manifests' ``store``
  / ``path`` columns, down to the dataset folders' ``source.json`` (the generator's seed and
  settings, or the URL and checksum of each raw file).
- :func:`audit` re-hashes every file the tracking store names and says which are ``ok``,
  ``changed`` or ``missing``; :func:`audit_exit_code` turns that into a process exit status.

Recorded paths are relative to the directory Snakemake ran in (``results/<study>/...``);
they are resolved against the ``results_dir`` given, so a study folder that was moved or
copied elsewhere is audited in its new place. mlflow is imported inside the functions only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .manifest import file_sha256

__all__ = [
    "OK",
    "CHANGED",
    "MISSING",
    "audit",
    "audit_exit_code",
    "format_audit",
    "format_lineage",
    "lineage",
]

OK, CHANGED, MISSING = "ok", "changed", "missing"
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_INPUT_SHA = re.compile(r"finetail\.input\.(.+)\.sha256")
_OUTPUT_SHA = re.compile(r"finetail\.output\.(.+)\.sha256")


# --------------------------------------------------------------------------- helpers
class _Hasher:
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


def _study_parts(results_dir: Path) -> tuple[str, str]:
    return results_dir.parent.name, results_dir.name


def _resolve(recorded: str | os.PathLike, results_dir: Path | None, base: Path | None = None) -> Path:
    """Where a recorded path lies now.

    A path containing ``<results>/<study>/`` (the last two parts of ``results_dir``) is
    re-rooted under ``results_dir``; otherwise an absolute path is kept and a relative one is
    taken relative to ``base`` (the directory Snakemake ran in), else the current directory.
    """
    p = Path(recorded)
    if results_dir is not None:
        head, study = _study_parts(results_dir)
        parts = p.parts
        for i in range(len(parts) - 1):
            if parts[i] == head and parts[i + 1] == study:
                return results_dir.joinpath(*parts[i + 2 :])
    if p.is_absolute():
        return p
    if base is not None:
        return (base / p).resolve()
    if results_dir is not None:
        return (results_dir.parents[1] / p).resolve()
    return p.resolve()


def _results_dir_of(metrics_path: Path, wildcards: Mapping | None) -> Path | None:
    """Guess ``results/<study>`` from a metrics.json's place: the first ancestor holding
    ``mlflow.db`` or ``datasets/``, else ``<out_dir>.parents[len(wildcards)]``."""
    out_dir = metrics_path.parent
    for anc in out_dir.parents:
        if (anc / "mlflow.db").is_file() or (anc / "datasets").is_dir():
            return anc
        if anc == anc.parent:
            break
    n = len(wildcards or {})
    if n and len(out_dir.parents) > n:
        return out_dir.parents[n]
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _is_sqlite_missing(uri: str) -> bool:
    if not uri.startswith("sqlite:"):
        return False
    db = uri.split("sqlite:///", 1)[-1].split("?", 1)[0]
    return not Path(db).is_file()


def _pick_uri(tracking_uri: str | None, results_dir: Path | None, recorded: str | None = None) -> str | None:
    """Explicit URI, then MLFLOW_TRACKING_URI, then the study's SQLite store, then the URI a
    metrics.json recorded (when its store still exists)."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if results_dir is not None and (results_dir / "mlflow.db").is_file():
        return f"sqlite:///{(results_dir / 'mlflow.db').resolve()}"
    if recorded and not _is_sqlite_missing(recorded):
        return recorded
    return None


class _Store:
    """Read access to the tracking store (created lazily; absent stores read as empty)."""

    def __init__(self, uri: str | None) -> None:
        self.uri = uri
        self._client = None
        self._runs: dict[str, Any] = {}

    @property
    def available(self) -> bool:
        return self.uri is not None and not _is_sqlite_missing(self.uri)

    @property
    def client(self):
        if self._client is None:
            if not self.available:
                raise FileNotFoundError(f"tracking store {self.uri} does not exist")
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def get_run(self, run_id: str):
        """The run, or None when the store lacks it (or there is no store)."""
        if not self.available:
            return None
        if run_id not in self._runs:
            from mlflow.exceptions import MlflowException

            try:
                self._runs[run_id] = self.client.get_run(run_id)
            except MlflowException:
                self._runs[run_id] = None
        return self._runs[run_id]

    def all_runs(self, experiment: str | None = None) -> list:
        from mlflow.entities import ViewType

        if experiment is not None:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                raise ValueError(f"no experiment {experiment!r} in the tracking store {self.uri}")
            ids = [exp.experiment_id]
        else:
            ids = [e.experiment_id for e in self.client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        runs, token = [], None
        while ids:
            page = self.client.search_runs(ids, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
        return runs


def _metrics_index(results_dir: Path | None) -> dict[str, Path]:
    """run id -> metrics.json, for every metrics.json under ``results_dir``."""
    out: dict[str, Path] = {}
    if results_dir is None or not results_dir.is_dir():
        return out
    for p in results_dir.rglob("metrics.json"):
        try:
            rid = json.loads(p.read_text()).get("run_id")
        except (OSError, json.JSONDecodeError):
            continue
        if rid:
            out[str(rid)] = p.resolve()
    return out


# --------------------------------------------------------------------------- datasets
def _dataset_node(folder: Path, results_dir: Path | None) -> dict:
    """A dataset folder and what its ``source.json`` says about its origin."""
    sj = _read_json(folder / "source.json")
    node: dict[str, Any] = {"type": "dataset", "name": folder.name, "folder": str(folder)}
    if sj.get("source") == "finetail.world":
        world = sj.get("world", {})
        node.update(origin="finetail.world", seed=world.get("seed"), world=world, sizes=sj.get("sizes", {}),
                    images=sj.get("images"), classes=sj.get("classes"))
    elif isinstance(sj.get("files"), Mapping):
        files = []
        urls: dict[str, str] = {}
        try:
            from .datasets.registry import get

            urls = {f.filename: f.url for f in get(sj.get("dataset", folder.name)).files}
        except (ValueError, KeyError, ImportError):
            pass
        for name, sha in sj["files"].items():
            files.append({"filename": name, "sha256": sha, "url": urls.get(name)})
        node.update(origin="registry", dataset=sj.get("dataset"), license=sj.get("license"),
                    homepage=sj.get("homepage"), files=files)
    elif sj.get("dataset") == "imagefolder":
        node.update(origin="imagefolder", source=sj.get("source"), store=sj.get("kind"))
    else:
        node.update(origin="unknown", source_json=sj)
    return node


def _find_dataset_folder(path: Path, stop: Path | None) -> Path | None:
    """The nearest folder at or above ``path`` holding ``source.json`` (not above ``stop``)."""
    for d in (path, *path.parents):
        if (d / "source.json").is_file():
            return d
        if stop is not None and d == stop:
            break
    return None


def _file_dataset_roots(results_dir: Path | None) -> dict[Path, Path]:
    """Root of the image files of each file-store dataset -> its dataset folder (registry
    datasets keep their files under resources/, away from source.json)."""
    import pandas as pd

    roots: dict[Path, Path] = {}
    if results_dir is None or not (results_dir / "datasets").is_dir():
        return roots
    for sj in sorted((results_dir / "datasets").glob("*/source.json")):
        m = sj.parent / "manifest.parquet"
        if not m.is_file():
            continue
        df = pd.read_parquet(m)
        if "path" not in df.columns or df.empty:
            continue
        parents = {os.path.normpath(m.parent / os.path.dirname(p)) for p in df["path"].unique()}
        roots[Path(os.path.commonpath(sorted(parents)))] = sj.parent
    return roots


def _manifest_sources(manifest: Path, results_dir: Path | None) -> list[dict]:
    """Dataset nodes a manifest's rows point into (through ``store`` or ``path``)."""
    import pandas as pd
    import pyarrow.parquet as pq

    if (manifest.parent / "source.json").is_file():
        return [_dataset_node(manifest.parent, results_dir)]
    cols = [c for c in ("store", "path") if c in pq.read_schema(manifest).names]
    if not cols:
        return []
    df = pd.read_parquet(manifest, columns=cols)
    folders: list[Path] = []
    unmatched: list[Path] = []
    dirs = set()
    for col in cols:
        for v in df[col].dropna().unique():
            dirs.add(Path(os.path.normpath(manifest.parent / (v if col == "store" else os.path.dirname(v)))))
    stop = results_dir
    roots = None
    for d in sorted(dirs):
        start = d.parent if d.suffix else d  # a store file -> its folder
        f = _find_dataset_folder(start, stop)
        if f is None:
            if roots is None:
                roots = _file_dataset_roots(results_dir)
            f = next((ds for root, ds in roots.items() if start == root or root in start.parents), None)
        if f is None:
            unmatched.append(start)
        elif f not in folders:
            folders.append(f)
    nodes = [_dataset_node(f, results_dir) for f in folders]
    if unmatched:
        nodes.append({"type": "unknown", "note": "rows point into folders with no source.json",
                      "folders": [str(u) for u in unmatched[:5]], "count": len(unmatched)})
    return nodes


def _manifest_kind(path: Path, results_dir: Path | None) -> str:
    if results_dir is not None:
        try:
            return path.relative_to(results_dir).parts[0]  # datasets, longtail, sources, ...
        except (ValueError, IndexError):
            pass
    return "manifest"


# --------------------------------------------------------------------------- runs
class _Walker:
    def __init__(self, results_dir: Path | None, store: _Store) -> None:
        self.results_dir = results_dir
        self.store = store
        self.hash = _Hasher()
        self._index: dict[str, Path] | None = None
        self._data: dict[Path, list[dict]] = {}

    def data_rows(self, manifest: Path) -> list[dict]:
        """The bytes a manifest's rows point to, against the digests the manifest records
        (array stores: ``store_sha256``; image files: ``sha256``, hashed at prepare time).
        One row per changed, missing or unrecorded file and one ``ok`` row for the rest."""
        from pyarrow import ArrowException

        from .manifest import data_files

        manifest = Path(manifest)
        if manifest not in self._data:
            rows, ok = [], 0
            try:
                files = data_files(manifest) if manifest.suffix == ".parquet" and manifest.is_file() else []
            except (OSError, ValueError, ArrowException):
                files = []  # an unreadable manifest: its own row already says it changed
            if files:
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

    def metrics_for(self, run_id: str, run=None) -> Path | None:
        """The metrics.json naming ``run_id``: in the run's output_dir, else anywhere under
        results_dir."""
        if run is not None:
            out = run.data.tags.get("finetail.output_dir")
            if out:
                p = _resolve(out, self.results_dir) / "metrics.json"
                if p.is_file() and json.loads(p.read_text()).get("run_id") == run_id:
                    return p.resolve()
        if self._index is None:
            self._index = _metrics_index(self.results_dir)
        return self._index.get(run_id)

    def run_node(self, run_id: str | None, metrics_path: Path | None, seen: set[str]) -> dict:
        record = _read_json(metrics_path) if metrics_path is not None else {}
        run_id = run_id or record.get("run_id")
        run = self.store.get_run(run_id) if run_id else None
        tags = dict(run.data.tags) if run is not None else {}
        warnings: list[str] = []
        if run_id and run is None:
            warnings.append("run not found in the tracking store" if self.store.available
                            else "no tracking store to look the run up in")
        if metrics_path is None:
            warnings.append("no metrics.json names this run")
        wildcards = record.get("wildcards")
        if wildcards is None:
            wildcards = {k.split("finetail.wildcard.", 1)[1]: v for k, v in sorted(tags.items())
                         if k.startswith("finetail.wildcard.")}
        final = record.get("final")
        if final is None and run is not None:
            final = {k[len("final_"):]: v for k, v in run.data.metrics.items() if k.startswith("final_")}
        final = {k: v for k, v in (final or {}).items() if not isinstance(v, list | dict)}
        digest = record.get("config_digest") or tags.get("finetail.config_digest")
        if record.get("config_digest") and tags.get("finetail.config_digest") not in (None, record["config_digest"]):
            warnings.append("config digest differs between metrics.json and the run's tags")
        dirty = tags.get("finetail.git_dirty")
        node: dict[str, Any] = {
            "type": "run",
            "run_id": run_id,
            "rule": record.get("rule") or tags.get("finetail.rule"),
            "wildcards": dict(wildcards),
            "status": run.info.status if run is not None else "unknown",
            "config_digest": digest,
            "git_commit": record.get("git_commit") or tags.get("mlflow.source.git.commit"),
            "git_dirty": None if dirty is None else dirty == "true",
            "final": final,
            "metrics_json": str(metrics_path) if metrics_path is not None else None,
        }
        base = self.results_dir.parents[1] if self.results_dir is not None else None

        # inputs: metrics.json's record, cross-checked against the run's tags
        recorded: dict[str, dict[str, str | None]] = {}
        rec_inputs = record.get("inputs", {})
        for key, val in rec_inputs.items():
            if not key.endswith("_sha256"):
                recorded.setdefault(key, {})["path"] = val
                recorded[key]["sha256"] = rec_inputs.get(f"{key}_sha256")
        for key, val in tags.items():
            m = _INPUT_SHA.fullmatch(key)
            if m:
                name = m.group(1)
                entry = recorded.setdefault(name, {"path": tags.get(f"finetail.input.{name}"), "sha256": val})
                if entry.get("sha256") != val:
                    warnings.append(f"input {name}: sha256 differs between metrics.json and the run's tags")
        inputs = []
        for name, entry in recorded.items():
            if not entry.get("path"):
                continue
            path = _resolve(entry["path"], self.results_dir, base)
            actual, status = self.hash.check(path, entry.get("sha256"))
            item: dict[str, Any] = {"type": "input", "role": name, "path": entry["path"], "resolved": str(path),
                                    "sha256": entry.get("sha256"), "actual": actual, "status": status}
            if path.suffix == ".parquet" and path.is_file():
                item["kind"] = _manifest_kind(path, self.results_dir)
                item["sources"] = _manifest_sources(path, self.results_dir)
            inputs.append(item)
        node["inputs"] = inputs
        if "model_sha256" in record and metrics_path is not None:
            model = metrics_path.parent / "model.pt"
            actual, status = self.hash.check(model, record["model_sha256"])
            node["model"] = {"path": str(model), "sha256": record["model_sha256"], "actual": actual, "status": status}

        # parents: recorded ids, then the run that wrote the init model
        parent_ids: list[str] = []
        for pid in (record.get("parent_run_id"), tags.get("mlflow.parentRunId"),
                    *(tags.get("finetail.parent_runs") or "").split(",")):
            pid = (pid or "").strip()
            if pid and pid not in parent_ids:
                parent_ids.append(pid)
        init = next((i for i in inputs if i["role"] == "init_model"), None)
        init_metrics = Path(init["resolved"]).parent / "metrics.json" if init else None
        if not parent_ids and init_metrics is not None and init_metrics.is_file():
            pid = _read_json(init_metrics).get("run_id")
            if pid:
                parent_ids.append(pid)
                warnings.append("parent run found from the init model's folder, not recorded by the run")
        seen = seen | {run_id} if run_id else seen
        parents = []
        for pid in parent_ids:
            if pid in seen:
                warnings.append(f"parent run {pid} already in the chain (cycle)")
                continue
            prun = self.store.get_run(pid)
            pmetrics = self.metrics_for(pid, prun)
            if pmetrics is None and init_metrics is not None and init_metrics.is_file() \
                    and _read_json(init_metrics).get("run_id") == pid:
                pmetrics = init_metrics.resolve()
            if prun is None and pmetrics is None:
                parents.append({"type": "run", "run_id": pid, "status": "not found", "inputs": [], "parents": [],
                                "warnings": ["parent run is neither in the tracking store nor in a metrics.json"]})
                continue
            pnode = self.run_node(pid, pmetrics, seen)
            if init is not None and pnode.get("model") and init.get("sha256") not in (None, pnode["model"]["sha256"]):
                warnings.append(f"init model sha256 is not the final model of parent run {pid}")
            parents.append(pnode)
        node["parents"] = parents
        node["warnings"] = warnings
        return node


def _cell_path(cell: str, results_dir: Path) -> Path:
    """``"cbloss:gen10:if10:cb_focal"`` -> ``results_dir/cbloss/gen10/if10/cb_focal/metrics.json``."""
    stage, *parts = cell.split(":")
    if stage == "cbloss" and len(parts) >= 2 and not parts[1].startswith("if"):
        parts[1] = f"if{parts[1]}"
    folder = results_dir.joinpath(stage, *parts)
    path = folder / "metrics.json"
    if not path.is_file():
        near = folder.parent
        options = sorted(p.name for p in near.iterdir() if p.is_dir()) if near.is_dir() else []
        hint = f"; {near} holds {options}" if options else ""
        raise FileNotFoundError(f"no result for cell {cell!r}: {path} does not exist{hint}")
    return path


def lineage(target: str | os.PathLike, results_dir: str | os.PathLike | None = None,
            tracking_uri: str | None = None) -> dict:
    """The chain behind one result: run, inputs, parent runs, dataset sources.

    Parameters
    ----------
    target : str or path-like
        One of

        - a ``metrics.json`` (or the folder holding it);
        - an MLflow run id (32 hex digits);
        - a report cell ``"<stage>:<wildcard>:..."`` naming a result folder under
          ``results_dir``: ``"cbloss:gen10:if10:cb_focal"``, ``"finetune:natural:cub200"``,
          ``"pretrain:generic"``, ``"cbloss_natural:natural:resnet8:softmax"``;
        - a row of a report table holding a ``run_id`` column:
          ``"report/transfer_cells.csv:0"`` (path relative to ``results_dir``, row number).
    results_dir : str or path-like, optional
        ``results/<study>``. Guessed from a metrics.json's place when not given; needed for
        run ids (unless ``tracking_uri`` is given) and report cells.
    tracking_uri : str, optional
        MLflow store. Default: ``MLFLOW_TRACKING_URI``, else ``results_dir/mlflow.db``, else
        the URI the metrics.json recorded. Without a store the chain is built from the
        metrics.json files alone (run status ``"unknown"``).

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
    text = os.fspath(target)
    path = Path(text)
    run_id = None
    metrics_path: Path | None = None
    if path.is_dir():
        path = path / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent} holds no metrics.json")
        metrics_path = path.resolve()
    elif path.is_file():
        metrics_path = path.resolve()
    elif _RUN_ID.fullmatch(text):
        run_id = text
    elif re.fullmatch(r".+\.csv:\d+", text):
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
        run_id = str(df["run_id"].iloc[int(row)])
    elif ":" in text and not path.suffix:
        if rd is None:
            raise ValueError(f"a report cell ({text!r}) needs results_dir")
        metrics_path = _cell_path(text, rd).resolve()
    elif path.suffix or os.sep in text:
        raise FileNotFoundError(f"{text} does not exist")
    else:
        raise ValueError(f"{text!r} is neither a metrics.json, a run id (32 hex digits) nor a cell "
                         "like 'cbloss:gen10:if10:cb_focal' or 'finetune:natural:cub200'")

    recorded_uri = None
    if metrics_path is not None:
        record = _read_json(metrics_path)
        if rd is None:
            rd = _results_dir_of(metrics_path, record.get("wildcards"))
        recorded_uri = record.get("tracking_uri")
    store = _Store(_pick_uri(tracking_uri, rd, recorded_uri))
    walker = _Walker(rd, store)
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
def _short(sha: str | None) -> str:
    return sha[:12] if sha else "-"


def _fmt_dataset(node: dict, pad: str) -> list[str]:
    if node.get("type") != "dataset":
        return [f"{pad}? {node.get('note', 'unknown source')}: {', '.join(node.get('folders', []))}"]
    origin = node.get("origin")
    if origin == "finetail.world":
        w = node.get("world", {})
        rest = ", ".join(f"{k}={v}" for k, v in w.items() if k != "seed")
        sizes = ", ".join(f"{k}={v}" for k, v in node.get("sizes", {}).items() if v is not None and k.endswith("per_class"))
        lines = [f"{pad}dataset {node['name']}: generated (finetail.world) seed={node.get('seed')} {sizes}".rstrip(),
                 f"{pad}  world: {rest}", f"{pad}  folder: {node['folder']}"]
        return lines
    if origin == "registry":
        lines = [f"{pad}dataset {node['name']}: registry {node.get('dataset')} ({node.get('license') or 'licence n/a'})",
                 f"{pad}  folder: {node['folder']}"]
        for f in node.get("files", []):
            lines.append(f"{pad}  file {f['filename']} sha256 {_short(f['sha256'])} from {f.get('url') or '?'}")
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
    lines.append(f"{p2}config {_short(node.get('config_digest'))}  git {git}"
                 + (f"  {metric} {final[metric]:.4f}" if metric else ""))
    if node.get("metrics_json"):
        lines.append(f"{p2}metrics.json {node['metrics_json']}")
    if node.get("model"):
        m = node["model"]
        lines.append(f"{p2}model {m['path']} sha256 {_short(m['sha256'])} {m['status']}")
    for inp in node.get("inputs", []):
        note = "" if inp["status"] in (OK, "unrecorded") else f" (now {_short(inp['actual'])})" if inp["actual"] else ""
        kind = f" [{inp['kind']}]" if inp.get("kind") else ""
        lines.append(f"{p2}input {inp['role']}{kind} {inp['path']} sha256 {_short(inp['sha256'])} {inp['status']}{note}")
        for src in inp.get("sources", []):
            lines += _fmt_dataset(src, p2 + "    ")
    for w in node.get("warnings", []):
        lines.append(f"{p2}! {w}")
    for parent in node.get("parents", []):
        lines += _fmt_run(parent, indent + 1, "parent run")
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


# --------------------------------------------------------------------------- audit
def audit(results_dir: str | os.PathLike, tracking_uri: str | None = None, experiment: str | None = None,
          pixels: bool = True) -> list[dict]:
    """Re-hash every file the tracking store names, and each run's saved model.

    For every run: each ``finetail.input.<name>`` path against its
    ``finetail.input.<name>.sha256`` tag (manifests, array stores, init models); for each
    input manifest, the bytes its rows point to against the digests it records (role
    ``data``: array stores, and every image file of a file manifest, so a changed pixel is
    caught); for the run that backs a result, each ``finetail.output.<name>`` file
    (metrics.json, per_class.csv, history.csv, model.pt) against its recorded sha256, and the
    metrics.json's final numbers against the ``final_*`` metrics the run logged (role
    ``metrics.final``: an edited number is caught even in a metrics.json that predates output
    digests); and, where the metrics.json records ``model_sha256``, the ``model.pt`` beside
    it. A FINISHED run whose output folder lost its metrics.json gives a ``metrics.json``
    row with status ``missing``.

    Parameters
    ----------
    results_dir : str or path-like
        ``results/<study>``; recorded paths are re-rooted under it.
    tracking_uri : str, optional
        MLflow store. Default: ``MLFLOW_TRACKING_URI``, else ``results_dir/mlflow.db``.
    experiment : str, optional
        Only this experiment's runs (default: every experiment in the store; pass
        ``finetail-<study>`` when the store is a server shared between studies).
    pixels : bool
        Re-hash the bytes each input manifest points to (role ``data``). Default True; False
        skips them (a quick audit of a study on real data, which would read every image), and
        the array stores recorded as inputs are still checked.

    Returns
    -------
    list of dict
        One row per (run, file), sorted by path: ``path`` (as recorded), ``resolved``,
        ``role`` (``input.manifest``, ``input.init_model``, ``model``, ``metrics.json``),
        ``expected``, ``actual`` (sha256 now, None when missing), ``status`` (ok / changed /
        missing), ``run_id``, ``rule``, ``wildcards``, ``run_status`` and ``current``
        (False when the run's output folder now holds another run's metrics.json, or the run
        did not finish: its inputs no longer back any result).

    Raises
    ------
    FileNotFoundError
        ``results_dir`` or its default SQLite store does not exist.
    ValueError
        ``experiment`` is not in the store.
    """
    rd = Path(results_dir).resolve()
    if not rd.is_dir():
        raise FileNotFoundError(f"results folder {rd} does not exist")
    uri = _pick_uri(tracking_uri, rd)
    if uri is None:
        raise FileNotFoundError(f"no tracking store: {rd / 'mlflow.db'} does not exist (pass tracking_uri)")
    store = _Store(uri)
    if not store.available:
        raise FileNotFoundError(f"tracking store {uri} does not exist")
    walker = _Walker(rd, store)
    base = rd.parents[1]
    rows: list[dict] = []
    for run in store.all_runs(experiment):
        tags = run.data.tags
        rid = run.info.run_id
        wildcards = {k.split("finetail.wildcard.", 1)[1]: v for k, v in sorted(tags.items())
                     if k.startswith("finetail.wildcard.")}
        common = {"run_id": rid, "rule": tags.get("finetail.rule"), "wildcards": wildcards,
                  "run_status": run.info.status}
        metrics_path = None
        current = False
        out = tags.get("finetail.output_dir")
        if out:
            candidate = _resolve(out, rd) / "metrics.json"
            if candidate.is_file():
                metrics_path = candidate if _read_json(candidate).get("run_id") == rid else None
                current = metrics_path is not None
            elif run.info.status == "FINISHED":
                current = True
                rows.append({**common, "role": "metrics.json", "path": str(Path(out) / "metrics.json"),
                             "resolved": str(candidate), "expected": None, "actual": None, "status": MISSING,
                             "current": True})
        if metrics_path is None and not out:
            metrics_path = walker.metrics_for(rid, run)
            current = metrics_path is not None
        for name, recorded, expected in _tagged_files(tags, "input"):
            path = _resolve(recorded, rd, base)
            actual, status = walker.hash.check(path, expected)
            rows.append({**common, "role": f"input.{name}", "path": recorded, "resolved": str(path),
                         "expected": expected, "actual": actual, "status": status, "current": current})
            if pixels and path.suffix == ".parquet":
                rows.extend({**common, "role": "data", **d, "current": current} for d in walker.data_rows(path))
        # a superseded run's outputs were rewritten by its successor: only the current run's count
        for name, recorded, expected in _tagged_files(tags, "output") if current else ():
            path = _resolve(recorded, rd, base)
            if path.name == "metrics.json" and metrics_path is not None:
                path = metrics_path
            actual, status = walker.hash.check(path, expected)
            rows.append({**common, "role": f"output.{name}", "path": recorded, "resolved": str(path),
                         "expected": expected, "actual": actual, "status": status, "current": current})
        if metrics_path is not None:
            record = _read_json(metrics_path)
            rows.extend({**common, **r, "current": current} for r in _final_vs_run(record, run, metrics_path))
            if record.get("model_sha256"):
                model = metrics_path.parent / "model.pt"
                actual, status = walker.hash.check(model, record["model_sha256"])
                rows.append({**common, "role": "model", "path": str(model), "resolved": str(model),
                             "expected": record["model_sha256"], "actual": actual, "status": status,
                             "current": current})
    rows.sort(key=lambda r: (r["resolved"], r["role"], r["run_id"]))
    return rows


def _tagged_files(tags: Mapping[str, str], kind: str):
    """``(name, recorded path, recorded sha256)`` of each ``finetail.<kind>.<name>`` file a
    run's tags name (``kind``: ``input`` or ``output``)."""
    pattern = _INPUT_SHA if kind == "input" else _OUTPUT_SHA
    for key, expected in sorted(tags.items()):
        m = pattern.fullmatch(key)
        recorded = tags.get(f"finetail.{kind}.{m.group(1)}") if m else None
        if recorded:
            yield m.group(1), recorded, expected


def _final_vs_run(record: dict, run, metrics_path: Path) -> list[dict]:
    """A metrics.json's final numbers against the ``final_*`` metrics its run logged: a row
    per number that differs (an edited result), else one ``ok`` row."""
    logged = run.data.metrics
    bad = []
    checked = 0
    for k, v in (record.get("final") or {}).items():
        if not isinstance(v, float) or f"final_{k}" not in logged:
            continue
        checked += 1
        if float(logged[f"final_{k}"]) != v:
            bad.append({"role": "metrics.final", "path": f"{metrics_path}:final.{k}",
                        "resolved": f"{metrics_path}#final.{k}", "expected": repr(float(logged[f'final_{k}'])),
                        "actual": repr(v), "status": CHANGED})
    if bad or not checked:
        return bad
    return [{"role": "metrics.final", "path": f"{metrics_path}:final", "resolved": f"{metrics_path}#final",
             "expected": None, "actual": None, "status": OK}]


def audit_exit_code(rows: list[dict], include_stale: bool = False) -> int:
    """Exit status of an audit: 0 when every file is ok, 1 when any changed or went missing.

    Parameters
    ----------
    rows : list of dict
        From :func:`audit`.
    include_stale : bool
        Also count rows of runs that no longer back a result (``current`` False): superseded
        reruns, failed or killed runs. Default False: their inputs may have changed
        legitimately since.

    Returns
    -------
    int
        0 or 1.
    """
    bad = [r for r in rows if r["status"] in (CHANGED, MISSING) and (include_stale or r.get("current", True))]
    return 1 if bad else 0


def format_audit(rows: list[dict], verbose: bool = False) -> str:
    """An audit as text: one line per file (not-ok lines first) and a summary line.

    Parameters
    ----------
    rows : list of dict
        From :func:`audit`.
    verbose : bool
        Also list the ok files.

    Returns
    -------
    str
    """
    by_file: dict[tuple[str, str | None], list[dict]] = {}
    for r in rows:
        by_file.setdefault((r["resolved"], r["expected"]), []).append(r)
    lines = []
    counts = {OK: 0, CHANGED: 0, MISSING: 0}
    order = {CHANGED: 0, MISSING: 1}
    for (resolved, expected), rs in sorted(by_file.items(), key=lambda kv: (order.get(kv[1][0]["status"], 2), kv[0][0])):
        status = rs[0]["status"]
        counts[status] = counts.get(status, 0) + 1
        stale = "" if any(r.get("current", True) for r in rs) else " (stale runs only)"
        if status == OK and not verbose:
            continue
        runs = ", ".join(f"{r['rule']}:{'/'.join(r['wildcards'].values())}" for r in rs[:4])
        more = f" +{len(rs) - 4}" if len(rs) > 4 else ""
        what = "value" if rs[0]["role"] == "metrics.final" else "sha256"
        now = f" now {_short(rs[0]['actual'])}" if status == CHANGED else ""
        lines.append(f"{status:8s} {rs[0]['path']}  {what} {_short(expected)}{now}  [{runs}{more}]{stale}")
    lines.append(f"{len(by_file)} files: {counts[OK]} ok, {counts[CHANGED]} changed, {counts[MISSING]} missing")
    running = sorted({f"{r['rule']}:{'/'.join(r['wildcards'].values())} ({r['run_id'][:8]})"
                      for r in rows if r.get("run_status") == "RUNNING"})
    if running:
        lines.append(f"{len(running)} run(s) still RUNNING (a job in progress, or one killed and never rerun; "
                     f"rerunning it continues the same run): {', '.join(running[:6])}")
    return "\n".join(lines)
