"""Helpers shared by several test modules (test modules never import each other):

- the reduced study ``TINY`` and its Snakemake runner (:func:`snakemake`, :func:`planned`);
- a training process signalled or disturbed once its checkpoint reaches an epoch
  (:func:`run_until_epoch`, :func:`kill_after_epoch`);
- the Slurm profile and whether a Slurm answers (:data:`PROFILE`, :func:`require_slurm`);
- real file systems a test can make full or read-only (:func:`tmpfs`, :func:`fill`,
  :func:`read_only`): mounts, which need root and mount rights; without them the test is
  skipped with its reason (also under CI: the rights are the machine's, not an install step).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, require

# --------------------------------------------------------------------------- the reduced study
TINY = {
    "study": "tiny",
    "replicates": {"count": 2},  # each reseeds the world, the long-tailed subsets, the random draw, training
    "world": {"seed": 0, "image_size": 16},
    "datasets": {"gen10": {"kind": "world", "train_per_class": 40, "test_per_class": 10}},
    "cbloss": {
        "datasets": ["gen10"],
        "imbalance": [4, 10],
        "losses": {"softmax": {"type": "softmax"}, "cb_focal": {"type": "focal", "beta": 0.99, "gamma": 0.5}},
        "recipe": {"model": "resnet8", "width": 4, "epochs": 3, "batch_size": 32, "lr": 0.05, "warmup_epochs": 1,
                   "milestones": [2], "lr_factors": [0.1], "eval_every": 1, "crop_pad": 2},
    },
    "shots": {"many": 30, "few": 10},
}
TINY["datasets"].update({d: {"kind": "world", "train_per_class": 12, "test_per_class": 6}
                         for d in ("generic", "natural", "cub200", "stanford_cars")})
TINY["cbloss_natural"] = {
    "datasets": ["natural"],
    "models": ["resnet8"],
    "losses": {"softmax": {"type": "softmax"}, "cb_focal": {"type": "focal", "beta": 0.999, "gamma": 0.5}},
    "recipe": TINY["cbloss"]["recipe"] | {"epochs": 1},
}
TINY["transfer"] = {
    "sources": {"generic": ["generic"], "natural": ["natural"], "generic+natural": ["generic", "natural"]},
    "selection": {"pool": ["generic", "natural"], "top_k": 3, "random": {"name": "random", "seed": 0}},
    "targets": ["cub200", "stanford_cars"],
    "features": {"model": "generic+natural"},
    "similarity": {"min_source_images": 2},
    "pretrain": {"recipe": TINY["cbloss"]["recipe"] | {"epochs": 1}},
    "finetune": {"recipe": TINY["cbloss"]["recipe"] | {"epochs": 2}},
}


def snakemake(workdir: Path, config: dict, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The checkout's Snakefile on ``config`` (written to ``workdir/study.yaml``) in ``workdir``, 2 cores."""
    cfg = workdir / "study.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(cfg), "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def planned(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Job counts from a dry run's 'Job stats' table."""
    out = result.stdout + result.stderr
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.M) if m[0] != "total"}


# --------------------------------------------------------------------------- a training process
def run_until_epoch(cmd: list[str], checkpoint: Path, then: Callable[[subprocess.Popen], object], min_epoch: int = 2,
                    timeout: float = 120, env: dict | None = None):
    """Start ``cmd`` (with ``env``, default this process's), call ``then(process)`` once its
    checkpoint has reached ``min_epoch``, and wait for it: its return code, output and the
    checkpoint it left. Fails the test when the process ends before that epoch."""
    from finetail.training.checkpoint import load_checkpoint

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if checkpoint.exists() and load_checkpoint(checkpoint)["epoch"] >= min_epoch:
            break
        if proc.poll() is not None:
            pytest.fail(f"training ended before epoch {min_epoch}:\n" + proc.stdout.read())
        time.sleep(0.02)
    then(proc)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out, load_checkpoint(checkpoint)


def kill_after_epoch(cmd, checkpoint, sig, min_epoch=2, timeout=120, env=None):
    """:func:`run_until_epoch` sending ``sig``."""
    return run_until_epoch(cmd, checkpoint, lambda proc: proc.send_signal(sig), min_epoch, timeout, env)


# --------------------------------------------------------------------------- Slurm
PROFILE = ROOT / "workflow" / "profiles" / "slurm"


def slurm_up() -> str | None:
    """None when a Slurm controller answers and has an idle node, else why not."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "Slurm client tools are not installed (.ci/slurm-local install)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if r.returncode != 0 or not any(s.startswith(("idle", "mixed", "alloc")) for s in r.stdout.split()):
        return f"no Slurm node is up (sinfo: {(r.stdout + r.stderr).strip()!r}; .ci/slurm-local start)"
    return None


def require_slurm(what: str) -> None:
    """Skip when no Slurm answers; under CI fail instead: CI must run ``what``."""
    why = slurm_up()
    require(why is None, f"{what} needs Slurm: {why}")


# --------------------------------------------------------------------------- real file systems
@contextlib.contextmanager
def tmpfs(path: Path, size_kib: int) -> Iterator[Path]:
    """A real tmpfs of ``size_kib`` KiB mounted at ``path`` (created) for the block; unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:  # a recorded skip even under CI: mount rights are the machine's, not a missing install
        pytest.skip(f"cannot mount a tmpfs at {path} (needs root and mount rights): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(folder: Path) -> Path:
    """Fill the device of ``folder`` to its last byte with ``folder/.filler``; the filler's path
    (delete it to make room again)."""
    filler = folder / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    block = b"\0" * (1 << 16)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
    finally:
        os.close(fd)
    assert os.statvfs(folder).f_bavail == 0
    return filler


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` made truly read-only for the block: a read-only bind mount of itself (root
    ignores file modes); remounted writable after."""
    r = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True, text=True)
    if r.returncode != 0:  # a recorded skip even under CI (see tmpfs)
        pytest.skip(f"cannot bind-mount {folder} read-only (needs root and mount rights): {r.stderr.strip()}")
    try:
        probe = folder / ".probe"
        with pytest.raises(OSError) as e:
            probe.write_bytes(b"")
        assert e.value.errno == errno.EROFS
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
