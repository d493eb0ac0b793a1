"""Start-up time of finetail: the CLI's import, and a training job's time to its first step.

Measured as subprocesses (a fresh interpreter each, as Snakemake starts them):

- **import**: ``python -c "import finetail.cli"``, wall time of the whole process;
- **train**: a tiny ``finetail train`` (a resnet8 on a generated 10-class world of 16-px
  images, 200 training images, one epoch, one thread) from ``Popen`` to the moment its log
  line ``training from epoch ...`` arrives on stderr, and the CPU time (user + system, all
  threads) the process had used by then, read from ``/proc`` (less sensitive than wall time
  to other processes on the machine; the job's own process only: the MLflow start-up of its
  tracker, a child process since issue 11 part 9, is not in it). The engine writes that line right before
  its first step, after the data, the model, the optimizer, MLflow's run and the checkpoint
  check are set up, so the figure is everything a job pays before it trains. The whole run's
  wall time is recorded too. All runs share one study folder, hence one MLflow store (as the
  jobs of a study do); the first run, which creates the store's tables, is not counted.
- **whole job, in-process and through the worker**: the same tiny job's wall time from
  ``Popen`` to its exit, run as today (``FINETAIL_WORKER=off``) and forwarded to a warm
  worker (:mod:`finetail.worker`, started once for the bench, not counted), alternated
  (in-process first in even rounds, the worker first in odd ones) so that both see the same
  machine: ``whole_job_inprocess_s`` and ``whole_job_worker_s``.

Each figure is the median of ``--runs`` runs (default 5), all runs listed. The dataset and
the runs live in a scratch directory; nothing outside it is written except ``--out``.

    .venv/bin/python bench/startup.py                  # -> bench/out/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARK = "training from epoch"
SPEC = {"recipe": {"model": "resnet8", "epochs": 1, "batch_size": 50, "eval_every": 1, "lr": 0.05,
                   "milestones": [], "lr_factors": []},
        "loss": {"type": "softmax"}, "shots": {"many": 100, "few": 20}}
WORLD = {"world": {"seed": 0, "image_size": 16}, "dataset": {"kind": "world", "train_per_class": 20, "test_per_class": 5}}


def _env() -> dict:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else src
    env.pop("MLFLOW_TRACKING_URI", None)  # the study's own SQLite store
    env["FINETAIL_DEVICE"] = "cpu"
    env["FINETAIL_WORKER"] = "off"  # in-process unless a run names the bench's worker
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")  # as Snakemake sets them for a job (threads: 1)
    return env


def time_import(env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import finetail.cli"], env=env, check=True)
    return time.perf_counter() - t0


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process (Linux), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_train(env: dict, manifest: Path, work: Path) -> tuple[float, float | None, float]:
    """(seconds to the line before the first step, CPU seconds by then, seconds of the whole job)."""
    cmd = [sys.executable, "-m", "finetail.cli", "train", "--manifest", str(manifest), "--spec", json.dumps(SPEC),
           "--out-dir", str(work / "out"), "--checkpoint", str(work / "ckpt.pt"), "--study-dir", str(work.parent),
           "--threads", "1"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    first, cpu, lines = None, None, []
    assert p.stderr is not None
    for line in p.stderr:
        lines.append(line)
        if first is None and MARK in line:
            first = time.perf_counter() - t0
            cpu = _cpu_seconds(p.pid)
    rc = p.wait()
    total = time.perf_counter() - t0
    if rc != 0 or first is None:
        raise RuntimeError(f"finetail train failed (exit {rc}) or never logged {MARK!r}:\n{''.join(lines)}")
    if env.get("FINETAIL_WORKER") != "off" and any("running in-process" in line for line in lines):
        raise RuntimeError(f"a job meant for the worker ran in-process:\n{''.join(lines)}")
    return first, cpu, total


def _start_worker(env: dict, tmp: Path):
    """A warm worker for the bench's runs (finetail.worker), ready."""
    sys.path.insert(0, env["PYTHONPATH"].split(os.pathsep)[0])  # this checkout's library, as the jobs'
    from finetail.worker import LocalWorker

    worker = LocalWorker(str(tmp / "w.sock"), tmp / "worker.log", env={k: v for k, v in env.items()
                                                                         if k != "FINETAIL_WORKER"})
    worker.start()
    if not worker.wait_ready(300):
        raise RuntimeError(f"the worker did not start:\n{worker.log.read_text()}")
    return worker


def time_jobs(env: dict, manifest: Path, tmp: Path, runs: int) -> dict[str, list]:
    """``runs`` tiny jobs in-process and ``runs`` through a warm worker, alternated, after one
    unmeasured run of each (the first creates the MLflow store's tables)."""
    worker = _start_worker(env, tmp)
    modes = {"inprocess": env, "worker": dict(env, FINETAIL_WORKER=worker.path)}
    got: dict[str, list] = {f"{m}_{k}": [] for m in modes for k in ("first", "cpu", "total")}
    try:
        for i in range(runs + 1):
            for mode in (("inprocess", "worker") if i % 2 == 0 else ("worker", "inprocess")):
                first, cpu, total = time_train(modes[mode], manifest, tmp / f"{mode}{i}")
                if i:
                    for k, v in (("first", first), ("cpu", cpu), ("total", total)):
                        got[f"{mode}_{k}"].append(v)
    finally:
        worker.stop()
    return got


def _median(xs: list) -> float | None:
    return round(statistics.median(xs), 3) if xs and None not in xs else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs of each measurement; the median is reported")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "startup.json")
    a = ap.parse_args(argv)
    env = _env()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="finetail-startup-") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "finetail.cli", "generate", "--dataset", "gen10", "--spec",
                        json.dumps(WORLD), "--out-dir", str(tmp / "gen10")], env=env, check=True,
                       stderr=subprocess.DEVNULL)
        time_import(env)  # warm the file cache and the bytecode once, unmeasured
        imports = [time_import(env) for _ in range(a.runs)]
        got = time_jobs(env, tmp / "gen10" / "manifest.parquet", tmp, a.runs)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    from finetail.results_page import cpu_model  # here, after the timed runs: the parent's imports time nothing

    out = {
        "import_finetail_cli_s": round(statistics.median(imports), 3),
        "train_to_first_step_s": _median(got["inprocess_first"]),
        "train_cpu_to_first_step_s": _median(got["inprocess_cpu"]),
        "train_total_s": _median(got["inprocess_total"]),
        "whole_job_inprocess_s": _median(got["inprocess_total"]),
        "whole_job_worker_s": _median(got["worker_total"]),
        "worker_to_first_step_s": _median(got["worker_first"]),
        "runs": {"import": [round(x, 3) for x in imports], "first_step": [round(x, 3) for x in got["inprocess_first"]],
                 "first_step_cpu": got["inprocess_cpu"], "total": [round(x, 3) for x in got["inprocess_total"]],
                 "worker_first_step": [round(x, 3) for x in got["worker_first"]],
                 "worker_total": [round(x, 3) for x in got["worker_total"]]},
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_1min_before": load_before,
        "load_1min_after": load,
    }
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        pass
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"import finetail.cli: {out['import_finetail_cli_s']:.2f} s; finetail train to its first step: "
          f"{out['train_to_first_step_s']:.2f} s ({out['train_cpu_to_first_step_s']} s CPU; whole job "
          f"{out['train_total_s']:.2f} s); through the worker: first step {out['worker_to_first_step_s']:.2f} s, "
          f"whole job {out['whole_job_worker_s']:.2f} s; median of {a.runs}, "
          f"1-min load {load_before} before, {load} after; -> {a.out}")
    return out


if __name__ == "__main__":
    main()
