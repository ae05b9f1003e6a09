"""Tiny datasets written in the real on-disk formats, for tests and smoke runs without a network.

    from fedpara.fakedata import write_fake_cifar, write_fake_femnist, write_fake_idx
    write_fake_cifar(root, "cifar10", n_train=500, n_test=100)
    write_fake_idx(root, "mnist", n_train=60, n_test=20)
    write_fake_femnist(root, n_writers=20, per_writer=30)
    train, test = load_dataset("cifar10", data_dir=root, download=False)

The book's CIFAR and FEMNIST chapters use them for their smoke profile (unless a data folder is
given), on every machine, real data or not: what such a run reports is a test of the machinery,
never a result.

Each class has its own fixed template image plus noise, so a model can learn something from
the fake data in a smoke run. The files follow the real layouts: torchvision's CIFAR pickled
batches (`cifar-10-batches-py/` or `cifar-100-python/`, optionally as the `.tar.gz` archive),
the gzipped IDX files of MNIST and Fashion-MNIST (`MNIST/raw/` or `FashionMNIST/raw/`), and the
Hugging Face `flwrlabs/femnist` columns saved with `save_to_disk` into `<root>/femnist/`.
(Fake archives do not match torchvision's MD5 sums; `fedpara.data` checks the files' structure
and the archives' MD5, so tests of the archive paths patch the expected MD5.)
"""

from __future__ import annotations

import gzip
import hashlib
import numbers
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from fedpara.storage import write_atomic

FEMNIST_CLASSES = list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _check_counts(**counts: int) -> None:
    """Every count is an integer >= 1 (the loaders read no empty split), named if not."""
    for name, value in counts.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")


def _labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """n labels that cover the classes as evenly as possible, in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _cifar_images(rng: np.random.Generator, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, 32, 32, 3) uint8: a per-class 4×4 colour pattern scaled up, plus noise."""
    templates = np.random.default_rng(1234).uniform(40, 215, (num_classes, 4, 4, 3))
    templates = templates.repeat(8, axis=1).repeat(8, axis=2)  # (classes, 32, 32, 3)
    noisy = templates[labels] + rng.normal(0, 25, (len(labels), 32, 32, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


class _Python2Pickler(pickle._Pickler):  # the pure-Python pickler: its `dispatch` can be extended
    """Protocol 2 with every str and bytes written as Python 2's str (SHORT_BINSTRING,
    BINSTRING), as in the real CIFAR batches, which Python 2 pickled: `encoding="latin1"`
    (torchvision, fedpara.data) reads those back as str and `encoding="bytes"` (the CIFAR
    site's recipe) as bytes, dict keys included; numpy reads its array data either way."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = save_python2_str


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        _Python2Pickler(f, protocol=2).dump(obj)


def write_fake_cifar(
    root: str | os.PathLike,
    name: str = "cifar10",
    n_train: int = 100,
    n_test: int = 20,
    seed: int = 0,
    archive: bool = False,
) -> dict:
    """Write a small CIFAR-10 or CIFAR-100 in torchvision's on-disk format under `root`.

    CIFAR-10: `cifar-10-batches-py/` with `data_batch_1`..`data_batch_5`, `test_batch`,
    `batches.meta`; CIFAR-100: `cifar-100-python/` with `train`, `test`, `meta`. With
    `archive=True` only the `.tar.gz` torchvision downloads is left (`cifar-10-python.tar.gz` /
    `cifar-100-python.tar.gz`), not the folder (an earlier one is removed). The batches are
    pickled as Python 2 pickled the real ones (`_Python2Pickler`). `n_train`, `n_test` >= 1.
    Returns {"train": (images (N, 32, 32, 3) uint8, labels (N,)), "test": (...),
    "archive_md5": MD5 of the archive or None}.
    """
    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    _check_counts(n_train=n_train, n_test=n_test)
    root = Path(root)
    rng = np.random.default_rng(seed)
    num_classes = 10 if name == "cifar10" else 100
    folder_name = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = _labels(rng, n, num_classes)
        splits[split] = (_cifar_images(rng, labels, num_classes), labels)

    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root, prefix=".fake-cifar-"))
    folder = work / folder_name
    folder.mkdir()

    def batch(images: np.ndarray, labels: np.ndarray, label_key: str, title: str) -> dict:
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # R plane, G, B
        entry = {
            "batch_label": title,
            label_key: labels.tolist(),
            "data": rows,
            "filenames": [f"fake_{i:05d}.png" for i in range(len(labels))],
        }
        if label_key == "fine_labels":
            entry["coarse_labels"] = (labels // 5).tolist()
        return entry

    if name == "cifar10":
        x, y = splits["train"]
        for i, part in enumerate(np.array_split(np.arange(len(y)), 5), start=1):
            _pickle(
                folder / f"data_batch_{i}",
                batch(x[part], y[part], "labels", f"training batch {i} of 5"),
            )
        _pickle(folder / "test_batch", batch(*splits["test"], "labels", "testing batch 1 of 1"))
        _pickle(
            folder / "batches.meta",
            {
                "num_cases_per_batch": len(y) // 5,
                "num_vis": 3072,
                "label_names": [f"class{c}" for c in range(10)],
            },
        )
    else:
        _pickle(folder / "train", batch(*splits["train"], "fine_labels", "training batch 1 of 1"))
        _pickle(folder / "test", batch(*splits["test"], "fine_labels", "testing batch 1 of 1"))
        _pickle(
            folder / "meta",
            {
                "fine_label_names": [f"class{c}" for c in range(100)],
                "coarse_label_names": [f"super{c}" for c in range(20)],
            },
        )

    md5 = None
    if archive:
        tar_name = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
        with tarfile.open(work / tar_name, "w:gz") as tar:
            tar.add(folder, arcname=folder_name)
        md5 = hashlib.md5((work / tar_name).read_bytes()).hexdigest()
        shutil.rmtree(root / folder_name, ignore_errors=True)  # the loader would prefer it
        os.replace(work / tar_name, root / tar_name)
    else:
        shutil.rmtree(root / folder_name, ignore_errors=True)  # replace an earlier fake
        os.replace(folder, root / folder_name)
    shutil.rmtree(work, ignore_errors=True)
    return {"train": splits["train"], "test": splits["test"], "archive_md5": md5}


def write_fake_idx(
    root: str | os.PathLike, name: str = "mnist", n_train: int = 60, n_test: int = 20,
    seed: int = 0,
) -> dict:
    """Write a small MNIST or Fashion-MNIST as torchvision's gzipped IDX files under `root`.

    `<root>/MNIST/raw/` (or `FashionMNIST/raw/`) gets `train-images-idx3-ubyte.gz`,
    `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`:
    big-endian IDX headers (magic 0x803 for the uint8 images N×28×28, 0x801 for the labels N),
    the same as the files torchvision downloads, not decompressed. `n_train`, `n_test` >= 1.
    Returns {"train": (images (N, 28, 28) uint8, labels (N,)), "test": (...),
    "md5": {gz file name: its MD5}}.
    """
    folders = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
    if name not in folders:
        raise ValueError(f"name must be 'mnist' or 'fashion-mnist', got {name!r}")
    _check_counts(n_train=n_train, n_test=n_test)
    raw = Path(root) / folders[name] / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(1234).random((10, 28, 28)) < 0.3
    result: dict = {"md5": {}}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        labels = _labels(rng, n, 10)
        noise = rng.integers(0, 60, (n, 28, 28))
        images = np.where(templates[labels], 255 - noise, noise).astype(np.uint8)
        result[split] = (images, labels)
        files = {
            f"{prefix}-images-idx3-ubyte.gz": struct.pack(">IIII", 0x803, n, 28, 28)
            + images.tobytes(),
            f"{prefix}-labels-idx1-ubyte.gz": struct.pack(">II", 0x801, n)
            + labels.astype(np.uint8).tobytes(),
        }
        for file, content in files.items():
            packed = gzip.compress(content, mtime=0)
            write_atomic(raw / file, packed)
            result["md5"][file] = hashlib.md5(packed).hexdigest()
    return result


def write_fake_femnist(
    root: str | os.PathLike, n_writers: int = 6, per_writer: int = 20, seed: int = 0
):
    """Save a small dataset with the `flwrlabs/femnist` columns to `<root>/femnist/`.

    Columns: image (28×28 grayscale PNG, dark strokes on white like FEMNIST), writer_id (8
    characters, e.g. "f0003_13"), hsf_id (int 0..7), character (ClassLabel of the 62 classes
    0-9, A-Z, a-z). Writer i has `per_writer` samples; rows are grouped by writer as on the Hub.
    `n_writers`, `per_writer` >= 1. Returns the `datasets.Dataset` that was saved.
    """
    _check_counts(n_writers=n_writers, per_writer=per_writer)
    import datasets

    rng = np.random.default_rng(seed)
    n = n_writers * per_writer
    labels = _labels(rng, n, len(FEMNIST_CLASSES))
    templates = np.random.default_rng(1234).random((len(FEMNIST_CLASSES), 28, 28)) < 0.2
    flips = rng.random((n, 28, 28)) < 0.05
    images = np.where(templates[labels] ^ flips, 0, 255).astype(np.uint8)  # (N, 28, 28)
    writers = [f"f{w:04d}_{10 + w % 90:02d}" for w in range(n_writers) for _ in range(per_writer)]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "writer_id": datasets.Value("string"),
            "hsf_id": datasets.Value("int64"),
            "character": datasets.ClassLabel(names=FEMNIST_CLASSES),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "image": list(images),
            "writer_id": writers,
            "hsf_id": [int(w[1:5]) % 8 for w in writers],
            "character": labels.tolist(),
        },
        features=features,
    )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root, prefix=".fake-femnist-"))
    try:
        ds.save_to_disk(str(work / "femnist"))
        shutil.rmtree(root / "femnist", ignore_errors=True)  # replace an earlier fake
        os.replace(work / "femnist", root / "femnist")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ds
