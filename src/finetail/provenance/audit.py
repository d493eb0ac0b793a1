"""Audit: re-hash every file the tracking store names, and say which are ``ok``, ``changed``
or ``missing`` (:func:`audit`); :func:`audit_exit_code` turns that into a process exit status
and :func:`format_audit` into text."""

from __future__ import annotations

import os
from pathlib import Path

from ..layout import Layout
from ..record import (
    INPUT,
    METRICS_JSON,
    OUTPUT,
    OUTPUT_DIR,
    RULE,
    MetricsRecord,
    final_metric,
    tagged_files,
    wildcards_of,
)
from ..tracking import StoredRun
from .files import CHANGED, MISSING, OK, open_store, recorded_uris, resolve, short
from .walk import Walker

__all__ = ["audit", "audit_exit_code", "format_audit"]


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
        MLflow store. Default (:func:`finetail.tracking.choose_tracking_uri`):
        ``MLFLOW_TRACKING_URI``, else the store the study's jobs recorded (metrics.json,
        run.json; a SQLite file in the study folder re-rooted with it) if it still exists,
        else ``results_dir/mlflow.db``.
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
    store = open_store(tracking_uri, rd, recorded_uris(rd))
    if store.uri is None:
        raise FileNotFoundError(f"no tracking store: {Layout.at(rd).mlflow_db()} does not exist "
                                "(give --tracking-uri, or set MLFLOW_TRACKING_URI)")
    if not store.available:
        raise FileNotFoundError(f"tracking store {store.uri} does not exist")
    walker = Walker(rd, store)
    rows: list[dict] = []
    for run in store.all_runs(experiment):
        rows.extend(_audit_run(run, walker, pixels))
    rows.sort(key=lambda r: (r["resolved"], r["role"], r["run_id"]))
    return rows


def _current_metrics(run: StoredRun, walker: Walker) -> tuple[Path | None, bool, list[dict]]:
    """``(metrics.json, current, rows)`` of a run: the metrics.json in its output folder when
    that names this run; ``current`` when the run backs a result there; a ``missing`` row
    when a FINISHED run's metrics.json is gone."""
    out = run.tags.get(OUTPUT_DIR)
    if not out:
        metrics_path = walker.metrics_for(run.run_id, run)
        return metrics_path, metrics_path is not None, []
    candidate = resolve(out, walker.results_dir) / METRICS_JSON
    if candidate.is_file():
        metrics_path = candidate if MetricsRecord.read(candidate).run_id == run.run_id else None
        return metrics_path, metrics_path is not None, []
    if run.status == "FINISHED":
        return None, True, [{"role": METRICS_JSON, "path": str(Path(out) / METRICS_JSON), "resolved": str(candidate),
                             "expected": None, "actual": None, "status": MISSING}]
    return None, False, []


def _audit_run(run: StoredRun, walker: Walker, pixels: bool) -> list[dict]:
    """The audit rows of one run (see :func:`audit`)."""
    rd, base = walker.results_dir, walker.base
    common = {"run_id": run.run_id, "rule": run.tags.get(RULE), "wildcards": wildcards_of(run.tags),
              "run_status": run.status}
    metrics_path, current, found = _current_metrics(run, walker)
    rows = [{**common, **r, "current": current} for r in found]

    def row(role: str, recorded: str, path: Path, expected: str | None) -> dict:
        actual, status = walker.hash.check(path, expected)
        return {**common, "role": role, "path": recorded, "resolved": str(path), "expected": expected,
                "actual": actual, "status": status, "current": current}

    for f in tagged_files(run.tags, INPUT):
        path = resolve(f.path, rd, base)
        rows.append(row(f"{INPUT}.{f.name}", f.path, path, f.sha256))
        if pixels and path.suffix == ".parquet":
            rows.extend({**common, "role": "data", **d, "current": current} for d in walker.data_rows(path))
    # a superseded run's outputs were rewritten by its successor: only the current run's count
    for f in tagged_files(run.tags, OUTPUT) if current else ():
        path = resolve(f.path, rd, base)
        if path.name == METRICS_JSON and metrics_path is not None:
            path = metrics_path
        rows.append(row(f"{OUTPUT}.{f.name}", f.path, path, f.sha256))
    if metrics_path is not None:
        record = MetricsRecord.read(metrics_path)
        rows.extend({**common, **r, "current": current} for r in _final_vs_run(record, run, metrics_path))
        if record.model_sha256:
            model = metrics_path.parent / "model.pt"
            rows.append(row("model", str(model), model, record.model_sha256))
    return rows


def _final_vs_run(record: MetricsRecord, run: StoredRun, metrics_path: Path) -> list[dict]:
    """A metrics.json's final numbers against the ``final_*`` metrics its run logged: a row
    per number that differs (an edited result), else one ``ok`` row."""
    logged = run.metrics
    bad = []
    checked = 0
    for k, v in (record.final or {}).items():
        if not isinstance(v, float) or final_metric(k) not in logged:
            continue
        checked += 1
        if float(logged[final_metric(k)]) != v:
            bad.append({"role": "metrics.final", "path": f"{metrics_path}:final.{k}",
                        "resolved": f"{metrics_path}#final.{k}", "expected": repr(float(logged[final_metric(k)])),
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
    for (_resolved, expected), rs in sorted(by_file.items(), key=lambda kv: (order.get(kv[1][0]["status"], 2), kv[0][0])):
        status = rs[0]["status"]
        counts[status] = counts.get(status, 0) + 1
        stale = "" if any(r.get("current", True) for r in rs) else " (stale runs only)"
        if status == OK and not verbose:
            continue
        runs = ", ".join(f"{r['rule']}:{'/'.join(r['wildcards'].values())}" for r in rs[:4])
        more = f" +{len(rs) - 4}" if len(rs) > 4 else ""
        what = "value" if rs[0]["role"] == "metrics.final" else "sha256"
        now = f" now {short(rs[0]['actual'])}" if status == CHANGED else ""
        lines.append(f"{status:8s} {rs[0]['path']}  {what} {short(expected)}{now}  [{runs}{more}]{stale}")
    lines.append(f"{len(by_file)} files: {counts[OK]} ok, {counts[CHANGED]} changed, {counts[MISSING]} missing")
    running = sorted({f"{r['rule']}:{'/'.join(r['wildcards'].values())} ({r['run_id'][:8]})"
                      for r in rows if r.get("run_status") == "RUNNING"})
    if running:
        lines.append(f"{len(running)} run(s) still RUNNING (a job in progress, or one killed and never rerun; "
                     f"rerunning it continues the same run): {', '.join(running[:6])}")
    return "\n".join(lines)
