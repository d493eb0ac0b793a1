"""MLflow tracking: the only module that imports mlflow.

One run per training job. Params are the job's config subtree (flattened), metrics are
logged per epoch with ``step=epoch``, tags carry the lineage (rule, wildcards, git commit,
config digest, input digests, parent run ids), artifacts are the job's result files.

The default store is a SQLite database under ``results/<study>/``. SQLite allows one writer
at a time, so every write from every process goes through an exclusive ``flock`` on a lock
file beside the database (and the connection waits up to 60 s as well): parallel jobs lose no
run and never fail on "database is locked". Files under ``results/`` stay the source of truth.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlparse

__all__ = [
    "Tracker",
    "TrackingUnavailable",
    "config_digest",
    "flatten",
    "git_commit",
    "resolve_tracking_uri",
]


class TrackingUnavailable(RuntimeError):
    """The tracking server named by the config or MLFLOW_TRACKING_URI cannot be reached."""


def flatten(d: Mapping, prefix: str = "") -> dict[str, str]:
    """Flatten nested config into MLflow params: ``{"recipe": {"lr": 0.1}} -> {"recipe.lr": "0.1"}``."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | tuple | bool) or v is None else str(v)
    return out


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


def resolve_tracking_uri(configured: str | None, default_db: str | Path) -> str:
    """MLFLOW_TRACKING_URI wins, then the config's ``tracking.uri``, then the study's SQLite file."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    path = Path(default_db).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:"):
        return None
    return Path(uri.split("sqlite:///", 1)[1].split("?", 1)[0])


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
        db = _sqlite_path(uri)
        self._lock_path = Path(str(db) + ".lock") if db else None
        if db is not None and "timeout=" not in uri:
            self.uri = uri + ("&" if "?" in uri else "?") + "timeout=60"
        from mlflow.tracking import MlflowClient

        with self._locked():
            # Creating the client on a new database runs its migrations: one process at a time.
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                loc = Path(artifact_root).resolve().as_uri() if (artifact_root and db is not None) else None
                self.experiment_id = self._create_experiment(experiment, loc)
            else:
                self.experiment_id = exp.experiment_id
        self.run_id: str | None = None

    def _create_experiment(self, name: str, artifact_location: str | None) -> str:
        """Create the experiment; a parallel job that created it first (a tracking server
        takes no file lock) is not an error: use theirs."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
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
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

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
        """Start a run (or reopen ``resume_run_id`` when a job resumes) and log params and tags."""
        from mlflow.entities import Param, RunTag
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
            self._call(self.client.set_tag, self.run_id, "finetail.resumed", "true")
            return self.run_id
        run = self._call(self.client.create_run, self.experiment_id, tags=dict(tags), run_name=run_name)
        self.run_id = run.info.run_id
        flat = flatten(params)
        items = [Param(k, v[:6000]) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):
            self._call(self.client.log_batch, self.run_id, params=items[i : i + 100])
        self._call(self.client.log_batch, self.run_id, tags=[RunTag("finetail.config_json", json.dumps(params)[:5000])])
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

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, paths: list[str | Path]) -> None:
        for p in paths:
            self._call(self.client.log_artifact, self.run_id, str(p))

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self._call(self.client.set_terminated, self.run_id, status=status)
