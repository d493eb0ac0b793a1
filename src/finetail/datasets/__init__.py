"""Real datasets: downloads, checksums, parsers and image stores.

``prepare(name, resources_dir, out_dir)`` turns any registered dataset into
``out_dir/manifest.parquet`` (see :mod:`finetail.manifest` for the contract):

>>> from finetail.datasets import prepare                         # doctest: +SKIP
>>> prepare("cub200", "resources", "results/real/datasets/cub200")  # doctest: +SKIP

Registered: cifar10, cifar100, imagenet (manual), inat2017, inat2017_cvpr18 (manual minival
list), cub200, stanford_dogs, flowers102, stanford_cars, fgvc_aircraft, food101, nabirds
(manual). A user's own ``train/<class>/`` + ``test/<class>/`` tree or CSV goes through
:func:`prepare_imagefolder`.
"""

from .download import (
    ArchiveError,
    ChecksumError,
    DownloadError,
    ManualDownloadRequired,
    UnsafeArchiveError,
    download,
    safe_extract,
    verify,
)
from .parsers import parse_imagefolder as imagefolder
from .pipeline import fetch, prepare, prepare_imagefolder
from .registry import REGISTRY, DatasetEntry, RemoteFile, get, names
from .store import BadImageError, BadImageWarning, check_image_files, pre_resize, to_array_store

__all__ = [
    "REGISTRY",
    "ArchiveError",
    "BadImageError",
    "BadImageWarning",
    "ChecksumError",
    "DatasetEntry",
    "DownloadError",
    "ManualDownloadRequired",
    "RemoteFile",
    "UnsafeArchiveError",
    "check_image_files",
    "download",
    "fetch",
    "get",
    "imagefolder",
    "names",
    "pre_resize",
    "prepare",
    "prepare_imagefolder",
    "safe_extract",
    "to_array_store",
    "verify",
]
