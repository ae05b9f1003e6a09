"""Datasets: real Fashion-MNIST, the CIFAR and FEMNIST formats, offline errors, fast batches."""

from __future__ import annotations

import errno
import hashlib
import io
import pickle
import re
import struct
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from torchvision.datasets.utils import extract_archive

from fedpara import data
from fedpara.data import (
    DATASETS,
    DataUnavailableError,
    ImageDataset,
    TensorBatches,
    as_tensors,
    dataset_info,
    femnist_test_mask,
    load_dataset,
    make_loader,
    random_crop_flip,
)
from fedpara.fakedata import write_fake_cifar, write_fake_femnist, write_fake_idx

# helpers


def crop_flip_of(out: torch.Tensor, x: torch.Tensor, pad: int = 4,
                 fill: torch.Tensor | None = None) -> tuple[int, int, bool] | None:
    """The (dy, dx, flipped) with out == crop of x (C, H, W) padded with `fill` per channel
    (default zeros), or None."""
    c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    if fill is not None:
        xp[:, :pad], xp[:, -pad:] = fill.view(c, 1, 1), fill.view(c, 1, 1)
        xp[:, :, :pad], xp[:, :, -pad:] = fill.view(c, 1, 1), fill.view(c, 1, 1)
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = xp[:, dy : dy + h, dx : dx + w]
            for flipped, candidate in ((False, crop), (True, crop.flip(-1))):
                if torch.equal(out, candidate):
                    return dy, dx, flipped
    return None


def normalized(images: np.ndarray, name: str) -> torch.Tensor:
    """Reference normalization: (N, H, W, C) uint8 -> (N, C, H, W) float."""
    info = dataset_info(name)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(info.mean).view(1, -1, 1, 1)) / torch.tensor(info.std).view(
        1, -1, 1, 1
    )


# Fashion-MNIST, the real thing


def test_fashion_mnist_from_the_debian_package_is_the_original(fmnist):
    train, test = fmnist
    assert (len(train), len(test)) == (60_000, 10_000)
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert train.labels.dtype == np.int64 and set(np.unique(train.labels)) == set(range(10))
    assert np.bincount(test.labels).tolist() == [1000] * 10
    x, y = test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    assert train.writer_ids is None and not train.augment


def test_fashion_mnist_statistics_normalize_the_training_set(fmnist):
    x, _ = as_tensors(fmnist[0], np.arange(0, 60_000, 7))
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01


def test_fashion_mnist_raw_files_are_complete_and_no_temp_files_remain(fmnist_dir):
    raw = fmnist_dir / "FashionMNIST" / "raw"
    names = sorted(p.name for p in raw.iterdir())
    assert names == [
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
    ]
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 16 + 60_000 * 28 * 28


def test_truncated_idx_file_is_reported_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    header = struct.pack(">IIII", 0x803, 60_000, 28, 28)  # claims 60,000 images
    for name, _ in tvd.FashionMNIST.resources:
        (raw / name.removesuffix(".gz")).write_bytes(header + bytes(1000))
    with pytest.raises(DataUnavailableError, match="incomplete or corrupted"):
        load_dataset("fashion-mnist", data_dir=tmp_path, download=False)


@pytest.mark.parametrize("download", [True, False])
def test_idx_archives_in_raw_are_used_when_their_md5_matches(tmp_path, monkeypatch, offline,
                                                             download):
    written = write_fake_idx(tmp_path, "mnist", n_train=30, n_test=10)
    monkeypatch.setattr(tvd.MNIST, "resources", list(written["md5"].items()))
    train, test = load_dataset("mnist", data_dir=tmp_path, download=download)
    np.testing.assert_array_equal(train.data[..., 0], written["train"][0])
    np.testing.assert_array_equal(test.labels, written["test"][1])
    assert not list((tmp_path / "MNIST" / "raw").glob(".*"))  # no temporary files left


def test_truncated_idx_archive_is_named_as_corrupt(tmp_path, monkeypatch, offline):
    written = write_fake_idx(tmp_path, "mnist", n_train=30, n_test=10)
    monkeypatch.setattr(tvd.MNIST, "resources", list(written["md5"].items()))
    raw = tmp_path / "MNIST" / "raw"
    gz = raw / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-100])
    url = f"{tvd.MNIST.mirrors[0]}{gz.name}"
    for download in (True, False):
        with pytest.raises(DataUnavailableError) as err:
            load_dataset("mnist", data_dir=tmp_path, download=download)
        msg = str(err.value)
        assert_names_the_corrupt_archive(msg, gz, written["md5"][gz.name], url)
        assert ("downloading it again failed" in msg) == download
        assert not (raw / "t10k-images-idx3-ubyte").exists()
    gz.unlink()  # the fix the message gives, with a good copy placed by hand
    write_fake_idx(tmp_path, "mnist", n_train=30, n_test=10)
    assert len(load_dataset("mnist", data_dir=tmp_path, download=False)[1]) == 10


def test_corrupt_debian_fashion_mnist_says_to_reinstall_it(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    write_fake_idx(debian, "fashion-mnist")
    for gz in (debian / "FashionMNIST" / "raw").iterdir():
        gz.write_bytes(gz.read_bytes()[:-20])  # cut short: gzip's EOFError
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", debian / "FashionMNIST" / "raw")
    with pytest.raises(DataUnavailableError) as err:
        load_dataset("fashion-mnist", data_dir=tmp_path / "data", download=False)
    msg = str(err.value)
    assert "corrupt or truncated" in msg and str(debian / "FashionMNIST" / "raw") in msg
    assert "apt-get install --reinstall dataset-fashion-mnist" in msg
    assert not list((tmp_path / "data").rglob("*ubyte*"))  # nothing half-written


def test_unwritable_data_folder_for_debian_fashion_mnist_is_not_blamed_on_debian(
        tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    write_fake_idx(debian, "fashion-mnist")
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", debian / "FashionMNIST" / "raw")

    def read_only(path, content):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(data, "write_atomic", read_only)
    with pytest.raises(DataUnavailableError) as err:
        load_dataset("fashion-mnist", data_dir=tmp_path / "data", download=False)
    msg = str(err.value)
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert f"cannot write into the data folder {raw}" in msg and "Read-only file system" in msg
    assert "corrupt" not in msg and "reinstall" not in msg


def test_mnist_offline_error_names_dataset_folder_files_and_remedy(tmp_path, offline):
    with pytest.raises(DataUnavailableError) as err:
        load_dataset("mnist", data_dir=tmp_path, download=True)
    msg = str(err.value)
    assert "MNIST is not available" in msg and str(tmp_path / "MNIST" / "raw") in msg
    assert "download failed" in msg and "train-images-idx3-ubyte" in msg
    assert "t10k-labels-idx1-ubyte" in msg and tvd.MNIST.mirrors[0] in msg
    assert not list((tmp_path / "MNIST" / "raw").glob("*ubyte"))


def test_fashion_mnist_without_the_debian_package_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    with pytest.raises(DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=tmp_path, download=False)


def test_data_dir_defaults_to_fedpara_data(fmnist_dir, monkeypatch):
    monkeypatch.setenv("FEDPARA_DATA", str(fmnist_dir))
    assert data.default_data_dir() == fmnist_dir
    assert len(load_dataset("fashion-mnist", download=False)[1]) == 10_000


# dataset table and bad names


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_info_normalizes_every_channel(name):
    info = dataset_info(name)
    assert len(info.mean) == len(info.std) == info.in_channels
    assert all(0 < m < 1 and 0 < sd < 1 for m, sd in zip(info.mean, info.std, strict=True))


def test_normalization_constants_are_the_published_training_set_statistics():
    """Only Fashion-MNIST's are measured here (the other datasets are not on this machine): the
    others are pinned to the published values, so a swapped channel or a typo shows."""
    assert (dataset_info("cifar10").mean, dataset_info("cifar10").std) == (
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert (dataset_info("cifar100").mean, dataset_info("cifar100").std) == (
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    assert (dataset_info("mnist").mean, dataset_info("mnist").std) == ((0.1307,), (0.3081,))


@pytest.mark.parametrize(
    "call", [lambda: dataset_info("svhn"), lambda: load_dataset("CIFAR10", data_dir="unused")]
)
def test_unknown_dataset_names_the_allowed_values(call):
    with pytest.raises(ValueError, match=r"name must be one of .*'cifar10'.*'femnist'"):
        call()


# CIFAR: torchvision's on-disk format


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_format_round_trip(tmp_path, name):
    written = write_fake_cifar(tmp_path, name, n_train=230, n_test=40, seed=1)
    train, test = load_dataset(name, data_dir=tmp_path, download=False)
    for split, (images, labels) in ((train, written["train"]), (test, written["test"])):
        np.testing.assert_array_equal(split.data, images)
        np.testing.assert_array_equal(split.labels, labels)
    assert train.augment and not test.augment
    x, y = test[3]
    torch.testing.assert_close(x, normalized(written["test"][0][3:4], name)[0])
    assert y == written["test"][1][3]


def test_cifar_train_items_are_random_crops_and_flips_padded_with_black(fake_cifar10_dir):
    train, _ = load_dataset("cifar10", data_dir=fake_cifar10_dir, download=False)
    plain = normalized(train.data[:20], "cifar10")
    black = normalized(np.zeros((1, 1, 1, 3), np.uint8), "cifar10").view(3)
    assert torch.equal(train.pad_value, black)  # the Flower baseline pads before normalizing
    found = [crop_flip_of(train[i][0], plain[i], fill=black) for i in range(20)]
    assert None not in found
    assert len(set(found)) > 1  # not the same transform every time
    assert any((dy, dx) != (4, 4) for dy, dx, _ in found)  # some crops do show the padding


def test_fast_batches_pad_cifar_with_the_same_black(fake_cifar10_dir):
    from fedpara import task
    from fedpara.config import ExperimentConfig

    config = ExperimentConfig(dataset="cifar10", model="cnn", data_dir=str(fake_cifar10_dir),
                              num_clients=2, clients_per_round=1, batch_size=8)
    train, _ = load_dataset("cifar10", data_dir=fake_cifar10_dir, download=False)
    batches = task.make_batches(train, np.arange(32), config, torch.device("cpu"), train=True,
                                seed=0)
    assert torch.equal(batches.fill, train.pad_value)
    plain = normalized(train.data[:32], "cifar10")
    for xb, _ in batches:
        for out in xb:  # which image it is: the one whose crop it is
            assert any(crop_flip_of(out, p, fill=train.pad_value) for p in plain)


def test_random_crop_flip_refuses_a_fill_of_another_shape():
    with pytest.raises(ValueError, match=r"fill must hold one value per channel, shape \(3,\)"):
        random_crop_flip(torch.zeros(2, 3, 8, 8), fill=torch.zeros(2))


@pytest.mark.parametrize("download", [True, False])
def test_cifar_archive_is_extracted_when_its_md5_matches(tmp_path, monkeypatch, offline, download):
    written = write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10, archive=True)
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", written["archive_md5"])
    train, test = load_dataset("cifar10", data_dir=tmp_path, download=download)
    np.testing.assert_array_equal(train.data, written["train"][0])
    assert len(test) == 10
    assert not list(tmp_path.glob(".extract-*"))


def test_fake_cifar_archive_replaces_an_earlier_fake_folder(tmp_path, monkeypatch, offline):
    write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10, seed=0)
    written = write_fake_cifar(tmp_path, "cifar10", n_train=80, n_test=10, seed=1, archive=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tvd.CIFAR10.filename]
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", written["archive_md5"])
    train, _ = load_dataset("cifar10", data_dir=tmp_path, download=False)
    np.testing.assert_array_equal(train.data, written["train"][0])


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_fake_cifar_batches_are_pickled_as_python_2_wrote_the_real_ones(tmp_path, monkeypatch,
                                                                         name):
    """Keys and text are Python 2 str: bytes with encoding="bytes" (the CIFAR site's recipe),
    str with encoding="latin1" (torchvision's), and torchvision reads the folder."""
    import pickle

    import torchvision.datasets.cifar

    written = write_fake_cifar(tmp_path, name, n_train=300, n_test=20)
    tv = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    batch = (tmp_path / tv.base_folder / tv.test_list[0][0]).read_bytes()
    assert batch.startswith(b"\x80\x02")  # protocol 2, as the originals
    as_bytes = pickle.loads(batch, encoding="bytes")
    as_str = pickle.loads(batch, encoding="latin1")
    assert set(as_bytes) == {key.encode() for key in as_str} and b"data" in as_bytes
    assert as_bytes[b"batch_label"] == as_str["batch_label"].encode() == b"testing batch 1 of 1"
    assert as_bytes[b"filenames"][0] == b"fake_00000.png"
    np.testing.assert_array_equal(as_bytes[b"data"], as_str["data"])
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    train = tv(str(tmp_path), train=True, download=False)  # fake files: no MD5 check
    np.testing.assert_array_equal(train.data, written["train"][0])
    assert train.targets == written["train"][1].tolist() and train.classes[0] == "class0"


@pytest.mark.parametrize("call, name", [
    (lambda root: write_fake_cifar(root, "cifar10", n_train=0), "n_train"),
    (lambda root: write_fake_cifar(root, "cifar100", n_test=-5), "n_test"),
    (lambda root: write_fake_cifar(root, "cifar10", n_train=2.5), "n_train"),
    (lambda root: write_fake_idx(root, "mnist", n_train=-1), "n_train"),
    (lambda root: write_fake_idx(root, "mnist", n_test=True), "n_test"),
    (lambda root: write_fake_femnist(root, n_writers=0), "n_writers"),
    (lambda root: write_fake_femnist(root, per_writer=-2), "per_writer"),
])
def test_fake_data_writers_refuse_bad_counts_before_writing(tmp_path, call, name):
    with pytest.raises(ValueError, match=f"{name}=.* must be an integer >= 1"):
        call(tmp_path / "data")
    assert not (tmp_path / "data").exists()


def assert_names_the_corrupt_archive(msg: str, archive, expected_md5: str, url: str) -> None:
    """The message calls the archive corrupt, gives both MD5 sums and the two ways to fix it."""
    actual = hashlib.md5(archive.read_bytes()).hexdigest()
    assert f"the archive {archive} is corrupt or truncated" in msg
    assert f"its MD5 is {actual}, expected {expected_md5}" in msg
    assert f"delete {archive} and run again with download on" in msg
    assert f"place a good copy of {url} (MD5 {expected_md5}) at exactly {archive}" in msg


def test_partial_cifar_archive_is_named_as_corrupt_and_never_used(tmp_path, monkeypatch, offline):
    written = write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10, archive=True)
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", written["archive_md5"])
    archive = tmp_path / tvd.CIFAR10.filename
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])  # a cut download
    for download in (True, False):
        with pytest.raises(DataUnavailableError) as err:
            load_dataset("cifar10", data_dir=tmp_path, download=download)
        msg = str(err.value)
        assert_names_the_corrupt_archive(msg, archive, written["archive_md5"], tvd.CIFAR10.url)
        assert ("downloading it again failed" in msg) == download
        assert not (tmp_path / tvd.CIFAR10.base_folder).exists()
        assert archive.is_file()  # left for the user to inspect or delete
    assert sorted(p.name for p in tmp_path.iterdir()) == [tvd.CIFAR10.filename]


def test_cifar_offline_error_names_dataset_folder_files_and_remedy(tmp_path, offline):
    with pytest.raises(DataUnavailableError) as err:
        load_dataset("cifar100", data_dir=tmp_path, download=True)
    msg = str(err.value)
    assert "CIFAR-100 is not available" in msg and str(tmp_path / "cifar-100-python") in msg
    assert "download failed" in msg
    for expected in ("train", "test", "meta", tvd.CIFAR100.url, tvd.CIFAR100.tgz_md5, "tar xzf"):
        assert expected in msg
    assert not (tmp_path / "cifar-100-python").exists()


def test_truncated_cifar_batch_is_reported(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-500])
    with pytest.raises(
        DataUnavailableError, match="data_batch_3.*incomplete|incomplete.*data_batch_3"
    ):
        load_dataset("cifar10", data_dir=tmp_path, download=True)


def test_cifar_labels_outside_the_classes_are_reported(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(batch, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry["labels"][0] = 10
    with open(batch, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    with pytest.raises(DataUnavailableError, match=r"labels outside 0\.\.9"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


def serving(content: bytes):
    """A stand-in for urllib.request.urlopen: every URL answers with `content`."""

    def urlopen(request, *args, **kwargs):
        response = io.BytesIO(content)
        response.url, response.length = getattr(request, "full_url", request), len(content)
        return response

    return urlopen


def test_a_cifar_download_appears_only_whole_and_with_its_md5(tmp_path, monkeypatch):
    written = write_fake_cifar(tmp_path / "server", "cifar10", n_train=50, n_test=10,
                               archive=True)
    good = (tmp_path / "server" / tvd.CIFAR10.filename).read_bytes()
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", written["archive_md5"])
    root = tmp_path / "data"
    monkeypatch.setattr(urllib.request, "urlopen", serving(good[: len(good) // 2]))  # cut short
    with pytest.raises(DataUnavailableError, match="the download failed"):
        load_dataset("cifar10", data_dir=root, download=True)
    assert list(root.iterdir()) == []  # neither the archive nor a partial file
    monkeypatch.setattr(urllib.request, "urlopen", serving(good))
    train, _ = load_dataset("cifar10", data_dir=root, download=True)
    np.testing.assert_array_equal(train.data, written["train"][0])
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [tvd.CIFAR10.base_folder, tvd.CIFAR10.filename])


def test_incomplete_cifar_folder_is_not_used_or_overwritten(tmp_path, offline):
    write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataUnavailableError, match=r"missing test_batch \(an incomplete folder"):
        load_dataset("cifar10", data_dir=tmp_path, download=True)
    assert (tmp_path / "cifar-10-batches-py" / "data_batch_1").is_file()


@pytest.mark.parametrize("complete", [True, False])
def test_cifar_extracted_by_another_process_meanwhile_is_kept(tmp_path, monkeypatch, offline,
                                                              complete):
    written = write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10, archive=True)
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", written["archive_md5"])
    folder = tmp_path / tvd.CIFAR10.base_folder

    def extract_while_another_process_finishes(archive, to):
        extract_archive(archive, to)
        write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10)  # its copy, the same data
        if not complete:
            (folder / "test_batch").unlink()

    # fedpara.data imports torchvision's helper when it extracts: the patch is on torchvision
    monkeypatch.setattr(tvd.utils, "extract_archive", extract_while_another_process_finishes)
    if complete:
        train, _ = load_dataset("cifar10", data_dir=tmp_path, download=False)
        np.testing.assert_array_equal(train.data, written["train"][0])
    else:  # an incomplete folder there is no copy to keep
        with pytest.raises(OSError) as err:  # os.replace onto the other process's folder
            load_dataset("cifar10", data_dir=tmp_path, download=False)
        assert err.value.errno == errno.ENOTEMPTY
    assert not list(tmp_path.glob(".extract-*"))


def test_an_extracted_cifar_folder_is_read_without_torchvision(tmp_path):
    """Importing fedpara's apps and reading extracted CIFAR files import no torchvision (its
    import, models and torch's compiler included, is most of a fresh process's start); the
    folder's layout that makes this possible is torchvision's own."""
    for name, (base, train_files, test_files, meta) in data._CIFAR_FILES.items():
        tv = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
        assert base == tv.base_folder and meta == tv.meta["filename"]
        assert list(train_files) == [f for f, _ in tv.train_list]
        assert list(test_files) == [f for f, _ in tv.test_list]
    written = write_fake_cifar(tmp_path, "cifar100", n_train=30, n_test=10)
    child = (
        "import sys, numpy as np\n"
        "import fedpara.client_app, fedpara.server_app\n"
        "from fedpara.data import load_dataset\n"
        f"train, test = load_dataset('cifar100', data_dir={str(tmp_path)!r}, download=False)\n"
        "x, y = train[0]\n"  # an augmented training image: crop and flip, torchvision's
        "print(len(train), len(test), 'torchvision' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    # up to the first augmented image: then torchvision's transforms are imported
    assert done.stdout.split() == [str(len(written["train"][1])), "10", "True"]
    before = child.replace("x, y = train[0]\n", "")
    done = subprocess.run([sys.executable, "-c", before], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(len(written["train"][1])), "10", "False"]


# FEMNIST: a local copy of flwrlabs/femnist, split per writer


def test_femnist_local_copy_is_split_per_writer(tmp_path):
    saved = write_fake_femnist(tmp_path, n_writers=9, per_writer=31, seed=2)
    train, test = load_dataset("femnist", data_dir=tmp_path, download=False)
    assert len(train) + len(test) == 9 * 31
    assert train.train and not test.train
    assert train.data.shape[1:] == (28, 28, 1) and train.writer_ids.dtype.kind == "U"
    for writer in np.unique(saved["writer_id"]):
        n_train = (train.writer_ids == writer).sum()
        n_test = (test.writer_ids == writer).sum()
        assert (n_train, n_test) == (28, 3)  # round(0.1 · 31) held out
    # every saved (writer, label, image) appears exactly once across the two splits
    saved_rows = sorted(
        (w, c, np.asarray(im).tobytes())
        for w, c, im in zip(saved["writer_id"], saved["character"], saved["image"], strict=True)
    )
    loaded_rows = sorted(
        (w, int(c), im.tobytes())
        for split in (train, test)
        for w, c, im in zip(split.writer_ids, split.labels, split.data[..., 0], strict=True)
    )
    assert saved_rows == loaded_rows


def test_femnist_split_is_deterministic_and_cached(fake_femnist_dir, monkeypatch):
    import fedpara.data

    a_train, a_test = load_dataset("femnist", data_dir=fake_femnist_dir, download=False)
    assert (fake_femnist_dir / "femnist-arrays.npz").is_file()
    # the second load reads the cache: it neither decodes the images nor writes anything
    monkeypatch.setattr(fedpara.data, "write_atomic",
                        lambda *args: pytest.fail("the cache was rebuilt, not read"))
    b_train, b_test = load_dataset("femnist", data_dir=fake_femnist_dir, download=False)
    np.testing.assert_array_equal(a_test.data, b_test.data)
    np.testing.assert_array_equal(a_train.writer_ids, b_train.writer_ids)


def test_femnist_cache_of_an_earlier_saved_copy_is_not_used(tmp_path):
    write_fake_femnist(tmp_path, n_writers=3, per_writer=10)
    load_dataset("femnist", data_dir=tmp_path, download=False)  # cached: 30 samples
    write_fake_femnist(tmp_path, n_writers=4, per_writer=10, seed=1)  # a new copy replaces it
    train, test = load_dataset("femnist", data_dir=tmp_path, download=False)
    assert len(train) + len(test) == 40


def test_femnist_characters_as_plain_strings_get_leaf_class_numbers(tmp_path):
    """A copy whose `character` column holds the characters themselves, not a ClassLabel."""
    from fedpara.fakedata import FEMNIST_CLASSES

    saved = write_fake_femnist(tmp_path / "classlabel", n_writers=3, per_writer=10)
    letters = saved.remove_columns("character").add_column(
        "character", [FEMNIST_CLASSES[c] for c in saved["character"]])
    letters.save_to_disk(str(tmp_path / "letters" / "femnist"))
    for a, b in zip(load_dataset("femnist", data_dir=tmp_path / "classlabel", download=False),
                    load_dataset("femnist", data_dir=tmp_path / "letters", download=False),
                    strict=True):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.writer_ids, b.writer_ids)


def test_truncated_femnist_copy_is_named_as_corrupt(tmp_path):
    write_fake_femnist(tmp_path, n_writers=3, per_writer=10)
    shard = next((tmp_path / "femnist").glob("data-*.arrow"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DataUnavailableError) as err:
        load_dataset("femnist", data_dir=tmp_path, download=False)
    msg = str(err.value)
    assert "corrupt or truncated" in msg and f"{shard.name} ({shard.stat().st_size:,} bytes)" in msg
    assert f"delete {tmp_path / 'femnist'} and run again with download on" in msg


def test_corrupt_femnist_cache_is_rebuilt(tmp_path):
    write_fake_femnist(tmp_path, n_writers=3, per_writer=10)
    first = load_dataset("femnist", data_dir=tmp_path, download=False)
    cache = tmp_path / "femnist-arrays.npz"
    cache.write_bytes(cache.read_bytes()[:1000])
    again = load_dataset("femnist", data_dir=tmp_path, download=False)
    np.testing.assert_array_equal(first[0].data, again[0].data)
    with np.load(cache) as z:  # written again in full
        assert len(z["images"]) == 30


def test_femnist_loads_when_its_cache_cannot_be_written(tmp_path, monkeypatch):
    write_fake_femnist(tmp_path, n_writers=3, per_writer=10)

    def read_only(path, content):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(data, "write_atomic", read_only)
    cache = tmp_path / "femnist-arrays.npz"
    with pytest.warns(UserWarning, match=re.escape(f"could not write the FEMNIST cache {cache}")):
        train, test = load_dataset("femnist", data_dir=tmp_path, download=False)
    assert len(train) + len(test) == 30 and not cache.exists()


def test_femnist_downloaded_by_another_process_meanwhile_is_kept(tmp_path, monkeypatch, offline):
    import datasets

    def hub_while_another_process_finishes(*args, **kwargs):
        return write_fake_femnist(tmp_path, n_writers=3, per_writer=10)  # its copy in place

    monkeypatch.setattr(datasets, "load_dataset", hub_while_another_process_finishes)
    train, test = load_dataset("femnist", data_dir=tmp_path, download=True)
    assert len(train) + len(test) == 30
    assert not list(tmp_path.glob(".femnist-*"))


def test_femnist_test_mask_takes_a_tenth_of_each_writer():
    writers = np.repeat(np.array(["a", "b", "c", "d"]), [1, 10, 25, 200])
    mask = femnist_test_mask(writers, 0.1, seed=0)
    assert [mask[writers == w].sum() for w in "abcd"] == [0, 1, 2, 20]
    assert not np.array_equal(mask, femnist_test_mask(writers, 0.1, seed=1))
    with pytest.raises(ValueError, match="test_fraction"):
        femnist_test_mask(writers, 1.0, seed=0)
    assert femnist_test_mask(np.array(["e"] * 6), 0.1, seed=0).sum() == 1  # round(0.6), not 0
    assert femnist_test_mask(np.array(["f", "f"]), 0.9, seed=0).sum() == 1  # one kept to train


def test_femnist_offline_error_names_dataset_folder_files_and_remedy(
    tmp_path, offline, monkeypatch
):
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)  # skip the Hub's retry waits
    with pytest.raises(DataUnavailableError) as err:
        load_dataset("femnist", data_dir=tmp_path, download=True)
    msg = str(err.value)
    assert "FEMNIST is not available" in msg and str(tmp_path / "femnist") in msg
    assert "flwrlabs/femnist" in msg and "state.json" in msg and "save_to_disk" in msg
    assert not (tmp_path / "femnist").exists() and not list(tmp_path.glob(".femnist-*"))


def test_femnist_without_download_or_with_an_incomplete_copy(tmp_path):
    with pytest.raises(DataUnavailableError, match="no saved copy"):
        load_dataset("femnist", data_dir=tmp_path, download=False)
    (tmp_path / "femnist").mkdir()
    with pytest.raises(DataUnavailableError, match="incomplete copy"):
        load_dataset("femnist", data_dir=tmp_path, download=True)


# fast batches


def test_as_tensors_matches_the_dataset_items(fmnist):
    test = fmnist[1]
    idx = np.array([5, 0, 9999, 17])
    x, y = as_tensors(test, idx)
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, torch.stack([test[i][0] for i in idx]))
    assert y.tolist() == test.labels[idx].tolist()
    assert len(as_tensors(test)[0]) == 10_000


@pytest.mark.parametrize("indices", [np.array([0, 10_000]), np.array([-1]), np.zeros((2, 2), int)])
def test_as_tensors_rejects_bad_indices(fmnist, indices):
    with pytest.raises(ValueError, match="indices"):
        as_tensors(fmnist[1], indices)


def test_as_tensors_needs_an_image_dataset():
    with pytest.raises(TypeError, match="ImageDataset"):
        as_tensors(torch.utils.data.TensorDataset(torch.zeros(2, 1)))


def test_tensor_batches_without_shuffle_or_augment_yield_exactly_the_data():
    x, y = torch.randn(10, 3, 4, 4), torch.arange(10)
    batches = TensorBatches(x, y, 4, shuffle=False)
    assert len(batches) == 3
    xs, ys = zip(*batches, strict=True)
    assert [len(b) for b in ys] == [4, 4, 2]
    assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)
    assert len(TensorBatches(x, y, 4, drop_last=True)) == 2
    assert sum(len(b) for _, b in TensorBatches(x, y, 4, drop_last=True)) == 8


def test_tensor_batches_shuffle_is_a_seeded_permutation():
    x, y = torch.arange(50.0).view(50, 1, 1, 1), torch.arange(50)

    def order(seed):
        batches = TensorBatches(x, y, 8, generator=torch.Generator().manual_seed(seed))
        ys = torch.cat([yb for xb, yb in batches if torch.equal(xb.view(-1), yb.float())])
        return ys.tolist()

    assert sorted(order(0)) == list(range(50))  # every sample once, pairs kept together
    assert order(0) == order(0) and order(0) != order(1)


def test_tensor_batches_augment_gives_shifted_flipped_crops():
    x = torch.randn(64, 3, 8, 8)  # distinct values, so each crop is identified unambiguously
    y = torch.arange(64)
    batches = TensorBatches(
        x, y, 16, shuffle=True, augment=True, generator=torch.Generator().manual_seed(0)
    )
    found = []
    for xb, yb in batches:
        assert xb.shape == (len(yb), 3, 8, 8)
        found += [crop_flip_of(out, x[i]) for out, i in zip(xb, yb, strict=True)]
    assert None not in found
    offsets = {(dy, dx) for dy, dx, _ in found}
    # every shift of 0..2·pad occurs, on both axes (the extremes show only padding on one side)
    assert {dy for dy, _ in offsets} == {dx for _, dx in offsets} == set(range(9))
    flips = sum(f for _, _, f in found)
    assert len(offsets) > 10 and 10 < flips < 54  # offsets in 0..8, flip with probability 1/2


def test_random_crop_flip_keeps_the_image_when_pad_is_zero_and_nothing_flips():
    x = torch.randn(5, 2, 6, 6)
    out = random_crop_flip(x, pad=0, generator=torch.Generator().manual_seed(3))
    for o, xi in zip(out, x, strict=True):
        assert torch.equal(o, xi) or torch.equal(o, xi.flip(-1))


@pytest.mark.parametrize("batch_size", [0, -3, 2.5])
def test_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatches(torch.zeros(4, 1, 2, 2), torch.zeros(4), batch_size)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(torch.utils.data.TensorDataset(torch.zeros(4)), None, batch_size, shuffle=False)


def test_tensor_batches_rejects_mismatched_tensors():
    with pytest.raises(ValueError, match="x must be"):
        TensorBatches(torch.zeros(4, 2, 2), torch.zeros(4), 2)
    with pytest.raises(ValueError, match="x must be"):
        TensorBatches(torch.zeros(4, 1, 2, 2), torch.zeros(3), 2)


def test_make_loader_agrees_with_as_tensors(fmnist):
    idx = np.arange(100, 164)
    loader = make_loader(fmnist[1], idx, 16, shuffle=False)
    xs, ys = zip(*loader, strict=True)
    x, y = as_tensors(fmnist[1], idx)
    torch.testing.assert_close(torch.cat(xs), x)
    assert torch.equal(torch.cat(ys), y)
    shuffled = torch.cat([yb for _, yb in make_loader(fmnist[1], idx, 16, shuffle=True, seed=1)])
    assert sorted(shuffled.tolist()) == sorted(y.tolist())


def test_make_loader_shuffles_in_the_order_its_seed_gives():
    samples = torch.utils.data.TensorDataset(torch.arange(64))

    def order(seed):
        return torch.cat([b for (b,) in make_loader(samples, None, 16, shuffle=True, seed=seed)])

    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))


def test_image_dataset_rejects_bad_arrays():
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset("mnist", np.zeros((3, 28, 28), np.uint8), np.zeros(3), train=True)
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset("mnist", np.zeros((3, 28, 28, 1), np.float32), np.zeros(3), train=True)


def test_fake_cifar_metadata_is_complete(tmp_path):
    """The fields of the real batches and meta files beyond what the loaders read: CIFAR-100's
    coarse labels and both lists of label names, CIFAR-10's label names."""
    import pickle

    write_fake_cifar(tmp_path, "cifar100", n_train=30, n_test=10)
    write_fake_cifar(tmp_path, "cifar10", n_train=30, n_test=10)

    def read(*path):
        with open(tmp_path.joinpath(*path), "rb") as f:
            return pickle.load(f, encoding="latin1")

    for split, n in (("train", 30), ("test", 10)):
        batch = read("cifar-100-python", split)
        assert len(batch["coarse_labels"]) == len(batch["fine_labels"]) == n
        assert set(batch["coarse_labels"]) <= set(range(20))
    meta = read("cifar-100-python", "meta")
    assert len(meta["fine_label_names"]) == 100 and len(meta["coarse_label_names"]) == 20
    meta = read("cifar-10-batches-py", "batches.meta")
    assert meta["label_names"] == [f"class{c}" for c in range(10)] and meta["num_vis"] == 3072


def test_fake_femnist_has_the_hub_columns(tmp_path):
    """flwrlabs/femnist's features (a ClassLabel of the 62 characters, 8-character writer ids,
    hsf_id 0..7), rows grouped by writer, dark strokes on a white page."""
    import datasets

    from fedpara.fakedata import FEMNIST_CLASSES

    write_fake_femnist(tmp_path, n_writers=3, per_writer=4)
    saved = datasets.load_from_disk(str(tmp_path / "femnist"))
    features = saved.features
    assert isinstance(features["character"], datasets.ClassLabel)
    assert features["character"].names == FEMNIST_CLASSES and len(FEMNIST_CLASSES) == 62
    assert features["writer_id"] == datasets.Value("string")
    assert features["hsf_id"] == datasets.Value("int64")
    assert isinstance(features["image"], datasets.Image)
    assert saved["writer_id"] == ["f0000_10"] * 4 + ["f0001_11"] * 4 + ["f0002_12"] * 4
    assert set(saved["hsf_id"]) <= set(range(8))
    image = saved[0]["image"]
    assert image.mode == "L" and image.size == (28, 28)
    pixels = np.stack([np.asarray(row["image"]) for row in saved])
    assert set(np.unique(pixels)) == {0, 255} and (pixels == 255).mean() > 0.5  # white page
