"""Time a whole study run: wall clock and peak memory of the whole process tree.

    python bench/bench_study.py                       # the default study, fresh, --cores 2
    python bench/bench_study.py --configfile S.yaml --cores 4 --keep

Runs `snakemake` in a scratch work directory (so results/ of the checkout are untouched unless
--here), samples the resident memory of snakemake and every job it starts every 0.2 s, and
prints and writes (bench/out/study.json) the wall time, the peak summed RSS of all processes
at once, the peak RSS of any single process, and each rule's job count and mean wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configfile", default=None, help="study file (default: config.yaml)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--here", action="store_true", help="run in the checkout (results/ there) instead of a scratch dir")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "study.json"))
    a = ap.parse_args()

    work = ROOT if a.here else Path(tempfile.mkdtemp(prefix="finetail-bench-"))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work),
           "--cores", str(a.cores)]
    if a.configfile:
        cmd += ["--configfile", str(Path(a.configfile).resolve())]
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
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
        "wall_s": round(wall, 1),
        "peak_rss_total_mb": round(peak_sum / 1024, 1),
        "peak_rss_single_mb": round(peak_one / 1024, 1),
        "training_jobs": {k: {"count": len(v), "mean_train_s": round(sum(v) / len(v), 1)} for k, v in jobs.items()},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch_version, "torch_threads": threads},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not a.here and not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
