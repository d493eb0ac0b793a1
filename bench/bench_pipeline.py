"""Training images/s of finetail's engine beside the usual PyTorch pipeline, side by side.

Both train the same ResNet-32 (``finetail.models.build_model("resnet32", 10)``) on the same
long-tailed CIFAR-10 (imbalance 100, exp profile: 12,406 training images from the archive's
5,000 a class, chosen by ``finetail.longtail.longtail_subset`` with seed 0, as the workflow
does) with the same batch size, lr 0.1, momentum 0.9, weight decay 2e-4, softmax
cross-entropy, for the same number of epochs over the same images.

- **pipeline** (the usual way): a ``torch.utils.data.Dataset`` holding decoded PIL images
  (as torchvision's CIFAR10 holds its data in memory), torchvision ``RandomCrop(32,
  padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` (training-set mean and
  std), a shuffling ``DataLoader`` with ``--workers`` worker processes (default min(4, CPUs);
  ``pin_memory`` on CUDA), fp32, ``.to(device)`` per batch, a plain SGD loop. On CUDA,
  ``cudnn.benchmark`` is on for it too (as most CIFAR training scripts set it).
- **engine**: ``finetail.training.loop.train`` on uint8 ``N x 32 x 32 x 3`` arrays (the data lives on
  the device, augmentation is batched there; on CUDA with its defaults: bf16 autocast,
  channels-last; ``--compile`` [``--cuda-graphs``] sets ``TrainConfig.compile`` [``cuda_graphs``]
  when the engine has those fields). Only one evaluation, after the last epoch, outside the
  timed epochs.

JPEG decoding happens once, before any timing, for both (the same decoded pixels). An epoch's
figure is its training images divided by its wall time: for the pipeline the whole epoch
including the DataLoader's iteration (workers start each epoch, the default
``persistent_workers=False``) and a final CUDA synchronize; for the engine its own
``images_per_s`` (the training loop of the epoch, synchronized). The first epoch of each is
warm-up (worker start, cuDNN autotuning, caches) and is dropped: the figure reported is the
median of epochs 2..N.

Threads: ``torch.set_num_threads(--threads)`` (default: all CPUs) is set once in this process,
so the engine and the pipeline's main process (the training loop) get the same; the
DataLoader's worker processes run on top of that with one torch thread each (PyTorch's
default in workers). On a 2-core machine the workers therefore compete with the training
loop for the cores: that is what the usual pipeline costs there.

Usage::

    python bench/bench_pipeline.py --subset 2560 --epochs 3          # a quick CPU run
    python bench/bench_pipeline.py --device cuda --epochs 3          # full CIFAR-10-LT IF100
    python bench/bench_pipeline.py --archive /data/cifar10-jpeg.tar.gz --workers 8 --compile --cuda-graphs

Prints a table, whether the issue's targets are met for the device used (CPU: the engine not
slower than the pipeline; CUDA: at least 5x the pipeline and at least 50,000 images/s), and
writes everything with machine info to ``bench/out/pipeline.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
IMAGE_EXT = (".jpg", ".jpeg", ".png")

# The targets (issue 6, item 3).
CPU_TARGET_RATIO = 1.0  # the engine must not be slower than the pipeline on a CPU
CUDA_TARGET_RATIO = 5.0
CUDA_TARGET_IMAGES_PER_S = 50_000.0


def read_archive(archive: Path) -> tuple[list[tuple[str, str, str]], dict[str, bytes]]:
    """Every image of an ImageFolder archive: rows ``(path, class_name, split)`` and the bytes.

    Accepts ``train/<class>/*`` + ``test/<class>/*`` at the top or under one wrapping folder.
    """
    rows, data = [], {}
    with tarfile.open(archive, "r:*") as tf:
        for m in tf:
            if not m.isfile() or not m.name.lower().endswith(IMAGE_EXT):
                continue
            parts = PurePosixPath(m.name).parts
            if len(parts) >= 4 and parts[-3] not in ("train", "test"):
                parts = parts[-3:]
            if len(parts) != 3 or parts[0] not in ("train", "test"):
                continue
            f = tf.extractfile(m)
            assert f is not None
            path = "/".join(parts)
            data[path] = f.read()
            rows.append((path, parts[1], parts[0]))
    if not rows:
        raise SystemExit(f"{archive}: no images under train/<class>/ or test/<class>/")
    rows.sort()
    return rows, data


def select(rows, imbalance: float, subset: int | None, test_images: int, seed: int = 0):
    """The long-tailed training rows (optionally a seeded subset of them) and a balanced test sample."""
    import pandas as pd

    from finetail.longtail import longtail_subset

    df = pd.DataFrame(rows, columns=["path", "class_name", "split"])
    classes = sorted(df["class_name"].unique())
    df["label"] = df["class_name"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)
    lt = longtail_subset(df, imbalance, "exp", seed=seed)
    train = lt[lt["split"] == "train"]
    n_lt = len(train)
    if subset is not None and subset < len(train):
        keep = np.sort(np.random.default_rng(seed).permutation(len(train))[:subset])
        train = train.iloc[keep]
    test = df[df["split"] == "test"]
    per_class = max(1, test_images // len(classes))
    test = test.groupby("label", group_keys=False).head(per_class)
    return train, test, classes, n_lt


def decode(paths, data: dict[str, bytes]):
    """PIL images (loaded, RGB) and the same pixels as a uint8 ``N x H x W x 3`` array."""
    from PIL import Image

    pil = []
    for p in paths:
        im = Image.open(io.BytesIO(data[p])).convert("RGB")
        im.load()
        pil.append(im)
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in pil])
    return pil, arr


def device_name(dev) -> str:
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine()


def steady(values: list[float]) -> float:
    """The median of epochs 2..N (the first epoch is warm-up)."""
    return float(statistics.median(values[1:] if len(values) > 1 else values))


def run_pipeline(a, dev, pil_images, labels, mean, std, log) -> dict:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from finetail.models import build_model

    class PILDataset(Dataset):
        def __init__(self, images, targets, transform):
            self.images, self.targets, self.transform = images, targets, transform

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.transform(self.images[i]), int(self.targets[i])

    tf = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([m / 255 for m in mean], [s / 255 for s in std]),
        ]
    )
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    loader = DataLoader(
        PILDataset(pil_images, labels, tf),
        batch_size=a.batch_size,
        shuffle=True,
        num_workers=a.workers,
        pin_memory=cuda,
        drop_last=False,
    )
    model = build_model("resnet32", 10).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    loss_fn = nn.CrossEntropyLoss()
    n = len(pil_images)
    per_epoch, losses = [], []
    t_all = time.perf_counter()
    for epoch in range(a.epochs):
        model.train()
        t0 = time.perf_counter()
        total = torch.zeros((), device=dev)
        for xb, yb in loader:
            xb = xb.to(dev, non_blocking=cuda)
            yb = yb.to(dev, non_blocking=cuda)
            out = model(xb)
            loss = loss_fn(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(yb)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        per_epoch.append(n / dt)
        losses.append(float(total) / n)
        log(f"pipeline epoch {epoch + 1}/{a.epochs}: loss {losses[-1]:.4f} {per_epoch[-1]:.0f} img/s ({dt:.1f} s)")
    return {
        "images_per_s": steady(per_epoch),
        "epochs_images_per_s": [round(v, 1) for v in per_epoch],
        "train_loss": losses,
        "wall_s": round(time.perf_counter() - t_all, 2),
        "workers": a.workers,
        "precision": "fp32",
    }


def run_engine(a, dev, train_x, train_y, test_x, test_y, log) -> dict:
    from finetail.training.loop import train
    from finetail.training.recipe import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = dict(model="resnet32", width=16, epochs=a.epochs, batch_size=a.batch_size, lr=0.1, momentum=0.9,
              weight_decay=2e-4, loss="softmax", eval_every=a.epochs, seed=0)
    compile_state = "off"
    if a.compile:
        if "compile" in names:
            kw["compile"] = True
            compile_state = "on"
        else:
            compile_state = "requested, but TrainConfig has no 'compile' field: ran without"
            log(f"warning: --compile {compile_state}")
    if a.cuda_graphs and kw.get("compile"):
        if "cuda_graphs" in names:
            kw["cuda_graphs"] = True
            compile_state += ", CUDA graphs" + ("" if dev.type == "cuda" else " (ignored off CUDA)")
        else:
            log("warning: --cuda-graphs requested, but TrainConfig has no 'cuda_graphs' field: ran without")
    cfg = TrainConfig(**kw)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="finetail-bench-") as tmp:
        res = train(cfg, train_x, train_y, test_x, test_y, 10, Path(tmp) / "last.pt", device=str(dev),
                    log=lambda m: log(f"engine {m}"))
    wall = time.perf_counter() - t0
    per_epoch = [float(h["images_per_s"]) for h in res.history]
    return {
        "images_per_s": steady(per_epoch),
        "epochs_images_per_s": [round(v, 1) for v in per_epoch],
        "train_loss": [h["train_loss"] for h in res.history],
        "wall_s": round(wall, 2),
        "precision": "bf16 autocast" if dev.type == "cuda" and cfg.amp else "fp32",
        "channels_last": bool(dev.type == "cuda" and cfg.channels_last),
        "compile": compile_state,
    }


def targets(device_type: str, engine: float, pipeline: float) -> list[dict]:
    ratio = engine / pipeline
    if device_type == "cuda":
        return [
            {"target": f"engine >= {CUDA_TARGET_RATIO:g}x pipeline", "value": round(ratio, 2),
             "met": ratio >= CUDA_TARGET_RATIO},
            {"target": f"engine >= {CUDA_TARGET_IMAGES_PER_S:,.0f} images/s", "value": round(engine, 1),
             "met": engine >= CUDA_TARGET_IMAGES_PER_S},
        ]
    return [{"target": "engine not slower than pipeline (ratio >= 1)", "value": round(ratio, 2),
             "met": ratio >= CPU_TARGET_RATIO}]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", default=str(DEFAULT_ARCHIVE), help="ImageFolder archive of CIFAR-10 JPEGs")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each; the first is warm-up (>= 2)")
    ap.add_argument("--subset", type=int, default=None, help="train on only N of the long-tailed images")
    ap.add_argument("--imbalance", type=float, default=100.0)
    ap.add_argument("--test-images", type=int, default=1000, help="test images for the engine's final evaluation")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of this process")
    ap.add_argument("--compile", action="store_true", help="TrainConfig(compile=True), if the engine has it")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="with --compile: TrainConfig(cuda_graphs=True) (mode reduce-overhead on CUDA), if the engine has it")
    ap.add_argument("--only", choices=["both", "engine", "pipeline"], default="both", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "pipeline.json"))
    a = ap.parse_args(argv)
    if a.epochs < 2:
        ap.error("--epochs must be >= 2 (the first epoch is warm-up and is not counted)")

    import torch

    sys.path.insert(0, str(ROOT / "src"))  # a checkout without an installed finetail
    torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)

    def log(msg: str) -> None:
        print(msg, flush=True)

    archive = Path(a.archive)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows, data = read_archive(archive)
    train, test, classes, n_lt = select(rows, a.imbalance, a.subset, a.test_images)
    pil_train, train_x = decode(train["path"].tolist(), data)
    _, test_x = decode(test["path"].tolist(), data)
    del data
    train_y = train["label"].to_numpy()
    test_y = test["label"].to_numpy()
    prep_s = time.perf_counter() - t0
    mean = train_x.reshape(-1, 3).mean(0).tolist()
    std = train_x.reshape(-1, 3).std(0).tolist()
    counts = np.bincount(train_y, minlength=len(classes)).tolist()
    log(f"data: {archive} -> {len(train_y)} training images (long-tailed IF {a.imbalance:g}: {n_lt}; "
        f"per class {counts}), {len(test_y)} test images, decoded in {prep_s:.1f} s")
    log(f"device {dev} ({device_name(dev)}), torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{a.threads} torch threads, {a.workers} DataLoader workers, batch {a.batch_size}, {a.epochs} epochs each")

    result: dict = {}
    if a.only in ("both", "pipeline"):
        result["pipeline"] = run_pipeline(a, dev, pil_train, train_y, mean, std, log)
    if a.only in ("both", "engine"):
        result["engine"] = run_engine(a, dev, train_x, train_y, test_x, test_y, log)

    import torchvision

    record = {
        "device": dev.type,
        "device_name": device_name(dev),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": a.threads,
        # other processes on the machine skew the figures: the 1-minute load average before and after
        "loadavg_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "batch_size": a.batch_size,
        "epochs": a.epochs,
        "measured": "median images/s of epochs 2..N (epoch 1 is warm-up)",
        "train_images": int(len(train_y)),
        "longtail_images": int(n_lt),
        "imbalance": a.imbalance,
        "profile": "exp",
        "class_counts": counts,
        "archive": str(archive),
        **result,
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else argv)),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if "engine" in result and "pipeline" in result:
        e, p = result["engine"]["images_per_s"], result["pipeline"]["images_per_s"]
        record["ratio"] = round(e / p, 3)
        record["targets"] = targets(dev.type, e, p)

    print()
    print(f"{'':10s} {'images/s':>10s}   per epoch (first = warm-up)        wall s")
    for name in ("pipeline", "engine"):
        if name in result:
            r = result[name]
            eps = ", ".join(f"{v:.0f}" for v in r["epochs_images_per_s"])
            print(f"{name:10s} {r['images_per_s']:10.1f}   {eps:34s} {r['wall_s']:7.1f}")
    if "ratio" in record:
        print(f"{'ratio':10s} {record['ratio']:10.2f}   engine / pipeline")
        for t in record["targets"]:
            print(f"target on {dev.type}: {t['target']}: {t['value']} -> {'MET' if t['met'] else 'NOT MET'}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
