"""The dataset registry: where each dataset of the papers comes from and how to read it.

One frozen :class:`DatasetEntry` per dataset: its files (URL, file name, checksum, size),
licence note, homepage, whether it must be fetched by hand (``manual``), its ``kind``
(``"array"``: small images decoded once into a uint8 array store; ``"files"``: large images
read from disk) and its parser (see :mod:`finetail.datasets.parsers`).

Checksums are filled in only where they are known with confidence, each with its source:

==================  ============================================  ====================================
file                md5                                           source
==================  ============================================  ====================================
cifar-10-python     c58f30108f718f92721af3b95e74349a              torchvision ``CIFAR10.tgz_md5``
cifar-100-python    eb9058c3a382ffc7106e4002c42a8d85              torchvision ``CIFAR100.tgz_md5``
CUB_200_2011.tgz    97eceeb196236b17998738112f37df78              widely used CUB loaders (Avalanche and
                                                                  others; not in torchvision)
food-101.tar.gz     85eeb15f3717b99a5da872d97d918f87              torchvision ``Food101._MD5``
102flowers.tgz      52808999861908f626f3c1f4e79d11fa              torchvision ``Flowers102._file_dict``
imagelabels.mat     e0620be6f572b9609742df49c70aed4d              torchvision ``Flowers102._file_dict``
setid.mat           a5357ecc9cb78c4bef273ce3793fc85c              torchvision ``Flowers102._file_dict``
ILSVRC2012 train    1d675b47d978889d74fa0da5fadfb00e              torchvision ``imagenet.ARCHIVE_META``
ILSVRC2012 val      29b22e2961454d5413ddabcf34fc5622              torchvision ``imagenet.ARCHIVE_META``
ILSVRC2012 devkit   fa75699e90414af021442c21a62c3abf              torchvision ``imagenet.ARCHIVE_META``
train_val_images    7c784ea5e424efaec655bd392f87301f              torchvision ``inaturalist.DATASET_MD5``
train_val2017.zip   444c835f6459867ad69fcb36478786e7              public iNat2017 loaders (two
                                                                  independent repositories agree)
==================  ============================================  ====================================

Left ``None`` (verification is then existence only; a ``size`` is not invented either):
Stanford Dogs (``images.tar``, ``lists.tar``), Stanford Cars (the original host is offline;
torchvision dropped its download), FGVC-Aircraft (torchvision downloads it without a
checksum) and NABirds (manual; no published checksum). Pin them for your copy with
:meth:`DatasetEntry.with_checksums`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

from . import parsers
from .download import archive_kind
from .parsers import archive_folder

__all__ = [
    "DatasetEntry",
    "RemoteFile",
    "REGISTRY",
    "get",
    "names",
    "rebase_url",
]


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset.

    Attributes
    ----------
    url : str
        Direct download URL; for a manual file, the official page to get it from.
    filename : str
        Name under ``resources/<dataset>/``.
    sha256, md5 : str or None
        Expected digest, where known.
    size : int or None
        Expected size in bytes, where known.
    """

    url: str
    filename: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None

    @property
    def archive(self) -> str | None:
        """``"tar"``, ``"zip"`` or None (a plain file, used where it lies)."""
        return archive_kind(self.filename)

    @property
    def folder(self) -> str:
        """The folder under ``resources/<dataset>/`` the archive is extracted into."""
        return archive_folder(self.filename)


@dataclass(frozen=True)
class DatasetEntry:
    """How to fetch and read one dataset.

    Attributes
    ----------
    name : str
        Registry key; also the folder under ``resources/``.
    files : tuple of RemoteFile
        What to download (or place by hand).
    parse : callable
        ``parse(raw_dir) -> DataFrame`` (see :mod:`finetail.datasets.parsers`).
    kind : {"array", "files"}
        ``"array"``: decode into a uint8 array store; ``"files"``: keep image files.
    homepage, license : str
        Official page and licence / terms-of-use note.
    manual : bool
        Files sit behind a login or a form: the user places them in ``resources/<name>/``.
    splits : str
        What the manifest's splits are, and why.
    post_extract : callable or None
        ``post_extract(raw_dir)`` after all archives are extracted (ImageNet's inner tars).
    ready : tuple of str
        Paths under ``resources/<name>/`` that, when all present, mean the user placed an
        already-extracted copy: downloading and extraction are skipped.
    """

    name: str
    files: tuple[RemoteFile, ...]
    parse: Callable[[Path], pd.DataFrame] = field(repr=False, compare=False)
    kind: str = "files"
    homepage: str = ""
    license: str = ""
    manual: bool = False
    splits: str = ""
    post_extract: Callable[[Path], None] | None = field(default=None, repr=False, compare=False)
    ready: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("array", "files"):
            raise ValueError(f"{self.name}: kind must be 'array' or 'files', got {self.kind!r}")

    def with_checksums(self, checksums: dict[str, dict]) -> "DatasetEntry":
        """A copy with some files' ``sha256``/``md5``/``size`` (or ``url``) replaced.

        Parameters
        ----------
        checksums : dict
            ``{filename: {"sha256": ..., "md5": ..., "size": ...}}``.
        """
        unknown = set(checksums) - {f.filename for f in self.files}
        if unknown:
            raise ValueError(f"{self.name} has no files {sorted(unknown)}")
        files = tuple(dataclasses.replace(f, **checksums.get(f.filename, {})) for f in self.files)
        return dataclasses.replace(self, files=files)


def rebase_url(url: str, base_url: str | None) -> str:
    """Replace the scheme and host of ``url`` by those of ``base_url`` (keeping the path)."""
    if not base_url:
        return url
    b = urlsplit(base_url)
    u = urlsplit(url)
    return urlunsplit((b.scheme, b.netloc, b.path.rstrip("/") + u.path, u.query, ""))


def _unpack_imagenet_train(raw_dir: Path) -> None:
    """ILSVRC2012_img_train.tar holds one tar per class: unpack each into its wnid folder."""
    from .download import safe_extract

    train = Path(raw_dir) / "ILSVRC2012_img_train"
    if not train.is_dir():
        return
    for inner in sorted(train.glob("n*.tar")):
        safe_extract(inner, train / inner.name[: -len(".tar")])
        inner.unlink()


_TV = "torchvision"
_IMAGENET_PAGE = "https://image-net.org/challenges/LSVRC/2012/2012-downloads.php"
_NABIRDS_PAGE = "https://dl.allaboutbirds.org/nabirds"

_ENTRIES = (
    DatasetEntry(
        name="cifar10",
        files=(RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a"),),
        parse=parsers.parse_cifar10,
        kind="array",
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        license="No explicit licence; cite Krizhevsky (2009).",
        splits="official: 50,000 train (data_batch_1..5), 10,000 test (test_batch)",
    ),
    DatasetEntry(
        name="cifar100",
        files=(RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85"),),
        parse=parsers.parse_cifar100,
        kind="array",
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        license="No explicit licence; cite Krizhevsky (2009).",
        splits="official: 50,000 train, 10,000 test; the 100 fine labels",
    ),
    DatasetEntry(
        name="imagenet",
        files=(
            RemoteFile(_IMAGENET_PAGE, "ILSVRC2012_img_train.tar", md5="1d675b47d978889d74fa0da5fadfb00e"),
            RemoteFile(_IMAGENET_PAGE, "ILSVRC2012_img_val.tar", md5="29b22e2961454d5413ddabcf34fc5622"),
            RemoteFile(_IMAGENET_PAGE, "ILSVRC2012_devkit_t12.tar.gz", md5="fa75699e90414af021442c21a62c3abf"),
        ),
        parse=parsers.parse_imagenet,
        homepage="https://image-net.org/",
        license="ImageNet terms of access: non-commercial research and education only; needs an account.",
        manual=True,
        splits="train (1,281,167) -> train; the official val (50,000) -> test, as in the papers",
        post_extract=_unpack_imagenet_train,
        ready=("train", "val"),
    ),
    DatasetEntry(
        name="inat2017",
        files=(
            RemoteFile("https://ml-inat-competition-datasets.s3.amazonaws.com/2017/train_val_images.tar.gz", "train_val_images.tar.gz", md5="7c784ea5e424efaec655bd392f87301f"),
            RemoteFile("https://ml-inat-competition-datasets.s3.amazonaws.com/2017/train_val2017.zip", "train_val2017.zip", md5="444c835f6459867ad69fcb36478786e7"),
        ),
        parse=parsers.parse_inat2017,
        homepage="https://github.com/visipedia/inat_comp/tree/master/2017",
        license="Images under their owners' Creative Commons licences; see the competition page.",
        splits="official: train2017.json (579,184) -> train, val2017.json (95,986) -> test",
    ),
    DatasetEntry(
        name="inat2017_cvpr18",
        files=(
            RemoteFile("https://ml-inat-competition-datasets.s3.amazonaws.com/2017/train_val_images.tar.gz", "train_val_images.tar.gz", md5="7c784ea5e424efaec655bd392f87301f"),
            RemoteFile("https://ml-inat-competition-datasets.s3.amazonaws.com/2017/train_val2017.zip", "train_val2017.zip", md5="444c835f6459867ad69fcb36478786e7"),
            RemoteFile("https://github.com/richardaecn/cvpr18-inaturalist-transfer", "minival2017.txt"),
        ),
        parse=parsers.parse_inat2017_cvpr18,
        homepage="https://github.com/richardaecn/cvpr18-inaturalist-transfer",
        license="As inat2017.",
        manual=True,  # the minival list is placed by hand; the archives may be copied from resources/inat2017/
        splits="Cui et al. CVPR 2018: train + (val - minival) -> train, minival -> test",
    ),
    DatasetEntry(
        name="cub200",
        files=(RemoteFile("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz", "CUB_200_2011.tgz", md5="97eceeb196236b17998738112f37df78"),),
        parse=parsers.parse_cub200,
        homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/",
        license="Research use; images from Flickr under their owners' terms.",
        splits="official train_test_split.txt: 5,994 train, 5,794 test",
    ),
    DatasetEntry(
        name="stanford_dogs",
        files=(
            RemoteFile("http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar", "images.tar"),
            RemoteFile("http://vision.stanford.edu/aditya86/ImageNetDogs/lists.tar", "lists.tar"),
        ),
        parse=parsers.parse_stanford_dogs,
        homepage="http://vision.stanford.edu/aditya86/ImageNetDogs/",
        license="Images from ImageNet: ImageNet terms of access apply.",
        splits="official lists/train_list.mat (12,000) and test_list.mat (8,580)",
    ),
    DatasetEntry(
        name="flowers102",
        files=(
            RemoteFile("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz", "102flowers.tgz", md5="52808999861908f626f3c1f4e79d11fa"),
            RemoteFile("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat", "imagelabels.mat", md5="e0620be6f572b9609742df49c70aed4d"),
            RemoteFile("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/setid.mat", "setid.mat", md5="a5357ecc9cb78c4bef273ce3793fc85c"),
        ),
        parse=parsers.parse_flowers102,
        homepage="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
        license="Research use; cite Nilsback & Zisserman (2008).",
        splits="setid.mat trnid + valid -> train (2,040, as in the CVPR 2018 paper), tstid -> test (6,149)",
    ),
    DatasetEntry(
        name="stanford_cars",
        files=(
            RemoteFile("https://ai.stanford.edu/~jkrause/car196/cars_train.tgz", "cars_train.tgz"),
            RemoteFile("https://ai.stanford.edu/~jkrause/car196/cars_test.tgz", "cars_test.tgz"),
            RemoteFile("https://ai.stanford.edu/~jkrause/cars/car_devkit.tgz", "car_devkit.tgz"),
            RemoteFile("https://ai.stanford.edu/~jkrause/car196/cars_test_annos_withlabels.mat", "cars_test_annos_withlabels.mat"),
        ),
        parse=parsers.parse_stanford_cars,
        homepage="https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
        license="Research use (ImageNet-style terms). The original host is offline: place the four files in resources/stanford_cars/ by hand (or car_ims/ + cars_annos.mat).",
        splits="official: cars_train (8,144) -> train, cars_test (8,041, labels from cars_test_annos_withlabels.mat) -> test",
        ready=("cars_annos.mat", "car_ims"),
    ),
    DatasetEntry(
        name="fgvc_aircraft",
        files=(RemoteFile("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz", "fgvc-aircraft-2013b.tar.gz"),),
        parse=parsers.parse_fgvc_aircraft,
        homepage="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
        license="Non-commercial research only (images by Airliners.net photographers).",
        splits="100 variants; images_variant_trainval.txt -> train (6,667), images_variant_test.txt -> test (3,333)",
    ),
    DatasetEntry(
        name="food101",
        files=(RemoteFile("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", "food-101.tar.gz", md5="85eeb15f3717b99a5da872d97d918f87"),),
        parse=parsers.parse_food101,
        homepage="https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
        license="Images from foodspotting.com under their terms; research use.",
        splits="official meta/train.txt (75,750) and meta/test.txt (25,250)",
    ),
    DatasetEntry(
        name="nabirds",
        files=(RemoteFile(_NABIRDS_PAGE, "nabirds.tar.gz"),),
        parse=parsers.parse_nabirds,
        homepage="https://dl.allaboutbirds.org/nabirds",
        license="Cornell Lab of Ornithology terms: non-commercial research; download after accepting them.",
        manual=True,
        splits="official train_test_split.txt: 23,929 train, 24,633 test (555 leaf classes)",
    ),
)

REGISTRY: dict[str, DatasetEntry] = {e.name: e for e in _ENTRIES}


def names() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(REGISTRY)


def get(name: str) -> DatasetEntry:
    """The registry entry for ``name``.

    Raises
    ------
    ValueError
        An unknown name (the message lists the known ones).
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(names())} (or use prepare_imagefolder for your own data)") from None
