"""CPU throughput options of the engine for the real-photo CIFAR-10-LT study
(workflow/studies/cifar10lt_cpu.yaml): fp32 or bf16 autocast, NCHW or channels-last, batch
size, torch threads. Each variant trains the study's network (ResNet-8, width 16, softmax,
its lr and weight decay) on the long-tailed CIFAR-10 (IF 100, seed 0, from the shared JPEG
archive) for ``--epochs`` epochs; the variants run one after the other, in ``--rounds``
alternating rounds, and each variant's figure is the median over rounds of its steady
images/s (epochs 2..N). With ``--epochs`` large enough to learn, the test error of each
variant (last epoch, same seed) shows whether an option moves the result.

    .venv/bin/python bench/cpu_recipe.py                      # defaults: 2 rounds, 2 epochs
    .venv/bin/python bench/cpu_recipe.py --threads 1 2 --batch-size 128 256

Writes ``bench/out/cpu_recipe.json`` (with the CPU model and its bf16 flags).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def cpu_model() -> tuple[str, list[str]]:
    """The CPU's model name and the bf16 / AMX flags it reports (Linux)."""
    name, flags = platform.processor() or "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = sorted(f for f in line.split(":", 1)[1].split() if "bf16" in f or f.startswith("amx"))
                break
    except OSError:
        pass
    return name, flags


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    ap.add_argument("--epochs", type=int, default=2, help="epochs per variant (>= 2; the first is warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds over the variants")
    ap.add_argument("--subset", type=int, default=None, help="train on N of the 12,406 long-tailed images")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[128])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--memory-format", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "cpu_recipe.json"))
    a = ap.parse_args(argv)
    if a.epochs < 2:
        ap.error("--epochs must be at least 2 (the first is warm-up)")

    import numpy as np
    import torch
    from bench_pipeline import decode, read_archive, select

    from finetail.training.loop import train
    from finetail.training.recipe import TrainConfig

    rows, data = read_archive(Path(a.archive))
    tr, te, _classes, _n = select(rows, 100.0, a.subset, a.test_images)
    _, train_x = decode(tr["path"].tolist(), data)
    _, test_x = decode(te["path"].tolist(), data)
    train_y, test_y = tr["label"].to_numpy(), te["label"].to_numpy()
    del data
    name, flags = cpu_model()
    print(f"CPU {name} ({os.cpu_count()} CPUs; bf16 flags: {', '.join(flags) or 'none'}), torch {torch.__version__}; "
          f"{len(train_y)} training images, {len(test_y)} test images, {a.epochs} epochs per variant", flush=True)

    variants = list(itertools.product(a.threads, a.batch_size, a.precision, a.memory_format))
    runs: dict[tuple, list[dict]] = {v: [] for v in variants}
    for rnd in range(a.rounds):
        for v in variants:
            threads, batch, prec, fmt = v
            torch.set_num_threads(threads)
            cfg = TrainConfig(model="resnet8", width=16, epochs=a.epochs, batch_size=batch, lr=0.1 * batch / 128,
                              weight_decay=2e-4, warmup_epochs=1, milestones=[max(1, a.epochs - 1)], lr_factors=[0.1],
                              crop_pad=4, eval_every=a.epochs, seed=0, amp=prec == "bf16", cpu_bf16=prec == "bf16",
                              cpu_channels_last=fmt == "channels_last")
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="finetail-cpu-recipe-") as tmp:
                res = train(cfg, train_x, train_y, test_x, test_y, 10, Path(tmp) / "last.pt", device="cpu",
                            log=lambda _m: None)
            per_epoch = [float(h["images_per_s"]) for h in res.history]
            steady = statistics.median(per_epoch[1:])
            runs[v].append({"images_per_s": steady, "wall_s": time.perf_counter() - t0, "precision": res.precision,
                            "top1_error": float(res.metrics["top1_error"]), "train_loss": res.history[-1]["train_loss"]})
            print(f"round {rnd + 1}: threads {threads}, batch {batch:4d}, {prec}, {fmt:13s}: {steady:7.1f} images/s, "
                  f"test error {res.metrics['top1_error']:.3f} (ran {res.precision})", flush=True)

    base = statistics.median(r["images_per_s"] for r in runs[variants[0]])
    table = []
    print(f"\n{'threads':>7s} {'batch':>5s} {'precision':9s} {'format':13s} {'images/s':>9s} {'vs first':>8s} {'error':>6s}")
    for v in variants:
        ips = statistics.median(r["images_per_s"] for r in runs[v])
        err = statistics.median(r["top1_error"] for r in runs[v])
        row = {"threads": v[0], "batch_size": v[1], "precision": v[2], "memory_format": v[3],
               "images_per_s": round(ips, 1), "ratio_to_first": round(ips / base, 3), "top1_error": round(err, 4),
               "rounds": [round(r["images_per_s"], 1) for r in runs[v]]}
        table.append(row)
        print(f"{v[0]:7d} {v[1]:5d} {v[2]:9s} {v[3]:13s} {ips:9.1f} {ips / base:8.2f} {err:6.3f}")
    record = {"cpu": name, "cpu_bf16_flags": flags, "cpus": os.cpu_count(), "torch": torch.__version__,
              "train_images": int(len(train_y)), "test_images": int(len(test_y)), "epochs": a.epochs,
              "rounds": a.rounds, "measured": "median over rounds of the median images/s of epochs 2..N",
              "loadavg_1min_after": round(os.getloadavg()[0], 2), "variants": table,
              "command": " ".join(["bench/cpu_recipe.py"] + (sys.argv[1:] if argv is None else argv)),
              "date": time.strftime("%Y-%m-%d %H:%M"), "numpy": np.__version__}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
