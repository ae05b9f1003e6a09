"""Shared fixtures: real Fashion-MNIST, tiny fake CIFAR-10 and FEMNIST, and a machine offline.

- `fmnist_dir`: a data_dir where `load_dataset("fashion-mnist", data_dir)` works at once (the
  Debian package's files, decompressed once per session); `fmnist`: its (train, test) splits.
- `fake_cifar10_dir`, `fake_femnist_dir`: data_dirs holding tiny datasets in the real formats
  (written by `fedpara.fakedata`), for `load_dataset(..., data_dir=..., download=False)`.
- `offline`: every socket connection fails, as on this workplace's machines, so download code
  takes its real failure path and a machine with internet never downloads in a test.
"""

from __future__ import annotations

import socket

import pytest
import torch

from fedpara import data
from fedpara.fakedata import write_fake_cifar, write_fake_femnist


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory):
    if not data.DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip(
            f"needs Debian's dataset-fashion-mnist ({data.DEBIAN_FASHION_MNIST}); "
            "apt-get install dataset-fashion-mnist"
        )
    root = tmp_path_factory.mktemp("fmnist")
    data.load_dataset("fashion-mnist", data_dir=root, download=False)
    return root


@pytest.fixture(scope="session")
def fmnist(fmnist_dir):
    return data.load_dataset("fashion-mnist", data_dir=fmnist_dir, download=False)


@pytest.fixture(scope="session")
def fake_cifar10_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_cifar10")
    write_fake_cifar(root, "cifar10", n_train=200, n_test=50, seed=0)
    return root


@pytest.fixture(scope="session")
def fake_femnist_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_femnist")
    write_fake_femnist(root, n_writers=12, per_writer=25, seed=0)
    return root


@pytest.fixture
def offline(monkeypatch):
    """No network: connecting a socket or resolving a name raises OSError."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def one_thread():
    """Pin torch to one thread for a module: on a shared 2-core machine, OpenMP's thread sync
    costs more than it saves for small tensors and batches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
