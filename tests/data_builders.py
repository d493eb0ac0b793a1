"""Test helpers for finetail.datasets: a local HTTP server and tiny archives in each dataset's real layout.

Each ``build_<dataset>()`` returns ``(blobs, expected)``: ``blobs`` maps the registry's file
names to bytes (archives in the real member layout, real annotation formats), ``expected``
holds the manifest the parser must produce: ``{"train": n, "test": n, "classes": [...]}``.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------- server


class FileServer:
    """Serve in-memory files over HTTP on 127.0.0.1, with Range support and fault injection.

    Attributes
    ----------
    files : dict
        URL path -> bytes.
    requests : list of (path, headers dict)
        Every request received.
    drop_after : dict
        URL path -> N: the next response for that path sends only N bytes, then closes.
    fail : dict
        URL path -> k: the next k requests for that path get HTTP 500.
    ignore_range : bool
        Answer 200 with the whole file even when a Range is asked.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, dict]] = []
        self.drop_after: dict[str, int] = {}
        self.fail: dict[str, int] = {}
        self.ignore_range = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                server.requests.append((path, dict(self.headers)))
                if server.fail.get(path, 0) > 0:
                    server.fail[path] -= 1
                    self.send_error(500, "injected failure")
                    return
                if path not in server.files:
                    self.send_error(404)
                    return
                data = server.files[path]
                start = 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range and rng.startswith("bytes="):
                    start = int(rng[len("bytes=") :].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                cut = server.drop_after.pop(path, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def hits(self, path: str | None = None) -> int:
        return sum(1 for p, _ in self.requests if path is None or p == path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serve_entry(server: FileServer, entry, blobs: dict[str, bytes]):
    """Serve each blob at its registry URL's path; return the entry with the blobs' sha256 pinned."""
    pins = {}
    for f in entry.files:
        server.files[urlsplit(f.url).path] = blobs[f.filename]
        pins[f.filename] = {"sha256": sha256(blobs[f.filename]), "md5": None}
    return entry.with_checksums(pins)


# --------------------------------------------------------------------------- archives


def jpeg(seed: int, size: tuple[int, int] = (8, 6)) -> bytes:
    """A tiny JPEG (width, height) of one random colour."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def make_tar(members: dict[str, bytes], compress: str = "gz", extra=None) -> bytes:
    """A tar (``compress``: "gz" or "" for plain) with directory entries like real archives."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compress}" if compress else "w") as tf:
        dirs = sorted({"/".join(n.split("/")[:k]) for n in members for k in range(1, n.count("/") + 1)})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tf.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
        for info in extra or ():
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buf.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def mat(**arrays) -> bytes:
    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, arrays)
    return buf.getvalue()


def cell(strings) -> np.ndarray:
    c = np.empty((len(strings), 1), dtype=object)
    c[:, 0] = list(strings)
    return c


def struct(rows: list[dict]) -> np.ndarray:
    names = list(rows[0])
    a = np.empty((1, len(rows)), dtype=[(n, "O") for n in names])
    for i, r in enumerate(rows):
        a[0, i] = tuple(r[n] for n in names)
    return a


# --------------------------------------------------------------------------- datasets


def build_cifar10():
    names = ["airplane", "automobile", "bird"]
    rng = np.random.default_rng(0)
    m = {}
    for b in range(1, 6):  # python-2 style pickles: bytes keys
        labels = [0, 1, 2]
        m[f"cifar-10-batches-py/data_batch_{b}"] = pickle.dumps(
            {b"batch_label": b"training batch", b"labels": labels, b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"filenames": [b"a.png"] * 3},
            protocol=2,
        )
    m["cifar-10-batches-py/test_batch"] = pickle.dumps(
        {b"batch_label": b"testing batch", b"labels": [2, 1, 0, 2], b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8)}, protocol=2
    )
    m["cifar-10-batches-py/batches.meta"] = pickle.dumps({"label_names": names, "num_cases_per_batch": 3, "num_vis": 3072}, protocol=2)
    m["cifar-10-batches-py/readme.html"] = b"<html></html>"
    return {"cifar-10-python.tar.gz": make_tar(m)}, {"train": 15, "test": 4, "classes": names}


def build_cifar100():
    fine = ["apple", "aquarium_fish", "baby"]
    rng = np.random.default_rng(1)
    m = {
        "cifar-100-python/train": pickle.dumps(
            {b"fine_labels": [0, 1, 2, 0, 1, 2], b"coarse_labels": [4, 1, 14] * 2, b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8)}, protocol=2
        ),
        "cifar-100-python/test": pickle.dumps({b"fine_labels": [2, 0], b"coarse_labels": [14, 4], b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8)}, protocol=2),
        "cifar-100-python/meta": pickle.dumps({"fine_label_names": fine, "coarse_label_names": ["a", "b", "c"]}, protocol=2),
    }
    return {"cifar-100-python.tar.gz": make_tar(m)}, {"train": 6, "test": 2, "classes": fine}


def build_imagenet():
    # ILSVRC2012_ID 1 is n02119789 and 2 is n02100735: the devkit's order is not the wnid order.
    wnids = {1: "n02119789", 2: "n02100735"}
    train = {}
    for i, w in wnids.items():
        inner = make_tar({f"{w}_{k}.JPEG": jpeg(10 * i + k) for k in range(3)}, compress="")
        train[f"{w}.tar"] = inner
    val_ids = [1, 2, 2, 1, 2]
    val = {f"ILSVRC2012_val_{k + 1:08d}.JPEG": jpeg(100 + k) for k in range(len(val_ids))}
    synsets = struct(
        [
            {"ILSVRC2012_ID": 1, "WNID": wnids[1], "words": "kit fox", "gloss": "", "num_children": 0},
            {"ILSVRC2012_ID": 2, "WNID": wnids[2], "words": "English setter", "gloss": "", "num_children": 0},
            {"ILSVRC2012_ID": 1001, "WNID": "n00001740", "words": "entity", "gloss": "", "num_children": 2},
        ]
    )
    devkit = {
        "ILSVRC2012_devkit_t12/data/meta.mat": mat(synsets=synsets),
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": "".join(f"{i}\n" for i in val_ids).encode(),
        "ILSVRC2012_devkit_t12/readme.txt": b"devkit",
    }
    blobs = {
        "ILSVRC2012_img_train.tar": make_tar(train, compress=""),
        "ILSVRC2012_img_val.tar": make_tar(val, compress=""),
        "ILSVRC2012_devkit_t12.tar.gz": make_tar(devkit),
    }
    return blobs, {"train": 6, "test": 5, "classes": sorted(wnids.values()), "test_counts": {"n02119789": 2, "n02100735": 3}}


def _inat_json(images, cats):
    return {
        "info": {"year": 2017},
        "images": [{"id": i, "file_name": f, "width": 8, "height": 6, "license": 1} for i, f, _ in images],
        "annotations": [{"id": i, "image_id": i, "category_id": c} for i, _, c in images],
        "categories": [{"id": c, "name": n, "supercategory": s} for c, n, s in cats],
        "licenses": [],
    }


def build_inat2017():
    import json

    cats = [(0, "Cardinalis cardinalis", "Aves"), (1, "Danaus plexippus", "Insecta"), (2, "Quercus alba", "Plantae")]
    imgs, train, val = {}, [], []
    n = 0
    for c, name, sup in cats:
        for k in range(4):
            f = f"train_val_images/{sup}/{name}/{n:05x}.jpg"
            imgs[f] = jpeg(200 + n)
            (train if k < 3 else val).append((n, f, c))
            n += 1
    # one more val image for class 0, so minival can take a subset
    f = f"train_val_images/Aves/Cardinalis cardinalis/{n:05x}.jpg"
    imgs[f] = jpeg(200 + n)
    val.append((n, f, 0))
    blobs = {
        "train_val_images.tar.gz": make_tar(imgs),
        "train_val2017.zip": make_zip(
            {"train2017.json": json.dumps(_inat_json(train, cats)).encode(), "val2017.json": json.dumps(_inat_json(val, cats)).encode()}
        ),
    }
    return blobs, {"train": 9, "test": 4, "classes": [c[1] for c in cats], "val_ids": [v[0] for v in val]}


def build_cub200():
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    m, images, labels, split = {}, [], [], []
    n = 1
    for c, name in enumerate(classes, 1):
        for k in range(3):
            rel = f"{name}/{name.split('.', 1)[1]}_{n:04d}_{100 + n}.jpg"
            m[f"CUB_200_2011/images/{rel}"] = jpeg(300 + n)
            images.append(f"{n} {rel}")
            labels.append(f"{n} {c}")
            split.append(f"{n} {1 if k < 2 else 0}")
            n += 1
    txt = lambda lines: ("\n".join(lines) + "\n").encode()
    m["CUB_200_2011/images.txt"] = txt(images)
    m["CUB_200_2011/image_class_labels.txt"] = txt(labels)
    m["CUB_200_2011/train_test_split.txt"] = txt(split)
    m["CUB_200_2011/classes.txt"] = txt(f"{i} {c}" for i, c in enumerate(classes, 1))
    m["CUB_200_2011/bounding_boxes.txt"] = txt(f"{i} 0.0 0.0 8.0 6.0" for i in range(1, n))
    m["attributes.txt"] = b"1 has_bill_shape::curved\n"
    return {"CUB_200_2011.tgz": make_tar(m)}, {"train": 6, "test": 3, "classes": classes}


def build_stanford_dogs():
    classes = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]
    imgs, lists = {}, {"train": ([], []), "test": ([], [])}
    n = 0
    for c, folder in enumerate(classes, 1):
        wnid = folder.split("-")[0]
        for k in range(3):
            rel = f"{folder}/{wnid}_{1000 + n}.jpg"
            imgs[f"Images/{rel}"] = jpeg(400 + n)
            part = "train" if k < 2 else "test"
            lists[part][0].append(rel)
            lists[part][1].append(c)
            n += 1
    lst = {}
    for part, (files, labels) in lists.items():
        lst[f"{part}_list.mat"] = mat(
            file_list=cell(files), annotation_list=cell([f[:-4] for f in files]), labels=np.asarray(labels, dtype=float).reshape(-1, 1)
        )
    allf = lists["train"][0] + lists["test"][0]
    lst["file_list.mat"] = mat(file_list=cell(allf), annotation_list=cell([f[:-4] for f in allf]), labels=np.ones((len(allf), 1)))
    return {"images.tar": make_tar(imgs, compress=""), "lists.tar": make_tar(lst, compress="")}, {"train": 6, "test": 3, "classes": classes}


def build_flowers102():
    labels = np.array([[1, 2, 3, 1, 2, 3, 1, 2, 3, 3]], dtype=np.uint8)  # image_00001 .. image_00010
    setid = mat(trnid=np.array([[1, 2, 3]], dtype=np.uint16), valid=np.array([[4, 5, 6]], dtype=np.uint16), tstid=np.array([[7, 8, 9, 10]], dtype=np.uint16))
    imgs = {f"jpg/image_{i:05d}.jpg": jpeg(500 + i) for i in range(1, 11)}
    blobs = {"102flowers.tgz": make_tar(imgs), "imagelabels.mat": mat(labels=labels), "setid.mat": setid}
    return blobs, {"train": 6, "test": 4, "classes": ["flower_001", "flower_002", "flower_003"]}


def build_stanford_cars():
    classes = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
    train_imgs = {f"cars_train/{i:05d}.jpg": jpeg(600 + i, (10, 6)) for i in range(1, 7)}
    test_imgs = {f"cars_test/{i:05d}.jpg": jpeg(700 + i, (10, 6)) for i in range(1, 4)}
    box = {"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 9, "bbox_y2": 5}
    train_ann = struct([{**box, "class": (i - 1) % 3 + 1, "fname": f"{i:05d}.jpg"} for i in range(1, 7)])
    test_ann = struct([{**box, "class": i, "fname": f"{i:05d}.jpg"} for i in range(1, 4)])
    test_nolabel = struct([{**box, "fname": f"{i:05d}.jpg"} for i in range(1, 4)])
    meta = np.empty((1, 3), dtype=object)
    meta[0, :] = classes
    devkit = {
        "devkit/cars_meta.mat": mat(class_names=meta),
        "devkit/cars_train_annos.mat": mat(annotations=train_ann),
        "devkit/cars_test_annos.mat": mat(annotations=test_nolabel),
        "devkit/README.txt": b"devkit",
    }
    blobs = {
        "cars_train.tgz": make_tar(train_imgs),
        "cars_test.tgz": make_tar(test_imgs),
        "car_devkit.tgz": make_tar(devkit),
        "cars_test_annos_withlabels.mat": mat(annotations=test_ann),
    }
    return blobs, {"train": 6, "test": 3, "classes": classes}


def build_fgvc_aircraft():
    variants = ["707-320", "Cessna 172", "F/A-18"]
    m, trainval, test = {}, [], []
    n = 1025794
    for v in variants:
        for k in range(3):
            m[f"fgvc-aircraft-2013b/data/images/{n}.jpg"] = jpeg(n % 1000, (10, 8))
            (trainval if k < 2 else test).append(f"{n} {v}")
            n += 1
    txt = lambda lines: ("\n".join(lines) + "\n").encode()
    d = "fgvc-aircraft-2013b/data/"
    m[d + "variants.txt"] = txt(variants)
    m[d + "images_variant_trainval.txt"] = txt(trainval)
    m[d + "images_variant_train.txt"] = txt(trainval[::2])
    m[d + "images_variant_val.txt"] = txt(trainval[1::2])
    m[d + "images_variant_test.txt"] = txt(test)
    m[d + "families.txt"] = txt(["Boeing 707", "Cessna 172", "F/A-18"])
    return {"fgvc-aircraft-2013b.tar.gz": make_tar(m)}, {"train": 6, "test": 3, "classes": variants}


def build_food101():
    classes = ["apple_pie", "baby_back_ribs", "baklava"]
    m, train, test = {}, [], []
    n = 1005649
    for c in classes:
        for k in range(3):
            m[f"food-101/images/{c}/{n}.jpg"] = jpeg(n % 1000)
            (train if k < 2 else test).append(f"{c}/{n}")
            n += 1
    txt = lambda lines: ("\n".join(lines) + "\n").encode()
    m["food-101/meta/classes.txt"] = txt(classes)
    m["food-101/meta/labels.txt"] = txt(c.replace("_", " ").title() for c in classes)
    m["food-101/meta/train.txt"] = txt(train)
    m["food-101/meta/test.txt"] = txt(test)
    return {"food-101.tar.gz": make_tar(m)}, {"train": 6, "test": 3, "classes": classes}


def build_nabirds():
    leaves = [(295, "Ruby-crowned Kinglet"), (313, "Blue Jay"), (817, "Rock Pigeon")]
    m, images, labels, split = {}, [], [], []
    n = 0
    for cid, _ in leaves:
        for k in range(3):
            uid = f"{n:08x}-21dc-4d0c-bfe1-4cae3c85c829"
            rel = f"{cid:04d}/{uid.replace('-', '')}.jpg"
            m[f"nabirds/images/{rel}"] = jpeg(800 + n)
            images.append(f"{uid} {rel}")
            labels.append(f"{uid} {cid}")
            split.append(f"{uid} {1 if k < 2 else 0}")
            n += 1
    txt = lambda lines: ("\n".join(lines) + "\n").encode()
    classes = [(0, "Birds"), (1, "Perching Birds"), *leaves]  # the hierarchy's inner nodes have no images
    m["nabirds/images.txt"] = txt(images)
    m["nabirds/image_class_labels.txt"] = txt(labels)
    m["nabirds/train_test_split.txt"] = txt(split)
    m["nabirds/classes.txt"] = txt(f"{i} {name}" for i, name in classes)
    m["nabirds/hierarchy.txt"] = txt(["1 0", "295 1", "313 1", "817 1"])
    return {"nabirds.tar.gz": make_tar(m)}, {"train": 6, "test": 3, "classes": [f"{c:04d}.{n}" for c, n in leaves]}


BUILDERS = {
    "cifar10": build_cifar10,
    "cifar100": build_cifar100,
    "imagenet": build_imagenet,
    "inat2017": build_inat2017,
    "cub200": build_cub200,
    "stanford_dogs": build_stanford_dogs,
    "flowers102": build_flowers102,
    "stanford_cars": build_stanford_cars,
    "fgvc_aircraft": build_fgvc_aircraft,
    "food101": build_food101,
    "nabirds": build_nabirds,
}


# ------------------------------------------------- official byte formats (torchvision cross-checks)
#
# The builders above are what finetail's own parsers read. The ones below follow the official
# archives more closely where an independent reader (torchvision, tests/test_parsers_torchvision.py)
# depends on a detail the builders above leave out: CIFAR's python-2 pickles and Food-101's
# meta/*.json indexes.


class _Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote the official CIFAR batches: every ``str`` (and the
    pixel buffer) is a python-2 ``str`` (SHORT_BINSTRING / BINSTRING) and numpy lives in
    ``numpy.core``. ``pickle.load(f, encoding="latin1")`` then gives ``str`` keys and the uint8
    array, ``encoding="bytes"`` gives ``bytes`` keys, and the default (ASCII) fails on the
    pixel bytes: exactly what the real files do."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str

    def save_global(self, obj, name=None) -> None:
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("numpy._core"):  # numpy 2 names; the files say numpy.core
            name = name or obj.__qualname__
            self.write(pickle.GLOBAL + ("numpy.core" + module[len("numpy._core") :]).encode() + b"\n" + name.encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch[type] = save_global


def py2_pickle(obj) -> bytes:
    """``obj`` as a python-2 protocol-2 pickle (see :class:`_Py2Pickler`)."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def build_cifar10_official():
    """CIFAR-10 with python-2 pickles as in ``cifar-10-python.tar.gz``: ``data_batch_1..5``
    (3 images each), ``test_batch`` (4), ``batches.meta``, ``readme.html``; the real keys."""
    names = ["airplane", "automobile", "bird"]
    rng = np.random.default_rng(10)
    m = {}
    for b in range(1, 6):
        labels = [b % 3, (b + 1) % 3, (b + 1) % 3]
        m[f"cifar-10-batches-py/data_batch_{b}"] = py2_pickle(
            {"batch_label": f"training batch {b} of 5", "labels": labels, "data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
             "filenames": [f"img_{b}_{k}.png" for k in range(3)]}
        )
    m["cifar-10-batches-py/test_batch"] = py2_pickle(
        {"batch_label": "testing batch 1 of 1", "labels": [2, 1, 0, 2], "data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
         "filenames": [f"test_{k}.png" for k in range(4)]}
    )
    m["cifar-10-batches-py/batches.meta"] = py2_pickle({"num_cases_per_batch": 3, "label_names": names, "num_vis": 3072})
    m["cifar-10-batches-py/readme.html"] = b"<html></html>"
    return {"cifar-10-python.tar.gz": make_tar(m)}, {"train": 15, "test": 4, "classes": names}


def build_cifar100_official():
    """CIFAR-100 with python-2 pickles as in ``cifar-100-python.tar.gz``: ``train``, ``test``
    and ``meta`` with fine and coarse labels (coarse ids differ from fine ids on purpose)."""
    fine = ["apple", "aquarium_fish", "baby", "bear"]
    coarse = ["large_carnivores", "people", "fish", "fruit_and_vegetables"]  # coarse id = 3 - fine id
    rng = np.random.default_rng(11)
    train_fine, test_fine = [3, 0, 1, 2, 0, 3, 2, 1], [1, 3, 0]
    m = {
        "cifar-100-python/train": py2_pickle(
            {"filenames": [f"tr_{k}.png" for k in range(8)], "batch_label": "training batch 1 of 1", "fine_labels": train_fine,
             "coarse_labels": [3 - f for f in train_fine], "data": rng.integers(0, 256, (8, 3072), dtype=np.uint8)}
        ),
        "cifar-100-python/test": py2_pickle(
            {"filenames": [f"te_{k}.png" for k in range(3)], "batch_label": "testing batch 1 of 1", "fine_labels": test_fine,
             "coarse_labels": [3 - f for f in test_fine], "data": rng.integers(0, 256, (3, 3072), dtype=np.uint8)}
        ),
        "cifar-100-python/meta": py2_pickle({"fine_label_names": fine, "coarse_label_names": coarse}),
    }
    return {"cifar-100-python.tar.gz": make_tar(m)}, {"train": 8, "test": 3, "classes": fine}


def build_food101_official():
    """Food-101 with the official ``meta/`` folder complete: ``classes.txt``, ``labels.txt``,
    ``train.txt``/``test.txt`` (read by finetail) and ``train.json``/``test.json`` (the same
    lists as ``{class: ["class/id", ...]}``, read by torchvision)."""
    import json

    classes = ["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio"]
    m, lists = {}, {"train": {}, "test": {}}
    n = 1005649
    for c in classes:
        for k in range(4):
            m[f"food-101/images/{c}/{n}.jpg"] = jpeg(n % 1000)
            lists["train" if k < 3 else "test"].setdefault(c, []).append(f"{c}/{n}")
            n += 7
    txt = lambda lines: ("\n".join(lines) + "\n").encode()
    m["food-101/meta/classes.txt"] = txt(classes)
    m["food-101/meta/labels.txt"] = txt(c.replace("_", " ").capitalize() for c in classes)
    for split, by_class in lists.items():
        m[f"food-101/meta/{split}.txt"] = txt(p for c in classes for p in by_class[c])
        m[f"food-101/meta/{split}.json"] = json.dumps(by_class).encode()
    m["food-101/README.txt"] = b"Food-101"
    return {"food-101.tar.gz": make_tar(m)}, {"train": 12, "test": 4, "classes": classes}
