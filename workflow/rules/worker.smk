# The warm local worker (finetail.worker): on a local run, one process per study imports
# torch, torchvision, pandas and MLflow once and forks each job from there, so a job pays for
# its work and not for its interpreter's start-up. The jobs' `finetail` finds it through
# FINETAIL_WORKER (local jobs inherit this process's environment) and runs in-process
# without it. Not on a cluster (each job is long and on a node of its own), not in a dry run,
# not with FINETAIL_WORKER=off. Stopped when Snakemake ends: on success, on failure, on
# Ctrl-C (onerror, and at exit as a last resort); the worker also ends by itself when this
# process does.
import atexit

from snakemake.logging import logger
from snakemake_interface_executor_plugins.settings import ExecMode

from finetail.worker import ENV as WORKER_ENV, LocalWorker, socket_path, wanted as worker_wanted

LOCAL_WORKER = None


def start_local_worker():
    """Start the study's worker for a local run (it imports in the background: jobs that
    start before it is ready wait for it, and run in-process if it dies)."""
    global LOCAL_WORKER
    if not worker_wanted() or not workflow.local_exec or workflow.exec_mode != ExecMode.DEFAULT or workflow.touch:
        return
    worker = LocalWorker(socket_path(L.root), L.log("worker", "worker"))
    try:
        path = worker.start()
    except OSError as e:  # e.g. a full device: the jobs say so themselves, in one line each
        logger.warning(f"finetail worker not started ({e}): jobs run in-process")
        return
    LOCAL_WORKER = worker
    os.environ[WORKER_ENV] = path
    atexit.register(stop_local_worker)
    logger.info(f"finetail worker: {LOCAL_WORKER.path} (pid {LOCAL_WORKER.proc.pid}, log {LOCAL_WORKER.log})")


def stop_local_worker():
    """Stop the worker (idempotent); later jobs would run in-process."""
    os.environ.pop(WORKER_ENV, None)
    if LOCAL_WORKER is not None:
        LOCAL_WORKER.stop()


onstart:
    start_local_worker()


onsuccess:
    stop_local_worker()


onerror:
    stop_local_worker()
