"""Datasets, the paper's transforms, and fast on-device batches.

    from fedpara.data import load_dataset, as_tensors, TensorBatches
    train, test = load_dataset("cifar10")             # downloads into $FEDPARA_DATA or ./data
    x, y = as_tensors(train, indices, device="cuda")  # one client's share, normalized, on the GPU
    for xb, yb in TensorBatches(x, y, 64, augment=True): ...

Every split is an `ImageDataset`: the images as one uint8 array, the labels as an int64 array
(`.labels`) and, for FEMNIST, the writer of each image (`.writer_ids`), so that partitioning never
touches an image. Indexing it gives `(normalized float tensor C×H×W, int label)` for the plain
`DataLoader` path (`make_loader`); `as_tensors` + `TensorBatches` serve the same samples as whole
tensors with the augmentation done per batch on the training device.

Where the files come from (all under `data_dir`):
- CIFAR-10/100: torchvision's archive (URL and MD5 from torchvision), extracted atomically into
  `cifar-10-batches-py/` or `cifar-100-python/` (torchvision's pickled-batch format).
- MNIST / Fashion-MNIST: torchvision's IDX files, decompressed atomically into `<Class>/raw/`.
  Fashion-MNIST is taken from Debian's `dataset-fashion-mnist` package when it is installed.
- FEMNIST: the Hugging Face dataset `flwrlabs/femnist`, saved with `save_to_disk` into `femnist/`;
  each writer's samples are split into that writer's own train and test parts (10% test).

A failed or impossible download raises `DataUnavailableError` saying what was expected where and
how to place it by hand. An archive already in `data_dir` (CIFAR's `.tar.gz`, the IDX `.gz` files)
is used with or without `download`, but only if its MD5 matches torchvision's; one that does not is
reported as corrupt or truncated, with both MD5 sums and how to replace it. Downloads and extracted
folders appear only once complete, so an interrupted download is never mistaken for data.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from fedpara.config import DATASETS, IMAGE_SIZES  # the allowed names live in config
from fedpara.storage import make_folder, write_atomic

# Debian's `dataset-fashion-mnist` package: the original data, recompressed (other MD5 sums)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FEMNIST_HUB_ID = "flwrlabs/femnist"
FEMNIST_TEST_FRACTION = 0.1  # share of each writer's samples held out as that writer's test set
FEMNIST_SPLIT_SEED = 0
PAD = 4  # random-crop padding in pixels (paper: crop 32×32 from the image padded by 4)


class DataUnavailableError(RuntimeError):
    """The dataset's files are missing or incomplete and could not be downloaded."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training loop need to know about a dataset."""

    num_classes: int
    in_channels: int
    image_size: int  # height = width, pixels
    mean: tuple[float, ...]  # per channel, of pixel values scaled to [0, 1]
    std: tuple[float, ...]
    augment: bool  # random crop (pad 4) + horizontal flip on the training split (CIFAR only)


# Channel statistics of each training set. FEMNIST's are approximate (white background).
_INFO = {
    "cifar10": DatasetInfo(10, 3, IMAGE_SIZES["cifar10"], (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616), True),
    "cifar100": DatasetInfo(100, 3, IMAGE_SIZES["cifar100"], (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762), True),
    "fashion-mnist": DatasetInfo(10, 1, IMAGE_SIZES["fashion-mnist"], (0.2860,), (0.3530,), False),
    "mnist": DatasetInfo(10, 1, IMAGE_SIZES["mnist"], (0.1307,), (0.3081,), False),
    "femnist": DatasetInfo(62, 1, IMAGE_SIZES["femnist"], (0.9637,), (0.1597,), False),
}


def _torchvision(name: str) -> type:
    """torchvision's dataset class for `name`: its archive's URL and MD5 sum, its file names,
    its IDX reader. Imported when first needed, as are torchvision's download helpers and
    transforms: importing torchvision imports its models and torch's compiler, which takes
    seconds, and a fresh process (a deployment's ClientApp, once per message) would pay that
    even with the files in place."""
    import torchvision.datasets as tvd

    return {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100,
            "fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST}[name]


# an extracted CIFAR folder, as torchvision lays it out (tests/test_data.py checks these against
# torchvision's classes): (folder, training batches, test batches, metadata file), so that
# reading one needs no torchvision
_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                ("test_batch",), "batches.meta"),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "meta"),
}


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")


def dataset_info(name: str) -> DatasetInfo:
    """Number of classes, input shape, normalization and augmentation of dataset `name`."""
    _check_name(name)
    return _INFO[name]


def default_data_dir() -> Path:
    """`$FEDPARA_DATA` if set, else `./data`."""
    return Path(os.environ.get("FEDPARA_DATA", "data"))


# ---------------------------------------------------------------------------------------------
# the dataset class


class ImageDataset(Dataset):
    """One split of a dataset, held in memory as uint8 images.

    Attributes: `data` uint8 array (N, H, W, C); `labels` int64 array (N,); `writer_ids` array (N,)
    of writer names for FEMNIST, else None; `info` the DatasetInfo; `augment` whether indexing
    applies the random crop and flip (the training split of CIFAR).
    """

    def __init__(
        self,
        name: str,
        data: np.ndarray,
        labels: np.ndarray,
        *,
        train: bool,
        writer_ids: np.ndarray | None = None,
    ) -> None:
        if data.ndim != 4 or data.dtype != np.uint8 or len(data) != len(labels):
            raise ValueError("data must be a uint8 array (N, H, W, C) with one label per image")
        self.name = name
        self.info = dataset_info(name)
        self.train = train
        self.data = data
        self.labels = np.asarray(labels, dtype=np.int64)
        self.writer_ids = writer_ids
        self.augment = train and self.info.augment
        self._mean = torch.tensor(self.info.mean).view(-1, 1, 1)
        self._std = torch.tensor(self.info.std).view(-1, 1, 1)
        # a black pixel normalized: what TensorBatches pads its normalized images with
        self.pad_value = ((0 - self._mean) / self._std).view(-1)
        self._random_crop_flip = None  # built at the first augmented image (torchvision's)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.data[index]).permute(2, 0, 1).float().div(255)  # (C, H, W)
        if self.augment:
            if self._random_crop_flip is None:
                import torchvision.transforms.v2 as T

                # crop the [0, 1] image, padded with black, then normalize: the Flower
                # baseline's order (RandomCrop before Normalize), the values TensorBatches gives
                self._random_crop_flip = T.Compose(
                    [T.RandomCrop(self.info.image_size, padding=PAD),
                     T.RandomHorizontalFlip()])
            x = self._random_crop_flip(x)
        return (x - self._mean) / self._std, int(self.labels[index])

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return f"ImageDataset({self.name!r}, {split}, n={len(self)}, image={self.data.shape[1:]})"


# ---------------------------------------------------------------------------------------------
# loading


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = True
) -> tuple[ImageDataset, ImageDataset]:
    """The train and test splits of dataset `name` (one of `DATASETS`).

    `data_dir` defaults to `$FEDPARA_DATA`, else `./data`. With `download=False` only files
    already under `data_dir` (or Debian's Fashion-MNIST package) are used.
    Raises `DataUnavailableError` when the files are missing and cannot be fetched, and
    `storage.NotWritableError` when `data_dir` is not a folder and cannot be made one.
    """
    _check_name(name)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    make_folder(root, "data_dir" if data_dir is not None  # NotWritableError: a file in the way
                else "the default data folder ($FEDPARA_DATA, else ./data)")
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, root, download)
    if name in ("mnist", "fashion-mnist"):
        return _load_idx(name, root, download)
    return _load_femnist(root, download)


def _unavailable(
    title: str,
    folder: Path,
    reason: str,
    expected: Sequence[str],
    how: str,
    lead: str = "To place them by hand",
):
    files = ", ".join(expected)
    return DataUnavailableError(
        f"{title} is not available in {folder}: {reason}.\n"
        f"Expected files there: {files}.\n"
        f"{lead}: {how}"
    )


def _missing(folder: Path, names: Sequence[str]) -> list[str]:
    return [n for n in names if not (folder / n).is_file()]


# archives: torchvision's URLs and MD5 sums


def _wrong_md5(path: Path, md5: str) -> str | None:
    """The MD5 of the file at `path` if it exists and differs from `md5`, else None."""
    if not path.is_file():
        return None
    from torchvision.datasets.utils import calculate_md5

    actual = calculate_md5(str(path))
    return actual if actual != md5 else None


def _corrupt_archive(
    title: str, folder: Path, expected: Sequence[str], archive: Path, md5: str, actual: str,
    url: str, download_error: BaseException | None = None,
) -> DataUnavailableError:
    """The error for an archive in the data directory whose MD5 is not the published one."""
    reason = (
        f"the archive {archive} is corrupt or truncated: its MD5 is {actual}, expected {md5} "
        f"({archive.stat().st_size:,} bytes)"
    )
    if download_error is not None:
        reason += f", and downloading it again failed ({download_error})"
    how = (
        f"delete {archive} and run again with download on (the default of load_dataset and "
        f"of `python -m fedpara.run`), or place a good copy of {url} (MD5 {md5}) at exactly "
        f"{archive}"
    )
    return _unavailable(title, folder, reason, expected, how, lead="To fix it")


def _download(url: str, dest: Path, md5: str) -> None:
    """Download `url` to `dest`, which appears only once complete and with MD5 `md5`."""
    from torchvision.datasets.utils import download_url

    part = dest.with_name(f".{dest.name}.{os.getpid()}.part")  # one per process: clients race
    try:
        download_url(url, str(dest.parent), part.name, md5)  # RuntimeError on a wrong MD5
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


# CIFAR: torchvision's archive and pickled batches


def _load_cifar(name: str, root: Path, download: bool) -> tuple[ImageDataset, ImageDataset]:
    base, train_files, test_files, meta = _CIFAR_FILES[name]
    folder = root / base
    expected = [*train_files, *test_files, meta]
    title = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[name]
    if _missing(folder, expected):  # fetched or extracted (torchvision's archive, URL, MD5)
        _fetch_cifar(name, root, folder, expected, title, download)

    splits = []
    for train, files in ((True, train_files), (False, test_files)):
        try:
            data, labels = _read_cifar_batches(folder, files, _INFO[name].num_classes)
        except (OSError, ValueError) as err:
            tv = _torchvision(name)
            reason = (
                f"a file is incomplete or corrupted ({err}); delete {folder} and run again "
                f"(it is extracted again from {root / tv.filename}, downloaded if need be)"
            )
            raise _unavailable(title, folder, reason, expected, _cifar_how(tv, root)) from err
        splits.append(ImageDataset(name, data, labels, train=train))
    return splits[0], splits[1]


def _cifar_how(tv: type, root: Path) -> str:
    return (f"download {tv.url} (MD5 {tv.tgz_md5}) and run `tar xzf {tv.filename} -C {root}`, "
            f"or put the archive itself at {root / tv.filename} and run again.")


def _fetch_cifar(name: str, root: Path, folder: Path, expected: Sequence[str], title: str,
                 download: bool) -> None:
    """Make `folder` complete from torchvision's archive in `root` (downloaded if `download`
    and it is not there or not intact), or raise DataUnavailableError saying what to do."""
    tv = _torchvision(name)
    archive = root / tv.filename
    how = _cifar_how(tv, root)
    missing = _missing(folder, expected)
    if not folder.exists():  # an archive in root is used even without download
        actual = _wrong_md5(archive, tv.tgz_md5)
        if download and (actual is not None or not archive.is_file()):
            try:
                _download(tv.url, archive, tv.tgz_md5)
            except (OSError, RuntimeError) as err:  # URLError is an OSError
                if actual is not None:
                    raise _corrupt_archive(title, folder, expected, archive, tv.tgz_md5, actual,
                                           tv.url, err) from err
                reason = f"the download failed ({err})"
                raise _unavailable(title, folder, reason, expected, how) from err
            actual = None
        if actual is not None:
            raise _corrupt_archive(title, folder, expected, archive, tv.tgz_md5, actual, tv.url)
        if archive.is_file():
            _extract_cifar(tv, root, expected)
            missing = _missing(folder, expected)
    if missing:
        reason = f"missing {', '.join(missing)}"
        if folder.exists():
            reason += f" (an incomplete folder: delete {folder} and run again)"
        raise _unavailable(title, folder, reason, expected, how)


def _extract_cifar(tv: type, root: Path, expected: Sequence[str]) -> None:
    """Extract torchvision's archive (its MD5 already checked) into `root`.

    The folder is extracted next to its final place and renamed into it, so it exists only
    when complete. If another process has meanwhile put its complete copy (all of `expected`)
    there, that copy is kept.
    """
    from torchvision.datasets.utils import extract_archive

    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".extract-"))
    try:
        extract_archive(str(root / tv.filename), str(tmp))
        try:
            os.replace(tmp / tv.base_folder, root / tv.base_folder)
        except OSError:  # "Directory not empty": the other process was first
            if _missing(root / tv.base_folder, expected):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cifar_batches(folder: Path, files: Sequence[str], num_classes: int):
    """Images (N, 32, 32, 3) uint8 and labels (N,) from CIFAR's pickled batches."""
    images, labels = [], []
    for file in files:
        try:
            with open(folder / file, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            batch_labels = entry["labels"] if "labels" in entry else entry["fine_labels"]
            # stored as rows of 3072 bytes: the red plane, then green, then blue
            batch = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        except (EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{file}: {err!r}") from err
        if len(batch) != len(batch_labels):
            raise ValueError(f"{file}: {len(batch)} images but {len(batch_labels)} labels")
        images.append(batch.transpose(0, 2, 3, 1))  # (n, H, W, C)
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    labels = np.concatenate(labels)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels outside 0..{num_classes - 1}")
    return np.concatenate(images), labels


# MNIST and Fashion-MNIST: torchvision's IDX files


def _load_idx(name: str, root: Path, download: bool) -> tuple[ImageDataset, ImageDataset]:
    tv = _torchvision(name)
    raw = root / tv.__name__ / "raw"
    expected = [f.removesuffix(".gz") for f, _ in tv.resources]
    title = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}[name]
    how = (
        f"download {', '.join(f for f, _ in tv.resources)} from {tv.mirrors[0]} "
        f"and decompress them (gunzip) into {raw}"
    )
    if name == "fashion-mnist":
        how += ", or install Debian's package: apt-get install dataset-fashion-mnist"

    if _missing(raw, expected) and name == "fashion-mnist" and DEBIAN_FASHION_MNIST.is_dir():
        for f in _missing(raw, expected):
            src = DEBIAN_FASHION_MNIST / f"{f}.gz"
            try:
                content = gzip.decompress(src.read_bytes())  # at most 47 MB
            except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
                reason = f"Debian's copy {src} is corrupt or truncated ({err!r})"
                fix = (
                    "reinstall the package: apt-get install --reinstall dataset-fashion-mnist "
                    f"(or place the four decompressed files in {raw})"
                )
                raise _unavailable(title, raw, reason, expected, fix, lead="To fix it") from err
            try:
                write_atomic(raw / f, content)
            except OSError as err:  # a read-only data folder, a full disk
                reason = f"cannot write into the data folder {raw} ({err})"
                fix = (
                    f"make {raw} writable (or free space on its disk), or use another data "
                    "folder (data_dir, or $FEDPARA_DATA)"
                )
                raise _unavailable(title, raw, reason, expected, fix, lead="To fix it") from err
    for gz_name, md5 in tv.resources:  # a .gz already in raw/ is used even without download
        target, gz = raw / gz_name.removesuffix(".gz"), raw / gz_name
        if target.is_file():
            continue
        actual = _wrong_md5(gz, md5)
        url = f"{tv.mirrors[0]}{gz_name}"
        if download and (actual is not None or not gz.is_file()):
            try:
                _fetch_idx(tv, gz, md5)
            except (OSError, RuntimeError) as err:
                if actual is not None:
                    raise _corrupt_archive(title, raw, expected, gz, md5, actual, url, err) from err
                reason = f"the download failed ({err})"
                raise _unavailable(title, raw, reason, expected, how) from err
            actual = None
        if actual is not None:
            raise _corrupt_archive(title, raw, expected, gz, md5, actual, url)
        if gz.is_file():
            _gunzip_atomic(gz, target)
    if missing := _missing(raw, expected):
        raise _unavailable(title, raw, f"missing {', '.join(missing)}", expected, how)

    splits = []
    for train in (True, False):
        try:
            tvset = tv(str(root), train=train, download=False)
        except (RuntimeError, ValueError, AssertionError, KeyError) as err:
            reason = (
                f"a file is incomplete or corrupted ({err!r}); delete {raw} and run again "
                "with download on"
            )
            raise _unavailable(title, raw, reason, expected, how) from err
        data = tvset.data.numpy()[..., None]  # (N, 28, 28, 1)
        splits.append(ImageDataset(name, data, tvset.targets.numpy(), train=train))
    return splits[0], splits[1]


def _fetch_idx(tv: type, gz: Path, md5: str) -> None:
    """Download `gz` (MD5-checked) from the first of torchvision's mirrors that answers."""
    errors = []
    for mirror in tv.mirrors:
        try:
            _download(f"{mirror}{gz.name}", gz, md5)
            return
        except (OSError, RuntimeError) as err:
            errors.append(f"{mirror}: {err}")
    raise OSError(f"could not download {gz.name} ({'; '.join(errors)})")


def _gunzip_atomic(src: Path, dst: Path) -> None:
    with gzip.open(src, "rb") as fin:
        write_atomic(dst, lambda fout: shutil.copyfileobj(fin, fout, 1 << 20))


# FEMNIST: the Hugging Face dataset, split per writer


def _load_femnist(root: Path, download: bool) -> tuple[ImageDataset, ImageDataset]:
    import datasets  # only FEMNIST needs it; the GPU machine has no `datasets`

    folder = root / "femnist"
    expected = ["dataset_info.json", "state.json", "data-*.arrow"]
    how = (
        f"on a machine with internet run `datasets.load_dataset({FEMNIST_HUB_ID!r}, "
        f"split='train').save_to_disk('femnist')` and copy that folder to {folder}"
    )
    if not (folder / "state.json").is_file():
        if folder.exists():
            reason = f"an incomplete copy (no state.json): delete {folder} and run again"
            raise _unavailable("FEMNIST", folder, reason, expected, how)
        if not download:
            raise _unavailable("FEMNIST", folder, "no saved copy", expected, how)
        try:
            _fetch_femnist(root, folder)
        except OSError as err:  # the Hub's ConnectionError and HTTP errors are OSErrors
            reason = f"the download of {FEMNIST_HUB_ID} from the Hugging Face Hub failed ({err})"
            raise _unavailable("FEMNIST", folder, reason, expected, how) from err

    try:
        ds = datasets.load_from_disk(str(folder))
    except (OSError, ValueError, KeyError) as err:  # a cut .arrow file: pyarrow's OSError
        raise _corrupt_femnist(folder, expected, how, err) from err
    images, labels, writers = _femnist_arrays(ds, root, folder, expected, how)
    test = femnist_test_mask(writers, FEMNIST_TEST_FRACTION, FEMNIST_SPLIT_SEED)
    train_set = ImageDataset(
        "femnist", images[~test], labels[~test], train=True, writer_ids=writers[~test]
    )
    test_set = ImageDataset(
        "femnist", images[test], labels[test], train=False, writer_ids=writers[test]
    )
    return train_set, test_set


def _corrupt_femnist(folder: Path, expected: Sequence[str], how: str, err: BaseException):
    """The error for a saved copy that does not read back (the Hub publishes no MD5 of it)."""
    shards = ", ".join(f"{p.name} ({p.stat().st_size:,} bytes)"
                       for p in sorted(folder.glob("data-*.arrow")))
    reason = (
        f"the saved copy there is corrupt or truncated ({err!r}; its data files: "
        f"{shards or 'none'})"
    )
    fix = f"delete {folder} and run again with download on, or {how}"
    return _unavailable("FEMNIST", folder, reason, expected, fix, lead="To fix it")


def _fetch_femnist(root: Path, folder: Path) -> None:
    """Download `flwrlabs/femnist` and save it to `folder`, renamed into place once complete."""
    import datasets

    work = Path(tempfile.mkdtemp(dir=root, prefix=".femnist-download-"))
    try:
        ds = datasets.load_dataset(FEMNIST_HUB_ID, split="train", cache_dir=str(work / "cache"))
        ds.save_to_disk(str(work / "saved"))
        try:
            os.replace(work / "saved", folder)
        except OSError:  # "Directory not empty": another process was first; keep its copy
            if not (folder / "state.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _femnist_arrays(
    ds, root: Path, folder: Path, expected: Sequence[str], how: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N, 28, 28, 1) uint8, labels (N,) and writer ids (N,) of the saved dataset.

    Decoding ~800k PNGs takes a while, so the arrays are cached in `femnist-arrays.npz`,
    keyed by the saved dataset's fingerprint; a cache that does not read back is rebuilt.
    """
    import datasets

    cache = root / "femnist-arrays.npz"
    if cache.is_file():
        try:
            with np.load(cache) as z:
                if str(z["fingerprint"]) == ds._fingerprint:
                    return z["images"], z["labels"], z["writer_ids"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # derived from the saved copy: written again below

    try:
        meta = ds.select_columns(["character", "writer_id"]).with_format("numpy")[:]
        labels = meta["character"]
        if labels.dtype.kind in "US":  # a plain string column: LEAF's order 0-9, A-Z, a-z
            classes = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
            labels = np.array([classes.index(c) for c in labels])
        pixels = ds.select_columns(["image"]).cast_column("image", datasets.Image(mode="L"))
        pixels = pixels.with_format("numpy")
        images = np.empty((len(ds), 28, 28, 1), dtype=np.uint8)
        for start in range(0, len(ds), 10_000):
            images[start : start + 10_000, ..., 0] = pixels[start : start + 10_000]["image"]
    except (OSError, ValueError, KeyError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise _corrupt_femnist(folder, expected, how, err) from err
    labels, writers = labels.astype(np.int64), meta["writer_id"].astype(str)

    arrays = dict(images=images, labels=labels, writer_ids=writers, fingerprint=ds._fingerprint)
    try:
        write_atomic(cache, lambda f: np.savez(f, **arrays))
    except OSError as err:  # a read-only data folder, a full disk: the cache only saves time
        warnings.warn(f"could not write the FEMNIST cache {cache} ({err}); the images will be "
                      "decoded again next time", stacklevel=2)
    return images, labels, writers


def femnist_test_mask(writer_ids: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask (N,) choosing round(test_fraction · n_w) random samples of each writer.

    A writer with n_w samples keeps at least one for training. The draw depends only on the
    order of the samples and on `seed`, so the split is the same on every machine.
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    _, writer, counts = np.unique(writer_ids, return_inverse=True, return_counts=True)
    keys = np.random.default_rng(seed).random(len(writer_ids))
    order = np.lexsort((keys, writer))  # grouped by writer, random order within each writer
    rank = np.empty(len(order), dtype=np.int64)
    start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank[order] = np.arange(len(order)) - np.repeat(start, counts)
    n_test = np.minimum(np.round(test_fraction * counts), counts - 1).astype(np.int64)
    return rank < n_test[writer]


# ---------------------------------------------------------------------------------------------
# serving batches


def as_tensors(
    split: ImageDataset, indices: Sequence[int] | np.ndarray | None = None, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected samples as one normalized float32 tensor (N, C, H, W) and int64 labels (N,).

    The uint8 images are moved to `device` first (4× less to copy) and converted there;
    no augmentation (use `TensorBatches(..., augment=True)` for that).
    """
    if not isinstance(split, ImageDataset):
        raise TypeError(f"split must be an ImageDataset from load_dataset, got {type(split)}")
    idx = np.arange(len(split)) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= len(split))):
        raise ValueError(f"indices must be a 1-D array of positions in 0..{len(split) - 1}")
    x = torch.from_numpy(split.data[idx]).to(device)  # (N, H, W, C) uint8
    mean = torch.tensor(split.info.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(split.info.std, device=x.device).view(1, -1, 1, 1)
    x = (x.permute(0, 3, 1, 2).float().div_(255) - mean).div_(std).contiguous()
    y = torch.from_numpy(split.labels[idx]).to(device)
    return x, y


def random_crop_flip(
    x: torch.Tensor, pad: int = PAD, generator: torch.Generator | None = None,
    fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random crop from the padded image, then a horizontal flip with probability 1/2.

    x: (B, C, H, W). The padding holds `fill` (C,) per channel (default zeros; for normalized
    images, `ImageDataset.pad_value`, a normalized black). Each image gets its own offset
    (dy, dx) in 0..2·pad and flip; done with two gathers on x's device, no Python loop over
    images.
    """
    b, c, h, w = x.shape
    dev = generator.device if generator is not None else x.device
    dy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator).to(x.device)
    flip = (torch.rand(b, device=dev, generator=generator) < 0.5).to(x.device)
    if fill is None:
        xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    else:
        if fill.shape != (c,):
            raise ValueError(f"fill must hold one value per channel, shape ({c},); "
                             f"got {tuple(fill.shape)}")
        xp = fill.to(x).view(1, c, 1, 1).expand(b, c, h + 2 * pad, w + 2 * pad).clone()
        xp[:, :, pad:pad + h, pad:pad + w] = x
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)  # (B, W)
    xp = xp.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * pad))  # (B, C, H, W+2p)
    return xp.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))  # (B, C, H, W)


class TensorBatches:
    """Mini-batches `(xb, yb)` over tensors already on the training device.

    One pass per `iter()`: a fresh permutation when `shuffle`, and when `augment` each batch is
    randomly cropped (pad 4, the padding holding `fill` per channel, default zeros) and flipped
    on x's device. `generator` (on CPU or on x's device) makes both reproducible. `len()` is the
    number of batches.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        augment: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        fill: torch.Tensor | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if x.ndim != 4 or len(x) != len(y):
            raise ValueError(
                f"x must be (N, C, H, W) with len(y) == N; got {tuple(x.shape)}, {len(y)}"
            )
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.generator = generator
        self.fill = None if fill is None else fill.to(x)

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        if self.shuffle:
            dev = self.generator.device if self.generator is not None else self.x.device
            order = torch.randperm(n, device=dev, generator=self.generator).to(self.x.device)
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            if self.shuffle:
                xb, yb = self.x.index_select(0, order[sl]), self.y.index_select(0, order[sl])
            else:
                xb, yb = self.x[sl], self.y[sl]
            if self.augment:
                xb = random_crop_flip(xb, generator=self.generator, fill=self.fill)
            yield xb, yb


def make_loader(
    split: Dataset,
    indices: Sequence[int] | np.ndarray | None,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """The plain path: a `DataLoader` over `Subset(split, indices)` (all samples if None).

    The shuffling order comes from `seed`; the augmentation of a CIFAR training split from
    torch's global random state (per worker).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    subset = (
        split if indices is None else Subset(split, np.asarray(indices, dtype=np.int64).tolist())
    )
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
