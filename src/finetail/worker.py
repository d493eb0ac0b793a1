"""A warm local worker: a job pays for its work, not for importing torch.

A ``finetail`` command spends about 2.5 s importing torch, torchvision, pandas and MLflow
before it does anything. The worker imports them once and, for each job, forks a child
that runs the command as the command line would (the shape of Python's forkserver with
``set_forkserver_preload``, or Android's zygote):

- **client**: the ``finetail`` command itself. When ``FINETAIL_WORKER`` names a live
  worker's socket, :func:`run_in_worker` sends its argv, working directory, environment
  and umask, with its stdin, stdout and stderr as file descriptors (``SCM_RIGHTS``), then
  relays SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 to the job and ends as the job ended:
  its exit code, or death by the same signal. No worker, a dead one, or one that refuses
  (another Python, other finetail sources, edited sources): the command runs in-process,
  as without a worker. A worker that is still importing (its ``<socket>.starting`` file
  names its live pid) is waited for: the rest of its import costs a job no more than its
  own import would.
- **worker** (:class:`Worker`, ``python -m finetail.worker serve``): one thread and a
  ``select`` loop, in a session of its own (a Ctrl-C on the terminal reaches the jobs
  through their clients, not twice). It forks a child per request, relays signals to it,
  and reports its exit status. A client that dies (SIGKILL) gets its job SIGKILLed, as if
  the job had been killed; a worker that dies takes its jobs with it (``PR_SET_PDEATHSIG``).
  It ends on SIGTERM, SIGINT or SIGHUP, or when the process that started it ends.
- **child**: own process group, the client's descriptors on 0, 1 and 2, its directory,
  environment, ``sys.argv`` and ``sys.path``; Python's and NumPy's global random state
  reseeded (as a fresh interpreter's would be); torch's and BLAS's thread counts set from
  the job's ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` (as a fresh interpreter reads
  them); then ``finetail.cli.main(argv)``, and the interpreter's exit rules (threads
  joined, ``atexit`` handlers run, streams flushed).

Fork safety: the worker starts no thread and no CUDA context. It imports NumPy with
``OPENBLAS_NUM_THREADS=1`` (OpenBLAS starts its pool at load otherwise) and pyarrow with
jemalloc's background thread off, and checks that it is still single-threaded before it
serves. So a job may fork again (the tracker process, loader workers) as it does today.

The workflow starts one worker per study for local runs (``workflow/rules/worker.smk``,
:class:`LocalWorker`) and stops it when Snakemake ends. By hand::

    python -m finetail.worker serve --socket /tmp/w.sock &
    FINETAIL_WORKER=/tmp/w.sock finetail train ...
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ENV", "LocalWorker", "Worker", "run_in_worker", "socket_path", "wanted"]

ENV = "FINETAIL_WORKER"  # the socket of the worker to use; "", "0" or "off": none
OFF = ("", "0", "off", "no", "false")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
PRELOAD = (
    "numpy", "pandas", "pyarrow.parquet", "pyarrow.dataset", "multiprocessing.popen_fork", "torch", "torchvision", "mlflow", "mlflow.tracking", "sqlalchemy",
    "mlflow.store.tracking.sqlalchemy_store",
    "finetail.cli", "finetail.tracking", "finetail.record", "finetail.manifest", "finetail.models",
    "finetail.losses", "finetail.metrics", "finetail.distributed", "finetail.loader", "finetail.training.job",
    "finetail.training.loop", "finetail.training.checkpoint", "finetail.posthoc_job", "finetail.features",
    "finetail.scoring",
)
# What every job would import at exit otherwise (torch._dynamo's atexit report imports tabulate).
PRELOAD_IF_INSTALLED = ("tabulate",)
# Commands whose code digest (finetail.code: an import walk over the sources, 0.4 s) the
# worker computes once; it serves no job after its sources change (_code_stamp).
WARM_CODE = ("train", "posthoc")
# Set in the worker before anything is imported: no thread may exist when it forks.
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "JE_ARROW_MALLOC_CONF": "background_thread:false"}
STARTING_WAIT_S = 120.0  # longest a job waits for a worker still importing
_HEADER = struct.Struct("!I")
_SUN_PATH_MAX = 107  # AF_UNIX sun_path is 108 bytes with its NUL
_PACKAGE = Path(__file__).resolve().parent


def _log(msg: str) -> None:
    print(f"[finetail worker {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- where
def socket_path(study_root: str | os.PathLike) -> str:
    """The worker socket of the study whose results folder is ``study_root``:
    ``<study_root>/.worker.sock`` when that fits AF_UNIX's 107 bytes, else a file named
    by the folder's digest in a private (0700) folder under the temporary directory."""
    root = os.path.abspath(study_root)
    path = os.path.join(root, ".worker.sock")
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        return path
    private = os.path.join(tempfile.gettempdir(), f"finetail-{os.getuid()}")
    os.makedirs(private, mode=0o700, exist_ok=True)
    return os.path.join(private, hashlib.sha256(os.fsencode(root)).hexdigest()[:16] + ".sock")


def wanted(environ: dict[str, str] | None = None) -> bool:
    """Whether the workflow should start a worker: unless ``FINETAIL_WORKER`` is set to off."""
    value = (environ if environ is not None else os.environ).get(ENV)
    return value is None or value.strip().lower() not in OFF


# --------------------------------------------------------------------------- protocol
def _identity() -> dict:
    """What a client and the worker must share for a forked job to run the client's code."""
    return {"prefix": sys.prefix, "package": str(_PACKAGE), "path": sys.path[1:], "umask": _umask(),
            "version": sys.version}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _send_request(sock: socket.socket, request: dict, fds: list[int]) -> None:
    data = json.dumps(request).encode()
    data = _HEADER.pack(len(data)) + data
    sent = socket.send_fds(sock, [data], fds)
    if sent < len(data):  # (an empty send to a worker that has answered and closed would fail)
        sock.sendall(data[sent:])


def _recv_request(conn: socket.socket) -> tuple[dict | None, list[int]]:
    """One request and the descriptors sent with it; None for a connection closed at once
    (a readiness probe); ConnectionError for one closed mid-request."""
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    if not data:
        return None, fds
    while len(data) < _HEADER.size or len(data) < _HEADER.size + _HEADER.unpack_from(data)[0]:
        more = conn.recv(1 << 16)
        if not more:
            for fd in fds:
                os.close(fd)
            raise ConnectionError("the client closed the connection mid-request")
        data += more
    return json.loads(data[_HEADER.size:_HEADER.size + _HEADER.unpack_from(data)[0]]), fds


def _lines(sock: socket.socket) -> Iterator[str]:
    """Lines from ``sock`` until it closes."""
    buf = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode()


# --------------------------------------------------------------------------- client
class _Relay:
    """The client's handler of the forwarded signals: kept until the job has started, then
    sent to the worker, which signals the job."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.started = False
        self.pending: list[int] = []
        self.previous = {s: signal.signal(s, self.on_signal) for s in FORWARDED}

    def on_signal(self, signum: int, _frame: object) -> None:
        if not self.started:
            self.pending.append(signum)
            return
        try:
            self.sock.sendall(f"signal {signum}\n".encode())
        except OSError:  # the worker is gone: its death ends the job, and the client reports it
            self.pending.append(signum)

    def start(self) -> None:
        self.started = True
        for s in self.pending:
            self.on_signal(s, None)
        self.pending = []

    def restore(self) -> None:
        """The previous handlers back; a signal kept before the job started is delivered to
        this process again, so the in-process command sees it as it would have."""
        for s, h in self.previous.items():
            signal.signal(s, h)
        for s in self.pending:
            os.kill(os.getpid(), s)


def run_in_worker(argv: list[str] | None = None) -> int | None:
    """Run this ``finetail`` command (``argv``, default ``sys.argv``) in the worker that
    ``FINETAIL_WORKER`` names; return its exit code (a job killed by a signal kills this
    process with the same signal). None when there is no worker to use: unset or off, under
    ``torchrun`` (each rank is a process of its own), unreachable, or refused; the caller
    then runs the command in-process, with one line on stderr saying why (unless unset)."""
    path = os.environ.get(ENV, "")
    if path.strip().lower() in OFF or "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    relay = _Relay(sock)
    try:
        status = _converse(sock, relay, list(sys.argv if argv is None else argv), path)
    except OSError as e:
        status = f"no worker at {path} ({e.strerror or e})"
    finally:
        sock.close()
    if isinstance(status, str):
        relay.restore()
        _log(f"{status}: running in-process")
        return None
    return _exit_code(status)


def starting_path(path: str) -> str:
    """The file that holds the pid of a worker still importing for socket ``path``."""
    return path + ".starting"


def _wait_for_socket(path: str, relay: _Relay, timeout: float = STARTING_WAIT_S) -> str | None:
    """While a worker for ``path`` is still importing (its pid in the starting file, alive),
    wait for its socket; None when there is a socket to connect to, or why not."""
    t0 = time.monotonic()
    while not os.path.exists(path):
        try:
            pid = int(Path(starting_path(path)).read_text().strip() or 0)
        except (OSError, ValueError):
            return None  # no worker starting: the connect says what is wrong
        if pid <= 0 or not _alive(pid):
            return f"the worker starting for {path} (pid {pid}) is gone"
        if relay.pending:
            return "signalled while the worker was starting"
        if time.monotonic() - t0 > timeout:
            return f"the worker at {path} was not ready after {timeout:.0f} s"
        time.sleep(0.05)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _converse(sock: socket.socket, relay: _Relay, argv: list[str], path: str) -> int | str:
    """Send the request, relay signals, return the job's wait status (or why it did not run)."""
    why = _wait_for_socket(path, relay)
    if why is not None:
        return why
    sock.settimeout(10.0)
    sock.connect(path)
    fds = [fd for fd in (0, 1, 2) if _is_open(fd)]
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "fds": fds, "sys_path": sys.path,
               **_identity()}
    _send_request(sock, request, fds)
    sock.settimeout(None)  # once sent, the worker answers or closes: no second guess (no job runs twice)
    lines = _lines(sock)
    first = next(lines, "")
    if not first.startswith("started "):
        return first.removeprefix("refused ") or "the worker closed the connection"
    relay.start()
    for line in lines:
        if line.startswith("exit "):
            return int(line.split()[1])
    _log(f"the worker at {path} ended before job {first.split()[1]} did; the job was killed with it")
    return signal.SIGKILL  # as a wait status: killed by SIGKILL


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _exit_code(status: int) -> int:
    """The client's exit code for the job's wait status; a job killed by a signal kills the
    client with it (its parent sees what it would have seen), else 128 + the signal."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return code
    if -code not in (signal.SIGKILL, signal.SIGSTOP):  # the two whose handler cannot be set
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
    return 128 - code


# --------------------------------------------------------------------------- worker
@dataclass
class _Job:
    """A running job: its client's connection and the child's pid (its process group too)."""

    conn: socket.socket
    pid: int
    buf: bytes = b""
    argv: list[str] = field(default_factory=list)


class Worker:
    """The worker's loop: accept requests on ``path``, fork a child per request, relay
    signals and exit statuses. Ends on SIGTERM, SIGINT or SIGHUP, or when ``parent`` (a pid)
    is no longer its parent."""

    def __init__(self, path: str, parent: int | None = None) -> None:
        self.path = path
        self.parent = parent
        self.jobs: dict[int, _Job] = {}  # by pid
        self.stopping = False
        self._deadline = 0.0  # once stopping: when running jobs are given up on
        self._stop_signal = 0  # a stop signal received, for the loop to act on
        self.sel = selectors.DefaultSelector()
        self.identity = _identity()
        self.stamp = _code_stamp()
        self.threads = _default_threads()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.wake_r, self.wake_w = socket.socketpair()

    def serve(self) -> None:
        """Bind, then serve until told to stop; the socket file is removed on the way out."""
        if os.path.exists(self.path):
            if _answers(self.path):
                raise RuntimeError(f"another worker serves {self.path}")
            os.unlink(self.path)  # a dead worker's socket
        old = os.umask(0o077)  # only this user may connect (SO_PEERCRED is checked too)
        try:
            self.listener.bind(self.path)
        finally:
            os.umask(old)
        self.listener.listen(64)
        for s in (self.wake_r, self.wake_w):
            s.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the wakeup fd
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, self._on_stop)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        _log(f"ready on {self.path} (pid {os.getpid()})")
        with _suppress_missing():
            os.unlink(starting_path(self.path))  # clients waiting for the import connect now
        try:
            while not self.stopping or self.jobs:
                self._step()
                if self.stopping and self.jobs and time.monotonic() > self._deadline:
                    break
        finally:
            self._close()

    def _on_stop(self, signum: int, _frame: object) -> None:
        """The stop signals' handler: noted here, acted on by the loop (the wakeup fd wakes it)."""
        self._stop_signal = self._stop_signal or signum

    def _stop(self, why: str) -> None:
        """Accept no more jobs (the socket goes: waiting and later clients run in-process);
        SIGTERM the running ones and give them 30 s to checkpoint and end."""
        _log(f"stopping ({why}); {len(self.jobs)} job(s) running")
        self.stopping = True
        self._deadline = time.monotonic() + 30.0
        with _suppress_missing():
            self.sel.unregister(self.listener)
        self.listener.close()
        with _suppress_missing():
            os.unlink(self.path)
        for pid in self.jobs:
            _signal(pid, signal.SIGTERM)

    def _step(self) -> None:
        for key, _ in self.sel.select(timeout=1.0):
            if key.fileobj is self.listener:
                self._accept()
            elif key.fileobj is self.wake_r:
                with _suppress_missing():
                    self.wake_r.recv(4096)
            else:
                self._from_client(key.data)
        self._reap()
        if self.stopping:
            return
        if self._stop_signal:
            self._stop(f"signal {signal.Signals(self._stop_signal).name}")
        elif self.parent is not None and os.getppid() != self.parent:
            self._stop(f"its parent {self.parent} ended")

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.settimeout(10.0)  # a client sends its request at once
        fds: list[int] = []
        try:
            request, fds = _recv_request(conn)
            why = "" if request is None else self._refusal(conn, request)
            if request is None or why:
                if why:
                    conn.sendall(f"refused {why}\n".encode())
                conn.close()
                return
            pid = self._fork(conn, request, fds)
        except (OSError, ValueError, KeyError) as e:
            _log(f"dropped a request: {e}")
            conn.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.jobs[pid] = job = _Job(conn, pid, argv=request["argv"])
        try:
            conn.sendall(f"started {pid}\n".encode())
        except OSError:  # the client is gone already; the loop reaps the job
            _signal(pid, signal.SIGKILL)
        conn.setblocking(False)
        self.sel.register(conn, selectors.EVENT_READ, job)

    def _refusal(self, conn: socket.socket, request: dict) -> str | None:
        """Why this worker must not run the request (None: it may)."""
        uid = _peer(conn)[1]
        if uid != os.getuid():
            return f"the client runs as uid {uid}, the worker as {os.getuid()}"
        if self.stopping:
            return "the worker is stopping"
        for key, mine in self.identity.items():
            if request.get(key) != mine:
                here = "" if key == "path" else f" ({mine!r} here)"  # sys.path: too long for one line
                return f"the worker's {key} differs from the client's{here}"
        if _code_stamp() != self.stamp:
            return f"finetail's sources under {_PACKAGE} changed since the worker started"
        blas = _blas_threads(request["env"])
        if blas != 1:  # OpenBLAS would start its threads in the job before the job forks its tracker
            return (f"the job asks for {blas} BLAS threads (OPENBLAS_NUM_THREADS or OMP_NUM_THREADS; the "
                    "worker runs jobs with 1, as Snakemake's threads: 1 sets)")
        return None

    def _fork(self, conn: socket.socket, request: dict, fds: list[int]) -> int:
        pid = os.fork()
        if pid == 0:  # the child: never returns into the loop
            code = 70  # EX_SOFTWARE: the child could not become the job
            try:
                self._detach(conn)
                code = _run_child(request, fds, self.threads)
            except BaseException:  # noqa: BLE001 - on the job's stderr once it is set up, else the worker's log
                traceback.print_exc()
            finally:
                os._exit(code)
        with _suppress_missing():
            os.setpgid(pid, pid)  # also done in the child: whichever runs first
        _log(f"job {pid}: {' '.join(request['argv'][1:3])} ...")
        return pid

    def _detach(self, conn: socket.socket) -> None:
        """In the child: the worker's signal handling and descriptors go."""
        os.setpgid(0, 0)
        _die_with_parent(signal.SIGKILL)
        signal.set_wakeup_fd(-1)
        for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.sel.close()  # closes the epoll descriptor only: the parent's registrations stay
        for s in (self.listener, self.wake_r, self.wake_w, conn, *(j.conn for j in self.jobs.values())):
            s.close()

    def _from_client(self, job: _Job) -> None:
        try:
            data = job.conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client died before its job: kill the job, as killing it would have
            if job.pid in self.jobs:
                _log(f"job {job.pid}: its client is gone; SIGKILL")
                _signal(job.pid, signal.SIGKILL)
            self.sel.unregister(job.conn)
            return
        job.buf += data
        while b"\n" in job.buf:
            line, job.buf = job.buf.split(b"\n", 1)
            words = line.decode().split()
            if len(words) == 2 and words[0] == "signal" and words[1].isdigit():
                _signal(job.pid, int(words[1]))

    def _reap(self) -> None:
        while self.jobs:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = self.jobs.pop(pid, None)
            if job is None:
                continue
            _log(f"job {pid}: exit {os.waitstatus_to_exitcode(status)}")
            with _suppress_missing():
                job.conn.setblocking(True)
                job.conn.sendall(f"exit {status}\n".encode())
            with _suppress_missing():
                self.sel.unregister(job.conn)
            job.conn.close()

    def _close(self) -> None:
        signal.set_wakeup_fd(-1)
        self.sel.close()
        if self.listener.fileno() != -1:  # not closed by _stop: remove the socket too
            self.listener.close()
            with _suppress_missing():
                os.unlink(self.path)
        _log("stopped")


def _answers(path: str) -> bool:
    """Whether a process listens on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def _peer(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of ``conn`` (SO_PEERCRED)."""
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))


def _suppress_missing() -> contextlib.suppress:
    """Suppress the OSError, KeyError or ValueError of an object already closed, gone or unregistered."""
    return contextlib.suppress(OSError, KeyError, ValueError)


def _signal(pid: int, signum: int) -> None:
    """Signal a job that has not been reaped (its pid cannot have been reused)."""
    with _suppress_missing():
        os.kill(pid, signum)


def _die_with_parent(signum: int) -> None:
    """Linux: have the kernel send ``signum`` to this process when its parent dies
    (``prctl(PR_SET_PDEATHSIG)``); elsewhere nothing (the worker also polls its parent)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signum, 0, 0, 0)


def _code_stamp() -> tuple:
    """The modification times and sizes of finetail's sources: a worker runs the code it imported."""
    stats = []
    for p in sorted(_PACKAGE.rglob("*.py")):
        with _suppress_missing():
            st = p.stat()
            stats.append((str(p), st.st_mtime_ns, st.st_size))
    return tuple(stats)


# --------------------------------------------------------------------------- the child
def _env_int(env: dict[str, str], *names: str) -> int | None:
    for name in names:
        try:
            value = int(env.get(name, ""))
        except ValueError:
            continue
        if value > 0:
            return value
    return None


def _blas_threads(env: dict[str, str]) -> int:
    """OpenBLAS's thread count for a process started with ``env`` (its own rule: the first
    variable set, else the CPUs)."""
    return _env_int(env, "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS") or os.cpu_count() or 1


def _default_threads() -> int:
    """torch's intra-op thread count with no ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` (read
    in the worker, which removed both before importing torch; starts no thread)."""
    import torch

    return torch.get_num_threads()


def _apply_threads(env: dict[str, str], default: int) -> None:
    """torch's thread count as a fresh interpreter with ``env`` would have it (from
    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, else the default); no thread starts until the
    job's first parallel operation. The job may set its own afterwards (``--threads``), as
    in-process. OpenBLAS's count is 1, the worker's: a job that asks for more is refused."""
    import torch

    torch.set_num_threads(_env_int(env, "OMP_NUM_THREADS", "MKL_NUM_THREADS") or default)


def _std_streams(fds: list[int], targets: list[int], env: dict[str, str]) -> None:
    """The client's descriptors ``fds`` (received) on ``targets`` (its numbers among 0, 1
    and 2; a missing one closed), and Python's streams rebuilt on them as the interpreter
    builds them (stdout line-buffered on a terminal or with PYTHONUNBUFFERED)."""
    for stream in (sys.stdout, sys.stderr):
        with _suppress_missing():
            stream.flush()
    if len(fds) != len(targets):
        raise OSError(f"received {len(fds)} descriptors for {len(targets)} streams")
    for target in (0, 1, 2):
        if target in targets:
            os.dup2(fds[targets.index(target)], target)
        else:
            with _suppress_missing():
                os.close(target)
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    out_line = unbuffered or os.isatty(1) if _is_open(1) else False
    sys.stdin = sys.__stdin__ = open(0, closefd=False) if _is_open(0) else None  # noqa: SIM115
    sys.stdout = sys.__stdout__ = (open(1, "w", buffering=1 if out_line else -1, closefd=False)  # noqa: SIM115
                                   if _is_open(1) else None)
    sys.stderr = sys.__stderr__ = (open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
                                   if _is_open(2) else None)


def _run_child(request: dict, fds: list[int], default_threads: int) -> int:
    """The forked child: become the client's process and run ``finetail.cli.main``; returns
    the exit code (the caller ``os._exit``s with it)."""
    import random

    import numpy as np

    _std_streams(fds, request["fds"], request["env"])
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    sys.path[:] = request["sys_path"]
    random.seed()  # a fresh interpreter's global random states are drawn anew
    np.random.seed()
    _apply_threads(request["env"], default_threads)
    return _exit_like_python(request["argv"][1:])


def _exit_like_python(argv: list[str]) -> int:
    """``finetail.cli.main(argv)`` with the interpreter's exit rules: SystemExit's code, a
    traceback and 1 for an exception, death by SIGINT for an uncaught KeyboardInterrupt;
    then non-daemon threads joined, ``atexit`` handlers run, streams flushed."""
    import atexit
    import threading

    from finetail import cli

    code, interrupted = 0, False
    try:
        cli.main(argv)
    except SystemExit as e:
        code = _system_exit_code(e.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        code, interrupted = 128 + signal.SIGINT, True
    except BaseException:  # noqa: BLE001 - reported as the interpreter would: traceback, exit 1
        traceback.print_exc()
        code = 1
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with _suppress_missing():
                stream.flush()
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def _system_exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- workflow side
class LocalWorker:
    """A worker the workflow starts for one run (:meth:`start`) and stops (:meth:`stop`):
    ``python -m finetail.worker serve`` in a session of its own, its log in ``log``. It
    imports in the background: jobs that start before its socket exists wait for it while it
    is alive (``<socket>.starting``), and run in-process if it dies."""

    def __init__(self, path: str, log: str | os.PathLike, env: dict[str, str] | None = None) -> None:
        self.path = path
        self.log = Path(log)
        self.env = env  # the worker's environment (default: this process's)
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        """Start the worker; returns its socket path (for ``FINETAIL_WORKER``). Raises
        ``OSError`` (the worker stopped again) when its files cannot be written, e.g. on a
        full device: the workflow then runs its jobs in-process."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "finetail.worker", "serve", "--socket", self.path, "--parent", str(os.getpid())]
        env = {k: v for k, v in (self.env if self.env is not None else os.environ).items() if k != ENV}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                         start_new_session=True, close_fds=True)
        try:
            Path(starting_path(self.path)).write_text(f"{self.proc.pid}\n")  # jobs wait for the import
        except OSError:
            self.stop()
            raise
        return self.path

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM the worker and wait for it (it gives running jobs 30 s), SIGKILL after
        ``timeout``; returns its exit status (None if never started). Idempotent."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for path in (self.path, starting_path(self.path)):
            with _suppress_missing():
                os.unlink(path)
        return self.proc.returncode

    def wait_ready(self, timeout: float = 120.0) -> bool:
        """Block until the worker accepts connections (tests, benches); False if it ended or
        ``timeout`` passed."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, _suppress_missing():
                s.connect(self.path)
                return True
            time.sleep(0.05)
        return False


# --------------------------------------------------------------------------- serve
def _preload() -> None:
    """Import what jobs use, single-threaded; raise RuntimeError if a thread or CUDA started."""
    import importlib
    import importlib.util

    for k, v in WORKER_ENV.items():
        os.environ[k] = v
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # torch's default thread count, per job later
        os.environ.pop(k, None)
    t0 = time.perf_counter()
    for name in PRELOAD:
        importlib.import_module(name)
    for name in PRELOAD_IF_INSTALLED:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    import torch

    from finetail.code import code_files

    for command in WARM_CODE:  # the import walk behind a resume key (valid while the stamp holds)
        code_files(command)

    threads = _thread_count()
    if threads > 1:
        raise RuntimeError(f"{threads} threads after importing {', '.join(PRELOAD)}: forking would be unsafe")
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised while importing: a forked job could not use it")
    _log(f"imported {len(PRELOAD)} modules in {time.perf_counter() - t0:.1f} s")


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def main(argv: list[str] | None = None) -> None:
    """``python -m finetail.worker serve --socket PATH [--parent PID]``."""
    p = argparse.ArgumentParser(prog="python -m finetail.worker", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="preload, then fork a child per request until stopped")
    s.add_argument("--socket", required=True, help="the Unix socket to listen on (FINETAIL_WORKER of the jobs)")
    s.add_argument("--parent", type=int, default=None, help="stop when this process (the starter) ends")
    a = p.parse_args(argv)
    if len(os.fsencode(a.socket)) > _SUN_PATH_MAX:
        raise SystemExit(f"error: socket path longer than {_SUN_PATH_MAX} bytes: {a.socket}")
    if a.parent is not None:
        _die_with_parent(signal.SIGTERM)
        if os.getppid() != a.parent:
            raise SystemExit(f"error: the parent {a.parent} ended before the worker started")
    try:
        _preload()
    except (ImportError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    gc.collect()
    gc.freeze()  # fewer pages written (copied) in the children by the collector
    try:
        Worker(a.socket, a.parent).serve()
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
