"""Tiny datasets in the real on-disk formats, for the tests: see `fedpara.fakedata`.

    from fixtures_formats import write_fake_cifar, write_fake_femnist

The writers live in the library (`fedpara/fakedata.py`) because the book's smoke runs use them
too; this module keeps the tests' import path.
"""

from fedpara.fakedata import FEMNIST_CLASSES, write_fake_cifar, write_fake_femnist

__all__ = ["FEMNIST_CLASSES", "write_fake_cifar", "write_fake_femnist"]
