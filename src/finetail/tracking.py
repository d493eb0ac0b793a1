"""MLflow tracking: the only module that imports mlflow.

One run per training job (:class:`Tracker`; a training job drives it through
:class:`TrackerProcess`, which builds it in a child process while the job imports torch).
Params are the job's config subtree (flattened),
metrics are logged per epoch with ``step=epoch``, tags carry the lineage (rule, wildcards,
git commit, config digest, input and output digests, parent run ids; their names are
:mod:`finetail.record`'s), artifacts are the job's result files. Lineage and audit read the
store back through :class:`TrackingStore` (read-only, runs as :class:`StoredRun`).

Which store: one rule for ``finetail train``, ``finetail lineage`` and ``finetail audit``
(:func:`choose_tracking_uri`): the ``--tracking-uri`` flag, then ``MLFLOW_TRACKING_URI``,
then the config's ``tracking.uri`` (train) or the URI the runs recorded (lineage, audit;
if that store still exists), then the study's SQLite file ``results/<study>/mlflow.db``.

The default store is a SQLite database under ``results/<study>/``. SQLite allows one writer
at a time, so every write from every process goes through an exclusive ``flock`` on a lock
file beside the database (and the connection waits up to 60 s as well): parallel jobs lose no
run and never fail on "database is locked". Files under ``results/`` stay the source of truth.

Experiments finetail creates carry the tag ``mlflow.experimentKind = custom_model_development``
(:data:`EXPERIMENT_KIND_TAG`), marking them as model training for MLflow 3's UI (which
otherwise opens an experiment on its GenAI overview); an existing experiment without the tag
gets it the next time a job (or ``finetail ui``) opens it. The pinned MLflow 3.17.2 UI still
picks its view from the link, so :func:`ui_url` links to the runs table. MLflow records artifact locations as absolute ``file:``
URIs of the folder the study ran in; :func:`relocate_artifacts` points a study's SQLite store
at its ``mlartifacts/`` folder where it lies now (a moved or copied study), and a training job
does so itself when it opens a store that lies in its study folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self
from urllib.parse import unquote, urlparse

from .fileio import disk_full_error, log
from .record import RESUMED, flatten, job_params

__all__ = [
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "Relocation",
    "StoredRun",
    "Tracker",
    "TrackerProcess",
    "TrackingStore",
    "TrackingUnavailable",
    "choose_tracking_uri",
    "config_digest",
    "flatten",
    "git_commit",
    "mark_experiments",
    "relocate_artifacts",
    "serve_ui",
    "sqlite_path",
    "sqlite_uri",
    "store_exists",
    "store_lock",
    "study_experiments",
    "ui_command",
    "ui_url",
]

# MLflow 3's experiment kind, as its UI's own kind selector writes it
# (mlflow/server/js/src/experiment-tracking/utils/ExperimentKindUtils.ts: EXPERIMENT_KIND_TAG_KEY
# = 'mlflow.experimentKind'; ExperimentKind.CUSTOM_MODEL_DEVELOPMENT = 'custom_model_development').
# MLflow's newer UI source (WorkflowTypeContext, not in 3.17.2) switches to model training
# when it opens an experiment of this kind; 3.17.2's picks GenAI or model training from the link's
# ?workflowType= or the sidebar switch only (checked in a browser), hence ui_url().
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class TrackingUnavailable(RuntimeError):
    """The tracking server named by the config or MLFLOW_TRACKING_URI cannot be reached."""


def config_digest(subtree: Mapping) -> str:
    """sha256 of the canonical JSON of a config subtree (sorted keys)."""
    return hashlib.sha256(json.dumps(subtree, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def git_commit(path: str | Path = ".") -> tuple[str, bool]:
    """(commit, dirty) of the git work tree holding ``path``; ("unknown", False) outside git."""
    try:
        top = Path(path).resolve()
        commit = subprocess.run(
            ["git", "-C", str(top), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(top), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return commit, bool(status.strip())
    except (subprocess.CalledProcessError, FileNotFoundError, OSError):
        return "unknown", False


def sqlite_uri(path: str | os.PathLike) -> str:
    """The tracking URI of a SQLite file (made absolute)."""
    return f"sqlite:///{Path(path).resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI (query dropped); None for other URIs."""
    if not uri.startswith("sqlite:"):
        return None
    return Path(uri.split("sqlite:///", 1)[-1].split("?", 1)[0])


def store_exists(uri: str | None, timeout: float = 2.0) -> bool:
    """Whether a tracking store can be read: a SQLite file or a ``file:`` folder exists, an
    http(s) server answers ``/health`` within ``timeout`` seconds; other schemes are taken
    as existing."""
    if not uri:
        return False
    db = sqlite_path(uri)
    if db is not None:
        return db.is_file()
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).is_dir()
    if parsed.scheme in ("http", "https"):
        try:
            check_server(uri, timeout=timeout)
        except TrackingUnavailable:
            return False
    return True


def choose_tracking_uri(explicit: str | None, configured: str | Iterable[str | None] | None,
                        default_db: str | os.PathLike | None, *, read_only: bool = False) -> str | None:
    """The tracking store a command uses: one rule for training, lineage and audit.

    1. ``explicit``: the command's ``--tracking-uri`` flag;
    2. the ``MLFLOW_TRACKING_URI`` environment variable;
    3. ``configured``: for ``finetail train`` the study config's ``tracking.uri`` (the rules
       pass it as ``--config-tracking-uri``); for lineage and audit the URI(s) the runs
       recorded (metrics.json, run.json), the first whose store still exists;
    4. the study's default SQLite store ``default_db`` (``results/<study>/mlflow.db``).

    Parameters
    ----------
    explicit, configured : see above; empty strings count as not given.
    default_db : path of the study's SQLite file.
    read_only : lineage and audit. A configured URI counts only when its store exists
        (:func:`store_exists`) and the default only when its file exists; None when no store
        is found. Otherwise (training) the configured URI is taken as is, and the default's
        folder is created.

    Returns
    -------
    str or None
    """
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    candidates = [configured] if isinstance(configured, str) else list(configured or ())
    for uri in candidates:
        if uri and (not read_only or store_exists(uri)):
            return uri
    if default_db is None:
        return None
    path = Path(default_db)
    if read_only:
        return sqlite_uri(path) if path.is_file() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    return sqlite_uri(path)


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when an http(s) tracking server does not answer."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - user-configured URI
            if r.status != 200:
                raise TrackingUnavailable(f"MLflow server {uri} answered {r.status} on /health")
    except (urllib.error.URLError, OSError) as e:
        raise TrackingUnavailable(
            f"cannot reach the MLflow tracking server {uri} ({e}); start it, or unset "
            "MLFLOW_TRACKING_URI / tracking.uri to log to the study's SQLite store"
        ) from e


@contextlib.contextmanager
def _flock(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def store_lock(db: str | os.PathLike) -> contextlib.AbstractContextManager[None]:
    """The exclusive lock every writer of a SQLite store takes (``<db>.lock``, ``flock``)."""
    return _flock(Path(str(db) + ".lock"))


def _beside(db: Path, artifact_root: str | os.PathLike) -> bool:
    """The store and the artifact folder lie in one folder (a study's ``results/<study>/``), so
    they were moved together."""
    return Path(db).resolve().parent == Path(artifact_root).resolve().parent


# --------------------------------------------------------------------------- a moved study
@dataclass(frozen=True)
class Relocation:
    """One experiment whose artifact location :func:`relocate_artifacts` rewrote."""

    experiment_id: str
    name: str
    old: str  # the artifact location recorded (a file: URI)
    new: str
    runs: int  # runs whose artifact_uri moved with it
    missing: int  # of those, runs without a folder under the new location

    def describe(self) -> str:
        return (f"MLflow experiment {self.name!r} ({self.experiment_id}): artifact location {self.old} -> "
                f"{self.new}, {self.runs} run(s) moved"
                + (f"; {self.missing} of them have no artifact folder there" if self.missing else ""))


def _relocate(db: Path, new: str, experiment_ids: Iterable[str] | None) -> list[Relocation]:
    """:func:`relocate_artifacts` without the lock (the caller holds it)."""
    con = sqlite3.connect(str(db), timeout=60, isolation_level=None)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"experiments", "runs"} <= tables:
            raise ValueError(f"{db} is not an MLflow store (no experiments and runs tables)")
        con.execute("BEGIN IMMEDIATE")  # one transaction: all of it, or nothing
        try:
            done = []
            ids = None if experiment_ids is None else {str(i) for i in experiment_ids}
            for eid, name, old in con.execute(
                    "SELECT experiment_id, name, artifact_location FROM experiments").fetchall():
                if old == new or not (old or "").startswith("file:"):
                    continue
                if ids is None:
                    if not old.rstrip("/").endswith("/" + new.rstrip("/").rsplit("/", 1)[-1]):
                        continue  # not a study's artifact folder (e.g. the Default experiment's ./mlruns)
                elif str(eid) not in ids:
                    continue
                con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, eid))
                moved = _move_prefix(con, "runs", "artifact_uri", eid, old, new)
                if "logged_models" in tables:
                    _move_prefix(con, "logged_models", "artifact_location", eid, old, new)
                root = Path(unquote(urlparse(new).path))
                missing = sum(1 for (rid,) in moved if not (root / rid).is_dir())
                done.append(Relocation(str(eid), name, old, new, len(moved), missing))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.close()
    return done


def _move_prefix(con: sqlite3.Connection, table: str, column: str, eid, old: str, new: str) -> list[tuple[str]]:
    """Rewrite ``column`` of ``table``'s rows of experiment ``eid`` that lie under ``old`` (the
    location itself, or a path below it) to lie under ``new``; the ids of the rows moved."""
    key = "run_uuid" if table == "runs" else "model_id"
    old = old.rstrip("/")
    where = f"experiment_id = ? AND ({column} = ? OR substr({column}, 1, ?) = ?)"
    args = (eid, old, len(old) + 1, old + "/")
    rows = con.execute(f"SELECT {key} FROM {table} WHERE {where}", args).fetchall()  # fixed names only
    con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE {where}",
                (new.rstrip("/"), len(old) + 1, *args))
    return rows


def relocate_artifacts(db: str | os.PathLike, artifact_root: str | os.PathLike,
                       experiment_ids: Iterable[str] | None = None) -> list[Relocation]:
    """Point a SQLite store's recorded artifact locations at ``artifact_root`` where it lies now.

    MLflow stores each experiment's artifact location and each run's artifact URI as absolute
    ``file:`` URIs of the folder the study ran in, and offers no API to change them: a moved or
    copied study folder would show no artifacts, and a rerun would write them into the old
    folder. This rewrites them in one SQLite transaction, under the store's write lock
    (:func:`store_lock`): each experiment's ``artifact_location``, and the ``artifact_uri`` of
    its runs (and ``artifact_location`` of its logged models) that lay under the old location,
    keeping the part below it (``<run_id>/artifacts``).

    Parameters
    ----------
    db : the SQLite file (``results/<study>/mlflow.db``).
    artifact_root : the study's artifact folder (``results/<study>/mlartifacts``).
    experiment_ids : the experiments to relocate; None: every experiment whose location is a
        ``file:`` URI of a folder with ``artifact_root``'s name (a study's), not already there.

    Returns
    -------
    list of Relocation : what changed (empty when nothing had to).
    """
    new = Path(artifact_root).resolve().as_uri()
    with store_lock(db):
        return _relocate(Path(db), new, experiment_ids)


def mark_experiments(uri: str, experiment_ids: Iterable[str]) -> list[str]:
    """Tag each experiment as a model-training one (:data:`EXPERIMENT_KIND_TAG`) unless it has
    a kind already; the ids tagged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    tagged = []
    for eid in experiment_ids:
        if EXPERIMENT_KIND_TAG not in client.get_experiment(eid).tags:
            client.set_experiment_tag(eid, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            tagged.append(eid)
    return tagged


def study_experiments(uri: str, artifact_root: str | os.PathLike) -> list[tuple[str, str]]:
    """(id, name) of a store's active experiments whose artifact location is ``artifact_root``."""
    from mlflow.tracking import MlflowClient

    root = Path(artifact_root).resolve().as_uri()
    return [(e.experiment_id, e.name) for e in MlflowClient(tracking_uri=uri).search_experiments()
            if e.artifact_location == root]


def ui_url(host: str, port: int, experiment_id: str) -> str:
    """The MLflow UI's runs table of an experiment. ``workflowType=machine_learning``: MLflow
    3.17's UI picks its GenAI or model-training view from this parameter (else from the
    sidebar's last choice, GenAI by default), not from the experiment's kind tag."""
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_command(db: str | os.PathLike, artifact_root: str | os.PathLike, host: str, port: int) -> list[str]:
    """``mlflow ui`` on a study's SQLite store, with this interpreter's mlflow; anything the UI
    uploads goes to the study's artifact folder."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", sqlite_uri(db),
            "--artifacts-destination", str(Path(artifact_root).resolve()), "--host", host, "--port", str(port)]


def serve_ui(cmd: list[str], grace: float = 15.0) -> int:
    """Run the MLflow UI (:func:`ui_command`) until it ends or this process is told to stop.

    ``mlflow ui`` starts a uvicorn server with its workers, and a job runner with huey
    consumers; a SIGTERM to ``mlflow ui`` alone leaves the job runner and its consumers
    running, and ``mlflow ui`` waiting for them. So the UI runs in a process group of its own,
    and SIGTERM, SIGHUP (a closed terminal, a process manager) and SIGINT (Ctrl-C) to this
    process stop that whole group: SIGTERM to every member, SIGKILL to what is left after
    ``grace`` seconds. The group is stopped the same way when the UI ends by itself (members
    it left behind).

    Returns
    -------
    int : the UI's exit status, or 128 + the signal that stopped it (143 for SIGTERM).
    """
    proc = subprocess.Popen(cmd, process_group=0)
    received: list[int] = []

    def stop(signum, _frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    stops = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    before = {s: signal.signal(s, stop) for s in stops}
    try:
        code = proc.wait()  # a handler that returns lets the wait go on (PEP 475)
    finally:
        _stop_group(proc.pid, grace)
        for s, handler in before.items():
            signal.signal(s, handler)
    return 128 + received[0] if received else code


def _group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member that is not a zombie (a zombie holds no
    port; orphans' zombies wait for init to reap them)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp
            return True
    return False


def _stop_group(pgid: int, grace: float) -> None:
    """SIGTERM to every process of group ``pgid``, SIGKILL to those alive after ``grace`` s."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


class Tracker:
    """One MLflow run for one training job.

    Parameters
    ----------
    uri : tracking URI (``sqlite:///...``, ``http://host:port``, ``file:...``).
    experiment : experiment name, created on first use.
    artifact_root : where a new experiment stores artifacts (SQLite stores only).
    """

    def __init__(self, uri: str, experiment: str, artifact_root: str | Path | None = None) -> None:
        check_server(uri)
        self.uri = uri
        db = sqlite_path(uri)
        self._lock_path = Path(str(db) + ".lock") if db else None
        if db is not None and "timeout=" not in uri:
            self.uri = uri + ("&" if "?" in uri else "?") + "timeout=60"
        from mlflow.tracking import MlflowClient

        with self._locked():
            # Creating the client on a new database runs its migrations: one process at a time.
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(experiment)
            loc = Path(artifact_root).resolve().as_uri() if (artifact_root and db is not None) else None
            if exp is None:
                self.experiment_id = self._create_experiment(experiment, loc)
            else:
                self.experiment_id = exp.experiment_id
                if EXPERIMENT_KIND_TAG not in exp.tags:  # a store made before finetail set the kind
                    self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                if loc and exp.artifact_location != loc and _beside(db, artifact_root):
                    # The study folder (store and artifacts) was moved or copied: new runs'
                    # artifacts go to this folder, and the old runs' are found here.
                    for r in _relocate(db, loc, [self.experiment_id]):
                        log(r.describe())
        self.run_id: str | None = None

    def _create_experiment(self, name: str, artifact_location: str | None) -> str:
        """Create the experiment, marked as a model-training one (:data:`EXPERIMENT_KIND_TAG`);
        a parallel job that created it first (a tracking server takes no file lock) is not an
        error: use theirs."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name, artifact_location=artifact_location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e):
                raise
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._lock_path is None:
            yield
            return
        with _flock(self._lock_path):
            yield

    def _call(self, fn, *args, **kwargs):
        """Run a client call under the store lock, retrying transient errors with backoff."""
        delay = 0.5
        for attempt in range(6):
            try:
                with self._locked():
                    return fn(*args, **kwargs)
            except Exception as e:  # mlflow wraps sqlalchemy/HTTP errors in several types
                transient = "locked" in str(e).lower() or "timed out" in str(e).lower()
                if not transient or attempt == 5:
                    raise
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def start(
        self, run_name: str, params: Mapping, tags: Mapping[str, str], resume_run_id: str | None = None
    ) -> str:
        """Start a run (or reopen ``resume_run_id`` when a job resumes) and log params and tags.

        ``params`` is the job's spec (nested); it is logged flattened, with the spec itself as
        a tag (:func:`finetail.record.job_params`).
        """
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        run = None
        if resume_run_id:
            try:
                run = self._call(self.client.get_run, resume_run_id)
            except MlflowException:
                run = None
        if run is not None:
            self.run_id = run.info.run_id
            self._call(self.client.update_run, self.run_id, status="RUNNING")
            self.log_tags({RESUMED: "true"})
            return self.run_id
        run = self._call(self.client.create_run, self.experiment_id, tags=dict(tags), run_name=run_name)
        self.run_id = run.info.run_id
        flat, spec_tag = job_params(params)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._call(self.client.log_batch, self.run_id, params=items[i : i + 100])
        self.log_tags(spec_tag)
        return self.run_id

    def find_run(self, job_key: str, output_dir: str) -> str | None:
        """The newest run of this experiment made for the same job (tags ``finetail.job_key``
        and ``finetail.output_dir``), whatever its status: a job killed after creating its run
        but before recording it anywhere else continues that run instead of starting a second."""
        from mlflow.entities import ViewType

        runs = self._call(
            self.client.search_runs,
            [self.experiment_id],
            filter_string=f"tags.`finetail.job_key` = '{job_key}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time DESC"],
            max_results=50,
        )
        for run in runs:
            if run.data.tags.get("finetail.output_dir") == output_dir:
                return run.info.run_id
        return None

    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self._call(self.client.log_batch, self.run_id, metrics=items)

    def log_tags(self, tags: Mapping[str, str]) -> None:
        """Set tags on the run (one batch)."""
        from mlflow.entities import RunTag

        self._call(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, paths: list[str | Path]) -> None:
        for p in paths:
            self._call(self.client.log_artifact, self.run_id, str(p))

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self._call(self.client.set_terminated, self.run_id, status=status)


class TrackerProcess:
    """A :class:`Tracker` in a child process of its own: the same methods, called in the parent.

    The child is forked at once and builds the Tracker (mlflow's import, the server's health
    check, the experiment) while the parent goes on importing torch and loading the data, on
    another core: a job's start-up no longer waits for MLflow's. Calls then go one at a time
    through a pipe, and the parent waits for each reply, so a run's writes happen in the order
    and with the errors of a :class:`Tracker`: what a call raises in the child is raised here
    again, with its type and message (the child's traceback as a note).

    Fork it before torch is imported (the parent has no threads then). The child ignores
    SIGTERM and SIGINT, which Slurm and Snakemake send to the whole process group: the parent
    handles them and marks the run KILLED or FAILED through the child. The child ends when the
    pipe closes: :meth:`close`, or the parent's exit or death (SIGKILL included).

    Parameters
    ----------
    uri, experiment, artifact_root : as :class:`Tracker`'s.
    """

    def __init__(self, uri: str, experiment: str, artifact_root: str | Path | None = None) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child_end = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_tracker, args=(child_end, self._conn, uri, experiment, artifact_root),
                                 name="finetail-tracker")
        self._proc.start()
        child_end.close()
        self.uri = uri  # the child's Tracker.uri once ready()
        self.run_id: str | None = None
        self._state = "starting"  # then "ready", or the construction's exception
        self._unread = False  # a reply not read (the parent was interrupted while waiting)

    @property
    def pid(self) -> int | None:
        """The child's pid."""
        return self._proc.pid

    @property
    def exitcode(self) -> int | None:
        """The child's exit status once it has ended (0 after :meth:`close`), else None."""
        return self._proc.exitcode

    def ready(self) -> None:
        """Wait until the child's Tracker exists; raise what building it raised
        (:class:`TrackingUnavailable` for a server that does not answer) here and at every call."""
        if self._state == "starting":
            try:
                self.uri = self._reply()
                self._state = "ready"
            except BaseException as e:
                self._state = e
                raise
        if isinstance(self._state, BaseException):
            raise self._state

    def _reply(self):
        try:
            ok, value = self._conn.recv()  # a KeyboardInterrupt here leaves the reply unread
        except (EOFError, OSError):
            self._unread = False
            self._proc.join(1.0)
            raise TrackingUnavailable(f"the tracking process (pid {self._proc.pid}) ended unexpectedly "
                                      f"(exit code {self._proc.exitcode})") from None
        self._unread = False
        if not ok:
            raise value
        return value

    def _call(self, method: str, *args, **kwargs):
        self.ready()
        if self._unread:  # the reply to a call the parent stopped waiting for (a signal's exception)
            with contextlib.suppress(Exception):
                self._reply()
        self._conn.send((method, args, kwargs))
        self._unread = True
        return self._reply()

    def start(self, run_name: str, params: Mapping, tags: Mapping[str, str], resume_run_id: str | None = None) -> str:
        """:meth:`Tracker.start`, in the child."""
        self.run_id = self._call("start", run_name, params, tags, resume_run_id=resume_run_id)
        return self.run_id

    def find_run(self, job_key: str, output_dir: str) -> str | None:
        """:meth:`Tracker.find_run`, in the child."""
        return self._call("find_run", job_key, output_dir)

    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        self._call("log_metrics", dict(metrics), step=step)

    def log_tags(self, tags: Mapping[str, str]) -> None:
        self._call("log_tags", dict(tags))

    def log_artifacts(self, paths: list[str | Path]) -> None:
        self._call("log_artifacts", [str(p) for p in paths])

    def end(self, status: str = "FINISHED") -> None:
        self._call("end", status)

    def close(self, timeout: float = 120.0) -> None:
        """Close the pipe and wait for the child to finish the call in hand (if any) and exit;
        killed after ``timeout`` seconds."""
        if self._conn.closed:
            return
        self._conn.close()
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            self._proc.kill()
            self._proc.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _NotDiskFull(logging.Filter):
    """Drops MLflow's own log record of a database error that is a full device: the error is
    raised to the job anyway, as one line (:class:`~finetail.errors.DiskFull`), and MLflow's
    record of it is a traceback of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and disk_full_error(record.exc_info[1]))


def _as_user_error(e: Exception, folders: list[Path]) -> Exception:
    """A full device as :class:`~finetail.errors.DiskFull` (naming the folder of ``folders``
    with the least room), with the original as its cause; anything else unchanged."""
    full = disk_full_error(e, folders)
    if full is None:
        return e
    full.__cause__ = e  # in the traceback note _send adds (FINETAIL_DEBUG=1 shows it)
    return full


def _serve_tracker(conn, parent_end, uri: str, experiment: str, artifact_root) -> None:
    """The child of :class:`TrackerProcess`: build the Tracker, then serve calls until the pipe closes."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the parent ends the run, then the pipe
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent_end.close()  # else the pipe would never close while this process lives
    logging.getLogger("mlflow.store.db.utils").addFilter(_NotDiskFull())
    db = sqlite_path(uri)
    folders = [Path(p) for p in (db.parent if db else None, artifact_root) if p]  # where the store writes
    try:
        tracker = Tracker(uri, experiment, artifact_root=artifact_root)
    except Exception as e:  # noqa: BLE001 - raised again in the parent
        _send(conn, False, _as_user_error(e, folders))
        return
    if not _send(conn, True, tracker.uri):
        return
    while True:
        try:
            method, args, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = (True, getattr(tracker, method)(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - raised again in the parent
            reply = (False, _as_user_error(e, folders))
        if not _send(conn, *reply):
            return


def _send(conn, ok: bool, value) -> bool:
    """Send a reply (an exception as one the parent can unpickle); False when the parent is gone."""
    if not ok:
        value.add_note("traceback in the tracking process:\n" + "".join(traceback.format_exception(value)).rstrip())
        try:
            pickle.loads(pickle.dumps(value))
        except Exception:  # noqa: BLE001 - a type that does not pickle: its name and message
            value = RuntimeError(f"{type(value).__module__}.{type(value).__qualname__}: {value}")
    try:
        conn.send((ok, value))
    except (BrokenPipeError, ConnectionResetError, EOFError):
        return False
    return True


# --------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class StoredRun:
    """A run as read back from the store: what lineage and audit need, no mlflow types."""

    run_id: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED, ...
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # latest value of each

    @classmethod
    def of(cls, run) -> StoredRun:
        return cls(run.info.run_id, run.info.status, dict(run.data.tags), dict(run.data.metrics))


class TrackingStore:
    """Read-only access to a tracking store, for lineage and audit.

    The client is created on first use; a store that does not exist (a missing SQLite file,
    or no URI at all) reads as empty (:attr:`available` is False, :meth:`get_run` None).
    """

    def __init__(self, uri: str | None) -> None:
        self.uri = uri
        self._client = None
        self._runs: dict[str, StoredRun | None] = {}

    @property
    def available(self) -> bool:
        """There is a URI, and it is not a SQLite file that does not exist."""
        if self.uri is None:
            return False
        db = sqlite_path(self.uri)
        return db is None or db.is_file()

    @property
    def client(self):
        if self._client is None:
            if not self.available:
                raise FileNotFoundError(f"tracking store {self.uri} does not exist")
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def get_run(self, run_id: str) -> StoredRun | None:
        """The run, or None when the store lacks it (or there is no store). Cached."""
        if not self.available:
            return None
        if run_id not in self._runs:
            from mlflow.exceptions import MlflowException

            try:
                self._runs[run_id] = StoredRun.of(self.client.get_run(run_id))
            except MlflowException:
                self._runs[run_id] = None
        return self._runs[run_id]

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``. Raises ValueError when the store has none."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            raise ValueError(f"no experiment {name!r} in the tracking store {self.uri}")
        return exp.experiment_id

    def all_runs(self, experiment: str | None = None) -> list[StoredRun]:
        """Every active run of ``experiment`` (default: of every active experiment), all pages."""
        from mlflow.entities import ViewType

        if experiment is not None:
            ids = [self.experiment_id(experiment)]
        else:
            ids = [e.experiment_id for e in self.client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        runs: list[StoredRun] = []
        token = None
        while ids:
            page = self.client.search_runs(ids, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
            runs.extend(StoredRun.of(r) for r in page)
            token = page.token
            if not token:
                break
        for r in runs:
            self._runs.setdefault(r.run_id, r)
        return runs
