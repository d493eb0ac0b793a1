"""Time a whole study run: wall clock and peak memory of the whole process tree.

    python bench/bench_study.py                       # the default study, fresh, --cores 2
    python bench/bench_study.py --configfile S.yaml --cores 4 --keep
    python bench/bench_study.py --compare-worker 2    # without and with the warm worker, alternated

Runs `snakemake` in a scratch work directory (so results/ of the checkout are untouched unless
--here), samples the resident memory of snakemake and every job it starts every 0.2 s, and
prints and writes (bench/out/study.json) the wall time, the peak summed RSS of all processes
at once, the peak RSS of any single process, and each rule's job count and mean wall time.
The peak sums each process's RSS: the worker's children share most of its pages, so with
the worker that sum overstates the memory in use.

With ``--worker off`` the study runs without the warm local worker (``FINETAIL_WORKER=off``:
every job imports torch itself), as before issue 23; the default is the workflow's own
choice (a worker for a local run). ``--compare-worker N`` runs the study 2N times, each from
a fresh scratch directory, alternating without and with the worker (without first), and
reports each wall time, the medians and their ratio (without / with), and which report
files differ between the two (and, for N >= 2, which differ between two runs without it
anyway: run ids, times) -> bench/out/study_worker.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the checkout's finetail, installed or not

from finetail.results_page import cpu_model, git_commit  # noqa: E402


def _children() -> dict[int, int]:
    """pid -> ppid for every process."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    out[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(root: int) -> list[int]:
    parents = _children()
    tree, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier]
        tree += frontier
    return tree


def run_study(a: argparse.Namespace, worker: str | None, keep: bool) -> tuple[dict, Path]:
    """One `snakemake` run of the study (``worker``: "off" for none, None for the workflow's
    choice); returns the figures and the work directory (removed unless ``keep``)."""
    work = ROOT if a.here else Path(tempfile.mkdtemp(prefix="finetail-bench-"))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work),
           "--cores", str(a.cores)]
    if a.configfile:
        cmd += ["--configfile", str(Path(a.configfile).resolve())]
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("FINETAIL_WORKER", None)
    if worker is not None:
        env["FINETAIL_WORKER"] = worker
    log_path = Path(a.out).with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "w")  # a file, not a pipe: a full pipe would block snakemake
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True, env=env)
    peak_sum = peak_one = 0
    while proc.poll() is None:
        rss = [_rss_kb(p) for p in _tree(proc.pid)]
        peak_sum, peak_one = max(peak_sum, sum(rss)), max(peak_one, max(rss, default=0))
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    log_file.close()
    if proc.returncode != 0:
        print(log_path.read_text()[-4000:])
        raise SystemExit(f"snakemake failed ({proc.returncode}); scratch dir kept at {work}")

    jobs: dict[str, list[float]] = {}
    for p in (work / "results").rglob("metrics.json"):
        m = json.loads(p.read_text())
        jobs.setdefault(m.get("rule", "?"), []).append(m.get("wall_s") or 0.0)
    try:
        import torch

        torch_version, threads = torch.__version__, torch.get_num_threads()
    except ImportError:
        torch_version, threads = "?", 0
    result = {
        "study": a.configfile or "config.yaml",
        "cores": a.cores,
        "worker": worker or "workflow default",
        "wall_s": round(wall, 1),
        "peak_rss_total_mb": round(peak_sum / 1024, 1),
        "peak_rss_single_mb": round(peak_one / 1024, 1),
        "training_jobs": {k: {"count": len(v), "mean_train_s": round(sum(v) / len(v), 1)} for k, v in jobs.items()},
        "machine": {"cpus": os.cpu_count(), "processor": cpu_model(),
                    "python": platform.python_version(), "torch": torch_version, "torch_threads": threads},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if not a.here and not keep:
        shutil.rmtree(work, ignore_errors=True)
    return result, work


def report_digests(work: Path) -> dict[str, str]:
    """sha256 of every file under results/<study>/report/ (by path relative to it)."""
    return {str(p.relative_to(r)): hashlib.sha256(p.read_bytes()).hexdigest()
            for r in (work / "results").glob("*/report") for p in sorted(r.rglob("*")) if p.is_file()}


def _differing(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def compare_worker(a: argparse.Namespace) -> dict:
    """``a.compare_worker`` pairs of runs, without and with the worker, alternated."""
    runs: dict[str, list[dict]] = {"inprocess": [], "worker": []}
    digests: dict[str, list[dict]] = {"inprocess": [], "worker": []}
    for i in range(a.compare_worker):
        for mode, worker in (("inprocess", "off"), ("worker", None)):
            result, work = run_study(a, worker, keep=True)
            digests[mode].append(report_digests(work))
            if not a.keep:
                shutil.rmtree(work, ignore_errors=True)
            runs[mode].append(result)
            print(f"pair {i + 1}/{a.compare_worker}, {mode}: {result['wall_s']} s", flush=True)
    walls = {m: [r["wall_s"] for r in rs] for m, rs in runs.items()}
    med = {m: statistics.median(w) for m, w in walls.items()}
    out = {
        "study": a.configfile or "config.yaml",
        "cores": a.cores,
        "wall_s": walls,
        "median_wall_s": med,
        "ratio_inprocess_over_worker": round(med["inprocess"] / med["worker"], 3),
        "report_differs_worker_vs_inprocess": _differing(digests["inprocess"][0], digests["worker"][0]),
        "runs": runs,
        "machine": runs["worker"][0]["machine"],
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if len(digests["inprocess"]) > 1:
        out["report_differs_inprocess_vs_inprocess"] = _differing(digests["inprocess"][0], digests["inprocess"][1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configfile", default=None, help="study file (default: config.yaml)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--here", action="store_true", help="run in the checkout (results/ there) instead of a scratch dir")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--worker", choices=["on", "off"], default=None,
                    help="off: no warm local worker (every job imports torch itself); default: the workflow's "
                         "choice (a worker for a local run)")
    ap.add_argument("--compare-worker", type=int, default=0, metavar="N",
                    help="run N pairs, without and with the worker, alternated; report the wall-time ratio")
    ap.add_argument("--out", default=None,
                    help="default: bench/out/study.json (bench/out/study_worker.json with --compare-worker)")
    a = ap.parse_args()
    a.out = a.out or str(ROOT / "bench" / "out" / ("study_worker.json" if a.compare_worker else "study.json"))
    if a.compare_worker and a.here:
        ap.error("--compare-worker runs each study in a fresh scratch directory: not with --here")
    if a.compare_worker:
        result = compare_worker(a)
    else:
        result, _ = run_study(a, {"off": "off", "on": None, None: None}[a.worker], keep=a.keep)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
