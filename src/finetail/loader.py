"""Large images from a file manifest: JPEG files -> augmented uint8 batches on the device.

A file manifest has a ``path`` column (image files relative to the manifest's folder; see
:mod:`finetail.manifest`). Training images get ``RandomResizedCrop(size)`` (scale 0.08-1,
aspect 3/4-4/3, torchvision's algorithm) and a horizontal flip; test images are resized to a
short side of ``size / 0.875`` (256 for 224) and centre-cropped to ``size``. Batches reach
the device as uint8 ``(B, 3, size, size)``; the engine fuses normalisation as for arrays.
The feature stage (:mod:`finetail.features`) reads test-style batches with its own crop
(fraction, and ``central``: the crop of Cui et al.'s TF-slim code).

Workers of a ``DataLoader`` read the files. On the CPU they decode (``decode_jpeg``,
``decode_image`` for PNG, Pillow for other formats) and transform; when the device is CUDA
they send the JPEG bytes, which the main process decodes on the GPU in one batched
``decode_jpeg`` call and transforms there (other formats are decoded in the workers and
transformed on the GPU). 16-bit images become 8-bit by their high byte (``v >> 8``), as in
the array store.

Every random draw for image ``i`` in epoch ``e`` comes from a generator seeded by
``(seed, e, i)``, and the order of epoch ``e`` from a permutation seeded by ``(seed, e)``
(the same as the array path's), so batches do not depend on the number of workers, the
world size, or where a resumed epoch restarts: a mid-epoch resume replays exactly.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .manifest import read_manifest, split_rows
from .models import IMAGENET_NORMALISATION  # the file path's default normalisation

# torchvision is imported where images are decoded or transformed, not here: importing it
# takes ~3 s of CPU (torchvision.ops pulls in torch._dynamo), which every training job on
# array images (the generated world, the long-tail grid) would otherwise pay at start-up.

__all__ = [
    "EVAL_CROPS",
    "IMAGENET_NORMALISATION",
    "FileSplit",
    "ImageFiles",
    "TrainBatches",
    "check_crop",
    "default_workers",
    "eval_batches",
    "eval_transform",
    "load_file_split",
    "resized_crop_box",
    "train_transform",
]

PREFETCH_FACTOR = 4  # batches each worker keeps ready
TEST_CROP_FRACTION = 0.875  # test images: short side size / 0.875, then the centre size x size
EVAL_CROPS = ("short_side", "central")  # eval_transform's crops


@dataclass
class ImageFiles:
    """The image files of one split, absolute paths in manifest order."""

    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class FileSplit:
    """One split of a file manifest (the file counterpart of ``manifest.ArraySplit``)."""

    images: ImageFiles
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]  # all C classes of the manifest, by label


def load_file_split(manifest_path: str | Path, split: str) -> FileSplit:
    """The files and labels of one split of a file manifest."""
    manifest_path = Path(manifest_path)
    df = read_manifest(manifest_path)
    if "path" not in df.columns:
        raise ValueError(f"{manifest_path} has no 'path' column: not a file manifest")
    if "row" in df.columns and df["row"].notna().any():
        raise ValueError(f"{manifest_path} points into pickled CIFAR batches: prepare it with store: array")
    part, class_names = split_rows(df, split, manifest_path)
    base = manifest_path.parent
    paths = [str(base / p) for p in part["path"]]
    return FileSplit(ImageFiles(paths), part["label"].to_numpy().astype(np.int64), class_names)


def default_workers() -> int:
    """Loader processes per rank: the CPUs this process may use, shared among the node's
    ranks (``LOCAL_WORLD_SIZE``), at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def resized_crop_box(
    h: int, w: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random crop covering ``scale`` of the area with
    aspect ratio in ``ratio`` (torchvision's RandomResizedCrop: 10 tries, then a centre crop)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    if w / h < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif w / h > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def train_transform(img: torch.Tensor, box: tuple[int, int, int, int], flip: bool, size: int) -> torch.Tensor:
    """Crop ``box`` of uint8 ``(3, H, W)``, resize to ``size x size`` (antialiased), maybe flip."""
    from torchvision.transforms.v2 import functional as TF

    out = TF.resized_crop(img, *box, size=[size, size], antialias=True)
    return out.flip(-1) if flip else out


def eval_transform(img: torch.Tensor, size: int, crop_fraction: float = TEST_CROP_FRACTION,
                   crop: str = "short_side") -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` (one image or a batch) to ``(..., 3, size, size)``.

    ``short_side`` (the test crop; torchvision's ImageNet evaluation): resize the short side to
    ``round(size / crop_fraction)``, then take the centre ``size x size``. ``central`` (Cui et
    al.'s TF-slim ``inception_preprocessing.preprocess_for_eval``): keep the central
    ``crop_fraction`` of the height and of the width (``tf.image.central_crop``'s bounds), then
    resize that to ``size x size`` (bilinear; here antialiased, TF 1's ``resize_bilinear`` is
    not). With ``crop_fraction`` 1, ``central`` resizes the whole image.
    """
    from torchvision.transforms.v2 import functional as TF

    check_crop(crop_fraction, crop)
    if crop == "short_side":
        out = TF.resize(img, round(size / crop_fraction), antialias=True)
        return TF.center_crop(out, [size, size])
    h, w = img.shape[-2:]
    top, left = int((h - h * crop_fraction) / 2), int((w - w * crop_fraction) / 2)
    return TF.resize(img[..., top : h - top, left : w - left], [size, size], antialias=True)


def check_crop(crop_fraction: float, crop: str) -> None:
    """Raise ValueError unless ``crop`` is one of :data:`EVAL_CROPS` and ``0 < crop_fraction <= 1``."""
    if crop not in EVAL_CROPS:
        raise ValueError(f"crop must be one of {EVAL_CROPS}, got {crop!r}")
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")


def _is_jpeg(data: torch.Tensor) -> bool:
    return len(data) > 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8


def _to_uint8(img: torch.Tensor) -> torch.Tensor:
    """16-bit images (torchvision decodes 16-bit PNGs to uint16) to 8 bits by their high
    byte, ``v >> 8`` (20000 -> 78), as the array store does."""
    if img.dtype == torch.uint8:
        return img
    if img.dtype != torch.uint16:
        raise TypeError(f"decoded image has dtype {img.dtype}, expected uint8 or uint16")
    return (img.to(torch.int32) >> 8).to(torch.uint8)


_PNG = b"\x89PNG\r\n\x1a\n"


def _torchvision_decode(data: torch.Tensor) -> torch.Tensor | None:
    """uint8 ``(3, H, W)`` of a JPEG or PNG; None for other formats and for the files
    torchvision's decoders refuse (Pillow reads some of those)."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    try:
        if _is_jpeg(data):
            return decode_jpeg(data, mode=ImageReadMode.RGB)
        if data[: len(_PNG)].numpy().tobytes() == _PNG:
            return _to_uint8(decode_image(data, mode=ImageReadMode.RGB))
    except RuntimeError:
        return None
    return None


def _decode(data: torch.Tensor, path: str = "<bytes>") -> torch.Tensor:
    """uint8 ``(3, H, W)``: JPEG and PNG through torchvision; any other format Pillow reads
    (BMP, TIFF, ...) through the array store's decoder, which scales 16-bit images as here
    and raises a one-line BadImageError naming ``path`` for a file that is not a readable
    image."""
    img = _torchvision_decode(data)
    if img is not None:
        return img
    from .datasets.store import decode_image as decode_with_pillow

    return torch.from_numpy(decode_with_pillow(data.numpy().tobytes(), path)).permute(2, 0, 1).contiguous()


def _jpeg_size(data: torch.Tensor) -> tuple[int, int]:
    """(height, width) from a JPEG's header, without decoding it."""
    from PIL import Image

    with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
        return im.height, im.width


class _Images(torch.utils.data.Dataset):
    """Items are ``(payload, params, label)``: ``payload`` the transformed image, or (when
    ``defer``) the JPEG bytes / decoded image for the main process to finish on the GPU;
    ``params`` = ``(top, left, height, width, flip)`` for training, empty for test images.
    Training keys are ``(index, epoch)``, or ``(index, epoch, position in the epoch)`` when an
    image may recur within an epoch (a resampling sampler)."""

    def __init__(self, files: ImageFiles, labels: np.ndarray, size: int, train: bool, seed: int, flip: bool,
                 defer: bool, crop: tuple[float, str] = (TEST_CROP_FRACTION, "short_side")) -> None:
        self.paths, self.labels = files.paths, labels
        self.size, self.train, self.seed, self.flip, self.defer = size, train, seed, flip, defer
        self.crop = crop  # test images: (crop_fraction, crop) of eval_transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        from torchvision.io import read_file

        i, epoch, *draw = key if self.train else (key, None)
        data = read_file(self.paths[i])
        payload = data if self.defer and _is_jpeg(data) else _decode(data, self.paths[i])
        params = torch.zeros(0, dtype=torch.int64)
        if self.train:
            h, w = _jpeg_size(data) if payload.ndim == 1 else payload.shape[-2:]
            rng = np.random.default_rng([self.seed, epoch, i, *draw])
            box = resized_crop_box(int(h), int(w), rng)
            flip = bool(self.flip and rng.random() < 0.5)
            params = torch.tensor([*box, int(flip)])
        if not self.defer:
            payload = train_transform(payload, tuple(params[:4].tolist()), bool(params[4]), self.size) \
                if self.train else eval_transform(payload, self.size, *self.crop)
        return payload, params, int(self.labels[i])


def _collate(items):
    payloads, params, labels = zip(*items, strict=True)
    return list(payloads), torch.stack(params), torch.tensor(labels, dtype=torch.int64)


def _finish(payloads: list[torch.Tensor], params: torch.Tensor, size: int, train: bool, device: torch.device,
            defer: bool, crop: tuple[float, str] = (TEST_CROP_FRACTION, "short_side")) -> torch.Tensor:
    """The batch as uint8 ``(B, 3, size, size)`` on ``device`` (decoding JPEG bytes there)."""
    if not defer:
        return torch.stack(payloads).to(device, non_blocking=True)
    jpegs = [k for k, p in enumerate(payloads) if p.ndim == 1]
    images = [p.to(device, non_blocking=True) if p.ndim == 3 else None for p in payloads]
    if jpegs:
        from torchvision.io import ImageReadMode, decode_jpeg

        decoded = decode_jpeg([payloads[k] for k in jpegs], mode=ImageReadMode.RGB, device=device)
        for k, img in zip(jpegs, decoded, strict=True):
            images[k] = img
    if train:
        rows = params.tolist()
        out = [train_transform(img, tuple(r[:4]), bool(r[4]), size) for img, r in zip(images, rows, strict=True)]
    else:
        out = [eval_transform(img, size, *crop) for img in images]
    return torch.stack(out)


def _ignore_sigterm(_worker_id: int) -> None:
    """Loader workers leave SIGTERM to the training process (Slurm signals every process of
    the job): a worker dying first would abort the step that the trainer checkpoints."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _loader(dataset, device: torch.device, workers: int, **kwargs) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_ignore_sigterm if workers > 0 else None,
        pin_memory=device.type == "cuda",
        prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
        **kwargs,
    )


class _GlobalBatches(torch.utils.data.Sampler):
    """This rank's slice of each global batch of epoch ``e``'s order, from step ``first`` on;
    the order is the array path's (:func:`finetail.training.sampling.epoch_order` from a CPU
    generator seeded by ``(seed, e)``). Keys are ``(index, epoch)``; with a resampling
    ``sampler`` (an image may recur within an epoch) ``(index, epoch, position)``, so each
    draw of an image gets augmentation of its own."""

    def __init__(self, labels: np.ndarray, batch_size: int, seed: int, rank: int, world: int,
                 sampler: str = "instance") -> None:
        from .training.sampling import class_quotas

        self.n, self.batch_size, self.seed, self.rank, self.world = len(labels), batch_size, seed, rank, world
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.sampler = sampler
        self.quotas = None if sampler == "instance" else torch.as_tensor(class_quotas(np.bincount(labels), sampler))
        self.steps = distributed.steps_per_epoch(self.n, batch_size, world)
        self.epoch, self.first = 0, 0

    def set_epoch(self, epoch: int, first: int = 0) -> None:
        self.epoch, self.first = epoch, first

    def __len__(self) -> int:
        return self.steps - self.first

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        from .training.sampling import epoch_order

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = epoch_order(self.labels, self.sampler, gen, self.quotas).tolist()
        for it in range(self.first, self.steps):
            lo = it * self.batch_size
            batch = perm[lo : lo + self.batch_size]
            part = distributed.rank_slice(len(batch), self.rank, self.world)
            if self.sampler == "instance":
                yield [(i, self.epoch) for i in batch[part]]
            else:
                yield [(i, self.epoch, lo + part.start + j) for j, i in enumerate(batch[part])]


class TrainBatches:
    """Training batches of a file split for this rank, one epoch at a time.

    Parameters
    ----------
    files, labels : the training split.
    size : output side, pixels. batch_size : global batch (images per step, all ranks).
    seed, flip : the recipe's. device : this rank's. workers : loader processes (0 = in this
    process); kept alive across epochs. sampler : the recipe's (how an epoch is drawn).
    """

    def __init__(self, files: ImageFiles, labels: np.ndarray, *, size: int, batch_size: int, seed: int, flip: bool,
                 device: torch.device, workers: int, sampler: str = "instance") -> None:
        self.size, self.device = size, device
        self.defer = device.type == "cuda"
        self.sampler = _GlobalBatches(labels, batch_size, seed, distributed.rank(), distributed.world_size(), sampler)
        dataset = _Images(files, labels, size, True, seed, flip, self.defer)
        self.loader = _loader(dataset, device, workers, batch_sampler=self.sampler, persistent_workers=workers > 0)

    def epoch(self, epoch: int, first: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images uint8 (b, 3, size, size), labels (b,))`` on the device, for steps
        ``first``.. of ``epoch``."""
        self.sampler.set_epoch(epoch, first)
        for payloads, params, labels in self.loader:
            x = _finish(payloads, params, self.size, True, self.device, self.defer)
            yield x, labels.to(self.device, non_blocking=True)


def eval_batches(files: ImageFiles, labels: np.ndarray, *, size: int, batch_size: int, device: torch.device,
                 workers: int, crop_fraction: float = TEST_CROP_FRACTION,
                 crop: str = "short_side") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Test images in manifest order, resized and centre-cropped (:func:`eval_transform`), as
    uint8 batches on the device."""
    defer = device.type == "cuda"
    check_crop(crop_fraction, crop)
    dataset = _Images(files, labels, size, False, 0, False, defer, (crop_fraction, crop))
    for payloads, params, y in _loader(dataset, device, workers, batch_size=batch_size):
        yield _finish(payloads, params, size, False, device, defer, (crop_fraction, crop)), y.to(device, non_blocking=True)
