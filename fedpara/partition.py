"""Federated splits: which training samples each client holds, and each client's own test data.

    from fedpara.partition import partition, holdout_indices
    parts = partition(train.labels, 100, "dirichlet", alpha=0.5, seed=0)   # list of index arrays
    tests = holdout_indices(train.labels, parts, test.labels, seed=0)    # per-client test indices

The splits themselves come from flwr-datasets' partitioners, run on a `datasets.Dataset` that
holds only the labels (and writer ids) plus each row's position; `partition` is the one place
that fixes their settings. By default nothing is stored: a split is recomputed from its
arguments (a second or less). With the environment variable FEDPARA_SPLITS naming a folder,
`partition` also keeps each split there, in a file named by a SHA-256 digest of every argument
and of the labels (and ids) themselves, and reads it back when the same arguments meet the same
labels again. So a stored split is never reused for another scheme, alpha, seed or dataset (the
baseline's defect 2), and a machine without flwr-datasets (a GPU node) can use a split that was
computed elsewhere. `holdout_indices` and `plot_label_distribution` need only numpy and
matplotlib; `partition` needs flwr-datasets unless its split is stored.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedpara.config import SCHEMES  # the allowed names live in config
from fedpara.storage import write_atomic

SPLITS_ENV = "FEDPARA_SPLITS"  # a folder where `partition` keeps and finds its splits


def _as_labels(labels, name: str = "labels") -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or len(arr) == 0 or arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a non-empty 1-D array of integer class labels")
    return arr.astype(np.int64)


def partition(
    labels: Sequence[int] | np.ndarray,
    num_partitions: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    ids: Sequence | np.ndarray | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split sample positions 0..N-1 among `num_partitions` clients.

    labels: (N,) integer class of each training sample.
    scheme:
      - "iid": a random equal split (sizes differ by at most one).
      - "dirichlet": for each class, client shares drawn from Dirichlet(alpha) (smaller alpha,
        more skew); every client gets at least min(10, N // (2 · num_partitions)) samples
        (flwr-datasets redraws otherwise, and after 10 draws a ValueError says whether
        fewer clients or a larger alpha would help), no self-balancing.
      - "shard": samples sorted by label and cut into shards of ⌊N / (P·S)⌋ samples, with
        P = num_partitions and S = shards_per_partition; each client gets S shards drawn at
        random (the MNIST personalization setting: 100 clients × 2 shards of 300). When P·S
        does not divide N there are more shards than P·S, and the samples of the shards not
        drawn (up to P·S − 1, anywhere in label order) are left out.
      - "natural": one client per distinct value of `ids` (FEMNIST writers, N values). With
        fewer partitions than distinct ids, a random selection of `num_partitions` ids (drawn
        with `seed`, kept in sorted-id order) is used and the other ids' samples are left out.
    `ids` is read only by "natural". The same arguments always give the same split.
    Returns a list of `num_partitions` int64 arrays of positions into `labels`, pairwise disjoint.
    """
    labels = _as_labels(labels)
    n = len(labels)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if not isinstance(num_partitions, (int, np.integer)) or not 1 <= num_partitions <= n:
        raise ValueError(
            f"num_partitions must be an integer in 1..{n} (the number of samples), "
            f"got {num_partitions!r}"
        )
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0 (the same seed, the same split), "
                         f"got {seed!r}")
    if not isinstance(shards_per_partition, (int, np.integer)) or shards_per_partition < 1:
        raise ValueError(
            f"shards_per_partition must be an integer >= 1, got {shards_per_partition!r}"
        )
    if scheme == "shard" and num_partitions * shards_per_partition > n:
        raise ValueError(
            f"num_partitions · shards_per_partition must be <= {n} (the number of "
            f"samples), got {num_partitions} · {shards_per_partition}"
        )
    num_partitions = int(num_partitions)
    codes = None
    if scheme == "natural":
        if ids is None or len(ids) != n:
            raise ValueError(
                "ids must give one id per sample (len(ids) == len(labels)) for scheme 'natural'"
            )
        # codes[i] = rank of sample i's id among the sorted distinct ids
        unique_ids, codes = np.unique(np.asarray(ids), return_inverse=True)
        if num_partitions > len(unique_ids):
            raise ValueError(
                f"num_partitions must be <= {len(unique_ids)} (the number of distinct "
                f"ids) for scheme 'natural', got {num_partitions}"
            )

    stored = _stored_split_path(labels, num_partitions, scheme, alpha, shards_per_partition,
                                ids, seed)
    if stored is not None and stored[0].exists():
        return _read_split(*stored, num_partitions)
    parts = _compute(labels, num_partitions, scheme, alpha, shards_per_partition, seed, codes)
    if stored is not None:
        _write_split(*stored, parts)
    return parts


def _compute(labels: np.ndarray, num_partitions: int, scheme: str, alpha: float,
             shards_per_partition: int, seed: int, codes: np.ndarray | None
             ) -> list[np.ndarray]:
    """`partition`'s split from flwr-datasets' partitioners (arguments already checked;
    `codes`: for "natural", each sample's id as its rank among the distinct ids)."""
    from datasets import Dataset
    from flwr_datasets import partitioner as fp

    n = len(labels)
    min_size = max(1, min(10, n // (2 * num_partitions)))  # "dirichlet"'s smallest client

    columns = {"label": labels, "position": np.arange(n)}
    if scheme == "natural":
        # choose the ids first, so the partitioner (a Python loop over rows) sees only their rows
        num_ids = int(codes.max()) + 1
        chosen = np.arange(num_ids)
        if num_partitions < num_ids:
            rng = np.random.default_rng(seed)
            chosen = np.sort(rng.choice(num_ids, num_partitions, replace=False))
        keep = np.isin(codes, chosen)
        columns = {"label": labels[keep], "position": np.flatnonzero(keep), "id": codes[keep]}
    table = Dataset.from_dict(columns)
    if scheme == "iid":
        # IidPartitioner cuts the rows into contiguous blocks; shuffling first makes it random
        table = table.shuffle(seed=seed)
        part = fp.IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        part = fp.DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    elif scheme == "shard":
        part = fp.ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_shards_per_partition=int(shards_per_partition),
            shuffle=True,
            seed=seed,
        )
    else:
        part = fp.NaturalIdPartitioner(partition_by="id")
    part.dataset = table

    with warnings.catch_warnings():
        # ShardPartitioner's sort triggers a pyarrow deprecation notice that is not ours to fix
        warnings.filterwarnings("ignore", category=FutureWarning, module="pyarrow")
        try:
            # read the positions through Arrow: the default Python-object column is 100× slower
            positions = [
                part.load_partition(i).with_format("arrow")["position"].to_numpy()
                for i in range(num_partitions)
            ]
        except ValueError as err:
            if scheme != "dirichlet" or "max number of attempts" not in str(err):
                raise
            raise _dirichlet_failed(labels, num_partitions, alpha, min_size) from err
    return [p.astype(np.int64) for p in positions]


def _dirichlet_failed(labels: np.ndarray, num_partitions: int, alpha: float,
                      min_size: int) -> ValueError:
    """The error for flwr-datasets giving up: 10 Dirichlet draws each left a client with fewer
    than `min_size` samples. Too many clients if even the limit of large alpha, every class
    cut into equal shares (rounded down as flwr-datasets does), leaves one that small."""
    counts = np.unique(labels, return_counts=True)[1]
    cuts = np.arange(num_partitions + 1)[:, None] * counts // num_partitions  # (P+1, classes)
    even_min = int(np.diff(cuts, axis=0).sum(axis=1).min())
    head = (f"scheme 'dirichlet' could not give each of num_partitions={num_partitions} clients "
            f"at least {min_size} of the {len(labels)} samples with alpha={alpha}")
    if even_min < min_size:
        return ValueError(f"{head}: too many clients for the samples (even equal shares of "
                          f"each class leave a client {even_min}), so raising alpha does not "
                          "help; use fewer clients")
    return ValueError(f"{head}: raise alpha (more even shares) or use fewer clients")


def _stored_split_path(labels: np.ndarray, num_partitions: int, scheme: str, alpha: float,
                       shards: int, ids, seed: int) -> tuple[Path, str] | None:
    """Where $FEDPARA_SPLITS keeps this split, and its digest (None when the variable is unset).

    The digest covers the arguments that shape the split (alpha only for "dirichlet", shards
    only for "shard", ids only for "natural") and the labels' and ids' values."""
    folder = os.environ.get(SPLITS_ENV)
    if not folder:
        return None
    arguments = {"format": 1, "scheme": scheme, "num_partitions": num_partitions, "seed": seed,
                 "alpha": float(alpha) if scheme == "dirichlet" else None,
                 "shards_per_partition": int(shards) if scheme == "shard" else None}
    digest = hashlib.sha256(json.dumps(arguments, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    if scheme == "natural":
        digest.update("\0".join(map(str, np.asarray(ids).tolist())).encode())
    hexdigest = digest.hexdigest()
    return Path(folder) / f"split-{scheme}-{num_partitions}-{hexdigest[:16]}.npz", hexdigest


def _write_split(path: Path, digest: str, parts: list[np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, positions=np.concatenate(parts),
             sizes=np.array([len(p) for p in parts], dtype=np.int64), digest=np.array(digest))
    write_atomic(path, buffer.getvalue())


def _read_split(path: Path, digest: str, num_partitions: int) -> list[np.ndarray]:
    try:
        with np.load(path) as stored:
            found = str(stored["digest"])
            if found == digest and len(stored["sizes"]) == num_partitions:
                return np.split(stored["positions"].astype(np.int64),
                                np.cumsum(stored["sizes"])[:-1])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise _unusable_split(path, f"does not read back ({err!r})") from err
    raise _unusable_split(path, f"does not hold the split its name promises (digest "
                                f"{found[:16]}…, expected {digest[:16]}…)")


def _unusable_split(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path} {problem}: delete it, and {SPLITS_ENV}'s folder will get it "
                      "recomputed")


def holdout_indices(
    train_labels: Sequence[int] | np.ndarray,
    partitions: Sequence[np.ndarray],
    test_labels: Sequence[int] | np.ndarray,
    *,
    ids: Sequence | np.ndarray | None = None,
    test_ids: Sequence | np.ndarray | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Each client's own held-out test samples, as positions into `test_labels`.

    With `ids` and `test_ids` (FEMNIST writers of the train and test samples): the test samples
    of the writers in the client's partition.
    Otherwise a disjoint share of the test set with the client's label mix: each class's test
    samples are shuffled (with `seed`) and cut among clients in proportion to how many training
    samples of that class each client holds (rounded down). When test and train have the same
    class balance, a client's share is thus |test| / |train held by all clients| × its train size,
    with the same label proportions as its training data.
    """
    train_labels = _as_labels(train_labels, "train_labels")
    test_labels = _as_labels(test_labels, "test_labels")
    parts = [np.asarray(p, dtype=np.int64) for p in partitions]
    if not parts:
        raise ValueError("partitions must hold at least one client")
    for p in parts:
        if p.ndim != 1 or (len(p) and (p.min() < 0 or p.max() >= len(train_labels))):
            raise ValueError(
                f"partitions must be 1-D arrays of positions in 0..{len(train_labels) - 1}"
            )
    if (ids is None) != (test_ids is None):
        raise ValueError("ids and test_ids must be given together (or neither)")

    if ids is not None:
        ids, test_ids = np.asarray(ids), np.asarray(test_ids)
        if len(ids) != len(train_labels) or len(test_ids) != len(test_labels):
            raise ValueError("ids must match train_labels and test_ids test_labels in length")
        return [np.flatnonzero(np.isin(test_ids, np.unique(ids[p]))) for p in parts]

    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    counts = np.stack(
        [np.bincount(train_labels[p], minlength=num_classes) for p in parts]
    )  # (K, C)
    rng = np.random.default_rng(seed)
    shares: list[list[np.ndarray]] = [[] for _ in parts]
    for c in range(num_classes):
        pool = rng.permutation(np.flatnonzero(test_labels == c))
        total = counts[:, c].sum()
        if total == 0:
            continue
        share = len(pool) * counts[:, c] // total  # (K,) each client's rounded-down share
        ends = np.cumsum(share)
        starts = ends - share
        for k in range(len(parts)):
            shares[k].append(pool[starts[k] : ends[k]])
    return [np.sort(np.concatenate(s)) if s else np.empty(0, np.int64) for s in shares]


def plot_label_distribution(
    partitions: Sequence[np.ndarray],
    labels: Sequence[int] | np.ndarray,
    *,
    num_classes: int | None = None,
    ax=None,
    title: str | None = None,
):
    """A stacked bar chart: one bar per client, its height the client's number of samples,
    split by class. Returns the matplotlib Figure.

    (flwr-datasets' `plot_label_distributions` wants a Partitioner, not index arrays, and
    pandas; this draws the same picture with matplotlib alone.)
    """
    import matplotlib.pyplot as plt

    labels = _as_labels(labels)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if num_classes < int(labels.max()) + 1:
        raise ValueError(
            f"num_classes must be > the largest label ({labels.max()}), got {num_classes}"
        )
    counts = np.stack(
        [
            np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=num_classes)
            for p in partitions
        ]
    )  # (clients, classes)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(partitions)), 3.5))
    cmap = plt.get_cmap(
        "tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "viridis"
    )
    colors = [
        cmap(c if num_classes <= 20 else c / max(1, num_classes - 1)) for c in range(num_classes)
    ]
    clients = np.arange(len(partitions))
    bottom = np.zeros(len(partitions))
    for c in range(num_classes):
        ax.bar(clients, counts[:, c], bottom=bottom, width=0.9, color=colors[c], label=str(c))
        bottom += counts[:, c]
    ax.set_xlabel("client")
    ax.set_ylabel("number of samples")
    if title:
        ax.set_title(title)
    if num_classes <= 20:
        ax.legend(
            title="class",
            fontsize="small",
            ncols=1 + num_classes // 11,
            bbox_to_anchor=(1.01, 1),
            loc="upper left",
        )
    else:
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, num_classes - 1))
        ax.figure.colorbar(sm, ax=ax, label="class")
    return ax.figure
