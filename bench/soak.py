"""Kill a whole study with SIGKILL at random moments, rerun it each time, and check the end state.

    python bench/soak.py                                  # bench/soak.yaml, 10 kills, seed 0
    python bench/soak.py --kills 2 --seed 3 --work /tmp/s --keep

0. Copies the workflow and the library (the checkout's files, or --git-ref's) into <work>/code
   and runs that copy throughout (jobs import it through PYTHONPATH), so edits to the
   checkout meanwhile change nothing.
1. Runs the study once uninterrupted in <work>/reference (`snakemake --cores N`): the
   reference outputs, and its wall time T.
2. In <work>/soak, `--kills` times: starts `snakemake --cores N --rerun-incomplete` in a new
   process group and waits for a seeded random moment: kill i comes once the soak has got as
   far as the reference had at t_i (t_1 < ... < t_k uniform in 5-90% of T: a file the
   reference wrote after t_i exists), plus a random 0-2x a training job's time from start to
   first checkpoint (measured on the reference; at most 0.15 T), so that the kills spread
   over the whole study and land anywhere in a job. Then it SIGKILLs the whole process group
   (and any descendant that left it): snakemake, its job shells and every `finetail train`
   at once, as a node crash would. After each kill, `snakemake --unlock`, as a user would.
3. Runs it to the end (`--rerun-incomplete`), then checks:
   - MLflow (results/<study>/mlflow.db): exactly one FINISHED run per training job (jobs =
     finetail.rule + finetail.wildcard.* tags; the set of jobs equals the reference's),
     no RUNNING run, no job with more than one run (FAILED and KILLED runs counted apart);
   - every training job's metrics.json "final" dict, its history (losses and test metrics
     per epoch, timing columns left out) and its weights (model.pt, the checkpoint's model)
     equal the reference's exactly (CPU, one thread per job: deterministic), and its run_id
     is its FINISHED run;
   - `finetail audit --results results/<study>` exits 0.

Resumes are counted from the job logs ("resuming from checkpoint" lines, read after every
invocation, before the next one can overwrite them). Prints the figures, writes them to
--out (bench/out/soak.json) and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HISTORY_TIMING = {"images_per_s", "data_wait_frac"}  # wall-clock columns of history.csv
TRAINING_RULES = ("cbloss", "cbloss_natural", "pretrain", "finetune")


def _descendants(root: int) -> list[int]:
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier]
        out += frontier
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _arg(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None


def training_in_flight(pids: list[int], work: Path) -> list[dict]:
    """The `finetail train` processes among ``pids``: job name and whether its checkpoint exists."""
    jobs = []
    for pid in pids:
        argv = _cmdline(pid)
        if "train" not in argv or not any(a.endswith("finetail") or a == "finetail.cli" for a in argv):
            continue
        rule, wc, ck = _arg(argv, "--rule"), _arg(argv, "--wildcards"), _arg(argv, "--checkpoint")
        if rule is None:
            continue
        name = rule + ":" + "/".join(str(v) for v in json.loads(wc or "{}").values())
        jobs.append({"job": name, "checkpoint_existed": bool(ck) and (work / ck).exists()})
    return jobs


CODE_PATHS = ("Snakefile", "config.yaml", "workflow", "src", "envs")


def snapshot_code(dest: Path, git_ref: str | None) -> Path:
    """A copy of the workflow and the library (of the checkout, or of ``git_ref``): the soak and
    its reference run one version of the code even while the checkout changes (an edit of the
    training code would replan every training job)."""
    dest.mkdir(parents=True, exist_ok=True)
    if git_ref:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", git_ref, *CODE_PATHS],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return dest
    for name in CODE_PATHS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, dest / name)
    return dest


def code_version(git_ref: str | None) -> str:
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    if git_ref:
        return git("rev-parse", git_ref)
    dirty = git("status", "--porcelain", "--", *CODE_PATHS)
    return git("rev-parse", "HEAD") + (" + uncommitted changes" if dirty else "")


class Study:
    def __init__(self, work: Path, configfile: Path, cores: int, log_path: Path, code: Path):
        self.work, self.configfile, self.cores, self.log_path, self.code = work, configfile, cores, log_path, code
        import yaml

        self.name = yaml.safe_load(configfile.read_text())["study"]
        self.results = work / "results" / self.name
        self.logs = work / "logs" / self.name
        self.env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        # jobs import the snapshot's library (PYTHONPATH comes before the editable install)
        self.env["PYTHONPATH"] = str(code / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
        self.env.pop("MLFLOW_TRACKING_URI", None)  # the study's own SQLite store

    def cmd(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "snakemake", "-s", str(self.code / "Snakefile"), "--directory", str(self.work),
                "--configfile", str(self.configfile), "--cores", str(self.cores), *extra]

    def start(self, *extra: str) -> subprocess.Popen:
        self.work.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")  # a file, not a pipe: a full pipe would block snakemake
        log.write(f"\n===== {time.strftime('%H:%M:%S')} {' '.join(extra)}\n")
        log.flush()
        return subprocess.Popen(self.cmd(*extra), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)

    def run(self, *extra: str, watch: bool = False) -> float:
        """Run snakemake to the end. With ``watch``, note when each file under results/<study>
        first appears (``self.appeared``: path -> seconds into the run) and, per training job,
        the seconds from its log's appearance to its first checkpoint (``self.to_first_checkpoint``)."""
        t0 = time.perf_counter()
        proc = self.start(*extra)
        seen: dict[str, float] = {}
        checkpointed: dict[str, float] = {}
        appeared: dict[str, float] = {}
        while proc.poll() is None:
            if watch:
                now = time.perf_counter()
                for f in self.files():
                    appeared.setdefault(f, now - t0)
                for rule in TRAINING_RULES:
                    for p in (self.logs / rule).rglob("*.log"):
                        job = str(p.relative_to(self.logs).with_suffix(""))
                        seen.setdefault(job, now)
                        if job not in checkpointed and (self.results / "checkpoints" / job / "last.pt").exists():
                            checkpointed[job] = now
            time.sleep(0.2 if watch else 0.5)
        if proc.returncode != 0:
            raise SystemExit(f"snakemake {' '.join(extra)} failed ({proc.returncode}) in {self.work}; see {self.log_path}")
        if watch:
            self.to_first_checkpoint = {j: checkpointed[j] - seen[j] for j in checkpointed}
            self.appeared = appeared
        return time.perf_counter() - t0

    def files(self) -> list[str]:
        return [str(p.relative_to(self.results)) for p in self.results.rglob("*") if p.is_file()] \
            if self.results.exists() else []

    def resume_lines(self, since: float) -> list[str]:
        """'resuming from checkpoint' lines in job logs written since ``since`` (epoch seconds)."""
        out = []
        if self.logs.exists():
            for p in sorted(self.logs.rglob("*.log")):
                if p.stat().st_mtime >= since:
                    out += [f"{p.relative_to(self.logs)}: {line.strip()}" for line in p.read_text(errors="replace").splitlines()
                            if "resuming from checkpoint" in line]
        return out


def kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL snakemake's process group and every descendant (one that left the group too)."""
    pids = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is snakemake's pid
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    return pids


# --------------------------------------------------------------------------- checks
def job_key(tags: dict) -> str:
    wc = sorted((k.removeprefix("finetail.wildcard."), v) for k, v in tags.items() if k.startswith("finetail.wildcard."))
    return tags.get("finetail.rule", "?") + ":" + ",".join(f"{k}={v}" for k, v in wc)


def mlflow_runs(results: Path, study: str) -> dict[str, list[dict]]:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name(f"finetail-{study}")
    if exp is None:
        return {}
    jobs: dict[str, list[dict]] = defaultdict(list)
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=50000)
    for r in runs:
        steps = sorted({m.step for m in client.get_metric_history(r.info.run_id, "train_loss")})
        jobs[job_key(r.data.tags)].append({"run_id": r.info.run_id, "status": r.info.status,
                                            "resumed": r.data.tags.get("finetail.resumed") == "true",
                                            "train_loss_steps": steps})
    return dict(jobs)


def _state(path: Path) -> dict | None:
    import torch

    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _same_state(a: dict | None, b: dict | None) -> bool:
    import torch

    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _history(path: Path):
    import pandas as pd

    df = pd.read_csv(path)
    return df.drop(columns=[c for c in df.columns if c in HISTORY_TIMING])


def compare_outputs(ref: Path, soak: Path) -> tuple[int, list[dict]]:
    """Compare every training job's outputs under results/<study>: (jobs compared, mismatches)."""
    mismatches, n = [], 0
    for m_ref in sorted(ref.rglob("metrics.json")):
        rel = m_ref.parent.relative_to(ref)
        if rel.parts[0] not in ("cbloss", "cbloss_natural", "pretrain", "finetune"):
            continue
        n += 1
        m_soak = soak / rel / "metrics.json"
        if not m_soak.exists():
            mismatches.append({"job": str(rel), "what": "metrics.json missing"})
            continue
        a, b = json.loads(m_ref.read_text()), json.loads(m_soak.read_text())
        if a["final"] != b["final"]:
            diff = {k: (a["final"].get(k), b["final"].get(k)) for k in set(a["final"]) | set(b["final"])
                    if a["final"].get(k) != b["final"].get(k)}
            mismatches.append({"job": str(rel), "what": "final", "diff": str(diff)[:500]})
        if not _history(m_ref.parent / "history.csv").equals(_history(m_soak.parent / "history.csv")):
            mismatches.append({"job": str(rel), "what": "history.csv"})
        if not _same_state(_state(ref / "checkpoints" / rel / "last.pt"), _state(soak / "checkpoints" / rel / "last.pt")):
            mismatches.append({"job": str(rel), "what": "checkpoint weights"})
        if (m_ref.parent / "model.pt").exists() and not _same_state(_state(m_ref.parent / "model.pt"),
                                                                     _state(m_soak.parent / "model.pt")):
            mismatches.append({"job": str(rel), "what": "model.pt weights"})
    return n, mismatches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configfile", default=str(ROOT / "bench" / "soak.yaml"), help="the reduced study (default: bench/soak.yaml)")
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs of the whole run (default 10)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--git-ref", default=None,
                    help="run this commit's workflow and library (git archive) instead of the checkout's files")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "soak.json"))
    a = ap.parse_args()

    t_start = time.perf_counter()
    configfile = Path(a.configfile).resolve()
    work = Path(a.work).resolve() if a.work else Path(tempfile.mkdtemp(prefix="finetail-soak-"))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log")
    log_path.write_text("")
    for d in ("reference", "soak", "code"):
        shutil.rmtree(work / d, ignore_errors=True)
    code = snapshot_code(work / "code", a.git_ref)
    ref = Study(work / "reference", configfile, a.cores, log_path, code)
    soak = Study(work / "soak", configfile, a.cores, log_path, code)

    print(f"reference run in {ref.work} ...", flush=True)
    t_ref = ref.run(watch=True)
    t0 = time.perf_counter()
    ref.run("-n")
    t_startup = time.perf_counter() - t0  # snakemake's own start (DAG, nothing to do)
    # what a rerun pays again before training moves on: a training job's start to its first checkpoint
    firsts = sorted(ref.to_first_checkpoint.values())
    t_restart = firsts[len(firsts) // 2] if firsts else 0.0
    print(f"reference: {t_ref:.1f} s (snakemake start-up {t_startup:.1f} s, a training job's start to its "
          f"first checkpoint: median {t_restart:.1f} s)", flush=True)

    # Kill moments spread over the study: t_1 < ... < t_k drawn uniformly in 5-90% of the
    # reference's wall time; kill i comes once the soak has got as far as the reference had at
    # t_i (a file the reference wrote after t_i exists: outputs, first checkpoints, run records),
    # plus a random 0-2x a training job's time to its first checkpoint (at most 15% of the
    # reference's wall time), so that kills land
    # anywhere in a job: start-up, before its first checkpoint, mid-epoch, between jobs.
    rng = random.Random(a.seed)
    targets = sorted(rng.uniform(0.05, 0.9) * t_ref for _ in range(a.kills))
    jitters = [rng.uniform(0.0, min(2.0 * max(t_restart, 1.0), 0.15 * t_ref)) for _ in range(a.kills)]
    appeared = ref.appeared

    def progress() -> float:
        """How far the soak has got, in seconds of the reference run."""
        return max((appeared.get(f, 0.0) for f in soak.files()), default=0.0)

    kills, resumes, finished_early = [], [], False
    for i in range(a.kills):
        since, t_run = time.time(), time.perf_counter()
        proc = soak.start("--rerun-incomplete")
        deadline = None
        while proc.poll() is None:
            now = time.perf_counter()
            if deadline is None and progress() >= targets[i]:
                deadline = now + jitters[i]
            if deadline is not None and now >= deadline:
                break
            time.sleep(0.1)
        if proc.poll() is not None:  # the study finished before this kill: nothing left to kill
            if proc.returncode != 0:
                raise SystemExit(f"snakemake failed ({proc.returncode}) before kill {i + 1}; see {log_path}")
            finished_early = True
            resumes += soak.resume_lines(since)
            print(f"kill {i + 1}: the study finished after {time.time() - since:.1f} s, before reaching "
                  f"{targets[i]:.1f} s of the reference")
            break
        pids = _descendants(proc.pid)
        in_flight = training_in_flight(pids, soak.work)
        reached = progress()
        kill_tree(proc)
        elapsed = time.perf_counter() - t_run
        time.sleep(0.5)  # let the kernel reap; the SQLite lock (flock) is released with the processes
        new = soak.resume_lines(since)
        resumes += new
        kills.append({"reference_moment_s": round(targets[i], 1), "jitter_s": round(jitters[i], 1),
                      "into_this_run_s": round(elapsed, 1), "progress_s": round(reached, 1),
                      "processes": len(pids) + 1, "training_in_flight": in_flight,
                      "resumes_in_this_run": len(new)})
        print(f"kill {i + 1} at {targets[i]:.1f} s of the reference (+{jitters[i]:.1f} s), {elapsed:.1f} s into "
              f"run {i + 1}: {len(pids) + 1} process(es); training jobs in flight: "
              f"{[j['job'] + ('' if j['checkpoint_existed'] else ' (no checkpoint yet)') for j in in_flight]}", flush=True)
        soak.run("--unlock")
    since = time.time()
    t0 = time.perf_counter()
    soak.run("--rerun-incomplete")
    t_final = time.perf_counter() - t0
    resumes += soak.resume_lines(since)

    # ------------------------------------------------------------------ checks
    ref_jobs = mlflow_runs(ref.results, ref.name)
    jobs = mlflow_runs(soak.results, soak.name)
    statuses = [r["status"] for runs in jobs.values() for r in runs]
    one_finished = [k for k, runs in jobs.items() if [r["status"] for r in runs] == ["FINISHED"]]
    duplicates = {k: [r["status"] for r in runs] for k, runs in jobs.items() if len(runs) > 1}
    no_finished = sorted(k for k, runs in jobs.items() if "FINISHED" not in [r["status"] for r in runs])
    jobs_compared, mismatches = compare_outputs(ref.results, soak.results)
    for k, runs in jobs.items():  # metrics.json names the job's FINISHED run; it logged every epoch
        fin = [r for r in runs if r["status"] == "FINISHED"]
        for r in fin:
            epochs = ref_jobs.get(k, [{}])[0].get("train_loss_steps")
            if epochs is not None and r["train_loss_steps"] != epochs:
                mismatches.append({"job": k, "what": "MLflow train_loss steps", "got": r["train_loss_steps"], "want": epochs})
    for m in sorted(soak.results.rglob("metrics.json")):
        rec = json.loads(m.read_text())
        if "run_id" in rec and "rule" in rec:
            k = job_key({"finetail.rule": rec["rule"], **{f"finetail.wildcard.{w}": str(v) for w, v in rec["wildcards"].items()}})
            if rec["run_id"] not in [r["run_id"] for r in jobs.get(k, []) if r["status"] == "FINISHED"]:
                mismatches.append({"job": k, "what": "metrics.json run_id is not the job's FINISHED run"})
    audit = subprocess.run([str(Path(sys.executable).parent / "finetail"), "audit", "--results", f"results/{soak.name}"],
                           cwd=soak.work, capture_output=True, text=True, env=soak.env)

    figures = {
        "study": str(configfile.relative_to(ROOT) if configfile.is_relative_to(ROOT) else configfile),
        "code": code_version(a.git_ref),
        "seed": a.seed,
        "cores": a.cores,
        "kills_requested": a.kills,
        "kills": len(kills),
        "kills_hitting_training": sum(1 for k in kills if k["training_in_flight"]),
        "training_jobs_killed": sum(len(k["training_in_flight"]) for k in kills),
        "training_jobs_killed_before_first_checkpoint": sum(
            1 for k in kills for j in k["training_in_flight"] if not j["checkpoint_existed"]),
        "finished_before_a_kill": finished_early,
        "resumes": len(resumes),
        "training_jobs": len(jobs),
        "training_jobs_reference": len(ref_jobs),
        "same_jobs_as_reference": sorted(jobs) == sorted(ref_jobs),
        "runs": len(statuses),
        "runs_by_status": {s: statuses.count(s) for s in sorted(set(statuses))},
        "jobs_with_exactly_one_finished_run": len(one_finished),
        "jobs_without_finished_run": no_finished,
        "running_runs": statuses.count("RUNNING"),
        "failed_runs": statuses.count("FAILED"),
        "killed_runs": statuses.count("KILLED"),
        "duplicate_jobs": len(duplicates),
        "duplicates": duplicates,
        "jobs_compared": jobs_compared,
        "mismatches": len(mismatches),
        "mismatch_details": mismatches,
        "audit_rc": audit.returncode,
        "audit_tail": (audit.stdout + audit.stderr)[-1500:],
        "reference_wall_s": round(t_ref, 1),
        "snakemake_startup_s": round(t_startup, 1),
        "job_start_to_first_checkpoint_s": round(t_restart, 1),
        "final_run_wall_s": round(t_final, 1),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "kill_log": kills,
        "resume_lines": resumes,
        "work": str(work),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    failures = []
    if not figures["same_jobs_as_reference"]:
        failures.append("the soak's training jobs differ from the reference's")
    if len(one_finished) != len(jobs) or not jobs:
        failures.append(f"{len(jobs) - len(one_finished)} job(s) without exactly one FINISHED run")
    if figures["running_runs"]:
        failures.append(f"{figures['running_runs']} RUNNING run(s)")
    if duplicates:
        failures.append(f"{len(duplicates)} job(s) with more than one run")
    if mismatches:
        failures.append(f"{len(mismatches)} mismatch(es) with the uninterrupted run")
    if audit.returncode != 0:
        failures.append(f"finetail audit exited {audit.returncode}")
    figures["ok"] = not failures
    figures["failures"] = failures
    out.write_text(json.dumps(figures, indent=2) + "\n")

    print(f"\nsoak of {figures['study']} (seed {a.seed}): {len(kills)} kills ({figures['kills_hitting_training']} "
          f"while training; {figures['training_jobs_killed']} training processes killed, "
          f"{figures['training_jobs_killed_before_first_checkpoint']} before their first checkpoint), "
          f"{len(resumes)} resumes from checkpoints")
    print(f"MLflow: {figures['runs']} runs for {len(jobs)} training jobs (reference: {len(ref_jobs)}), "
          f"by status {figures['runs_by_status']}; {len(one_finished)} jobs with exactly one FINISHED run, "
          f"{figures['running_runs']} RUNNING, {len(duplicates)} jobs with duplicates")
    print(f"outputs: {jobs_compared} training jobs compared with the uninterrupted run, {len(mismatches)} mismatches")
    print(f"audit: exit {audit.returncode}")
    print(f"wall: {figures['wall_s']} s (reference {figures['reference_wall_s']} s); figures in {out}")
    if failures:
        print("FAILED: " + "; ".join(failures))
        for d in list(duplicates.items())[:10]:
            print("  duplicate:", d)
        for m in mismatches[:10]:
            print("  mismatch:", m)
        if audit.returncode != 0:
            print(audit.stdout[-1500:] + audit.stderr[-1500:])
    else:
        print("OK")
    if not a.keep and not failures and not a.work:
        shutil.rmtree(work, ignore_errors=True)
    elif failures or a.keep:
        print(f"scratch folder kept: {work}")
    raise SystemExit(0 if not failures else 1)


if __name__ == "__main__":
    main()
