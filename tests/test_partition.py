"""Federated splits: properties of each scheme, stored splits, per-client held-out data, the
label plot."""

from __future__ import annotations

import re

import matplotlib
import numpy as np
import pytest

from fedpara.partition import SCHEMES, holdout_indices, partition, plot_label_distribution

matplotlib.use("Agg")

# 10 classes × 600 samples in random order, like a small MNIST; writers of 20-60 samples each
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 600))
WRITERS = np.repeat(
    [f"w{i:02d}" for i in range(40)],
    np.random.default_rng(1).multinomial(6000 - 40 * 20, np.full(40, 1 / 40)) + 20,
)


def split(scheme, num_partitions=20, **kwargs):
    if scheme == "natural":
        kwargs.setdefault("ids", WRITERS)
    return partition(LABELS, num_partitions, scheme, **kwargs)


def label_mix(labels, idx, num_classes=10):
    return np.bincount(labels[idx], minlength=num_classes) / max(1, len(idx))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partitions_are_disjoint_int_arrays_and_reproducible(scheme):
    parts = split(scheme, seed=3)
    assert len(parts) == 20
    assert all(p.dtype == np.int64 and p.ndim == 1 and len(p) > 0 for p in parts)
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == len(everything)  # disjoint
    assert everything.min() >= 0 and everything.max() < len(LABELS)
    again = split(scheme, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = split(scheme, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shard"])
def test_label_schemes_cover_every_sample(scheme):
    assert np.array_equal(np.sort(np.concatenate(split(scheme))), np.arange(len(LABELS)))


def test_iid_sizes_differ_by_at_most_one_and_mix_all_labels():
    parts = partition(LABELS[:5003], 7, "iid")
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 5003 and max(sizes) - min(sizes) <= 1
    for p in parts:
        assert np.abs(label_mix(LABELS, p) - 0.1).max() < 0.05


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_dirichlet_alpha_controls_label_skew():
    def mean_entropy(parts):
        mixes = np.stack([label_mix(LABELS, p) for p in parts])
        return -(mixes * np.log(np.where(mixes > 0, mixes, 1))).sum(1).mean()

    skewed, mild = split("dirichlet", alpha=0.1), split("dirichlet", alpha=100.0)
    assert mean_entropy(skewed) < 1.5 < 2.2 < mean_entropy(mild)  # log(10) = 2.30
    assert all(len(p) >= 10 for p in skewed)


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_dirichlet_split_is_not_self_balanced():
    """Self-balancing stops giving a client samples once it holds N / P (here 300), so no client
    could end with more than 300 + 600 (one whole class); without it a skewed draw can."""
    assert max(len(p) for p in split("dirichlet", alpha=0.1, seed=1)) > 900


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_a_different_scheme_or_alpha_never_gives_the_same_split():
    """The baseline's defect 2: its IID runs reused the cached non-IID split."""
    iid, dir05, dir01 = split("iid"), split("dirichlet", alpha=0.5), split("dirichlet", alpha=0.1)
    for a, b in ((iid, dir05), (dir05, dir01), (iid, dir01)):
        assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_shards_follow_the_mnist_personalization_setting():
    # 6000 samples, 10 clients × 2 shards of 300: each shard lies inside one class
    parts = split("shard", num_partitions=10, shards_per_partition=2)
    assert [len(p) for p in parts] == [600] * 10
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)
    assert split("shard", num_partitions=5, shards_per_partition=4)[0].size == 1200
    # P · S = N is allowed: shards of one sample each
    assert [len(p) for p in partition(LABELS[:40], 20, "shard", shards_per_partition=2)] == [2] * 20


def test_natural_split_gives_each_client_one_writer():
    parts = split("natural", num_partitions=40)
    writers = [np.unique(WRITERS[p]) for p in parts]
    assert all(len(w) == 1 for w in writers)
    assert [w[0] for w in writers] == sorted(np.unique(WRITERS))
    assert all(len(p) == (WRITERS == w[0]).sum() for p, w in zip(parts, writers, strict=True))


def test_natural_split_with_fewer_clients_takes_a_seeded_selection_of_writers():
    chosen = [str(WRITERS[p[0]]) for p in split("natural", num_partitions=8, seed=0)]
    assert len(set(chosen)) == 8 and chosen == sorted(chosen)
    assert chosen == [str(WRITERS[p[0]]) for p in split("natural", num_partitions=8, seed=0)]
    assert chosen != [str(WRITERS[p[0]]) for p in split("natural", num_partitions=8, seed=1)]


def test_ids_are_ignored_by_label_schemes():
    with_ids = partition(LABELS, 5, "iid", ids=WRITERS, seed=2)
    without = partition(LABELS, 5, "iid", seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(with_ids, without, strict=True))


# stored splits ($FEDPARA_SPLITS) ---------------------------------------------------------------


@pytest.mark.parametrize("scheme, kwargs", [
    ("dirichlet", {"alpha": 0.3}), ("shard", {"shards_per_partition": 3}), ("natural", {}),
    ("iid", {}),
])
def test_a_stored_split_is_the_computed_one_and_is_read_back_without_flwr_datasets(
        tmp_path, monkeypatch, scheme, kwargs):
    import fedpara.partition as module

    computed = split(scheme, seed=4, **kwargs)
    monkeypatch.setenv("FEDPARA_SPLITS", str(tmp_path))
    stored = split(scheme, seed=4, **kwargs)
    [path] = tmp_path.glob(f"split-{scheme}-20-*.npz")

    def unavailable(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'flwr_datasets'")

    monkeypatch.setattr(module, "_compute", unavailable)  # a machine without flwr-datasets
    read = split(scheme, seed=4, **kwargs)
    for a, b, c in zip(computed, stored, read, strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c) and c.dtype == np.int64
    with pytest.raises(ModuleNotFoundError):  # anything else is still computed
        split(scheme, seed=5, **kwargs)


def test_a_stored_split_is_never_reused_for_other_arguments_or_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPARA_SPLITS", str(tmp_path))
    first = split("dirichlet", alpha=0.5, seed=0)
    split("dirichlet", alpha=0.3, seed=0)
    split("dirichlet", alpha=0.5, seed=1)
    split("dirichlet", alpha=0.5, seed=0, num_partitions=19)
    other = partition(np.roll(LABELS, 1), 20, "dirichlet", alpha=0.5, seed=0)
    split("dirichlet", alpha=0.5, seed=0, shards_per_partition=5)  # shards: not a dirichlet arg
    assert len(list(tmp_path.glob("split-*.npz"))) == 5
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_a_stored_natural_split_is_never_reused_for_other_writers(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPARA_SPLITS", str(tmp_path))
    split("natural", num_partitions=40)
    others = np.roll(WRITERS, 100)  # the same labels, each sample by another writer
    parts = partition(LABELS, 40, "natural", ids=others)
    assert len(list(tmp_path.glob("split-natural-40-*.npz"))) == 2
    assert all(len(np.unique(others[p])) == 1 for p in parts)


def test_a_stored_file_that_does_not_match_its_name_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPARA_SPLITS", str(tmp_path))
    split("dirichlet", alpha=0.5, seed=0)
    [a] = tmp_path.glob("split-*.npz")
    split("dirichlet", alpha=0.3, seed=0)
    [b] = set(tmp_path.glob("split-*.npz")) - {a}
    b.write_bytes(a.read_bytes())  # another split's file under this split's name
    with pytest.raises(ValueError, match="does not hold the split its name promises.*delete it"):
        split("dirichlet", alpha=0.3, seed=0)


@pytest.mark.parametrize("damage", [
    lambda path: path.write_bytes(path.read_bytes()[:100]),  # cut short
    lambda path: path.write_bytes(b""),
])
def test_a_stored_file_that_does_not_read_back_names_it(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("FEDPARA_SPLITS", str(tmp_path))
    split("dirichlet", alpha=0.5, seed=0)
    [path] = tmp_path.glob("split-*.npz")
    damage(path)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} does not read back.*delete it"):
        split("dirichlet", alpha=0.5, seed=0)


def test_partition_of_real_fashion_mnist(fmnist):
    train, test = fmnist
    parts = partition(train.labels, 100, "dirichlet", alpha=0.5, seed=0)
    assert sum(len(p) for p in parts) == 60_000
    held = holdout_indices(train.labels, parts, test.labels, seed=0)
    assert sum(len(h) for h in held) > 9_500  # all but rounding leftovers of the 10,000


# bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(scheme="pathological"),
            r"scheme must be one of \('iid', 'dirichlet', 'shard', 'natural'\)",
        ),
        (dict(alpha=0.0), "alpha must be a finite number > 0"),
        (dict(alpha=-1.0), "alpha must be a finite number > 0"),
        (dict(alpha=float("nan")), "alpha must be a finite number > 0"),
        (dict(alpha=float("inf")), "alpha must be a finite number > 0"),
        (dict(num_partitions=0), r"num_partitions must be an integer in 1\.\.6000"),
        (dict(num_partitions=6001), r"num_partitions must be an integer in 1\.\.6000"),
        (dict(num_partitions=2.5), "num_partitions must be an integer"),
        (dict(shards_per_partition=0), "shards_per_partition must be an integer >= 1"),
        # the seed fixes the split: refused by name, not by numpy, and never None (a new split
        # on every call)
        (dict(seed=-1), "seed must be an integer >= 0"),
        (dict(seed=1.5), "seed must be an integer >= 0"),
        (dict(seed=None), "seed must be an integer >= 0"),
        (dict(seed=True), "seed must be an integer >= 0"),
        (
            dict(scheme="shard", num_partitions=3000, shards_per_partition=3),
            "num_partitions · shards_per_partition must be <= 6000",
        ),
        (dict(scheme="natural"), "ids must give one id per sample"),
        (dict(scheme="natural", ids=WRITERS[:10]), "ids must give one id per sample"),
        (
            dict(scheme="natural", ids=WRITERS, num_partitions=41),
            r"num_partitions must be <= 40 \(the number of distinct ids\)",
        ),
    ],
)
def test_bad_partition_arguments_name_the_parameter(kwargs, match):
    args = dict(labels=LABELS, num_partitions=10, scheme="iid") | kwargs
    with pytest.raises(ValueError, match=match):
        partition(**args)


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
@pytest.mark.parametrize("alpha", [0.5, 1000.0])
def test_too_many_dirichlet_clients_for_the_samples_says_to_use_fewer(alpha):
    with pytest.raises(ValueError) as err:
        split("dirichlet", num_partitions=1000, alpha=alpha)
    msg = str(err.value)
    assert "num_partitions=1000 clients at least 3 of the 6000 samples" in msg
    assert f"alpha={alpha}" in msg and "too many clients for the samples" in msg
    assert "raising alpha does not help; use fewer clients" in msg
    assert "max number of attempts" in str(err.value.__cause__)


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_too_small_dirichlet_alpha_says_to_raise_it():
    with pytest.raises(ValueError) as err:
        split("dirichlet", num_partitions=20, alpha=0.001)
    msg = str(err.value)
    assert "num_partitions=20 clients at least 10 of the 6000 samples with alpha=0.001" in msg
    assert "raise alpha" in msg and "too many clients" not in msg


@pytest.mark.parametrize("min_size, advice", [
    (8, "raise alpha"), (9, "raise alpha"), (10, "too many clients")])
def test_dirichlet_advice_turns_at_the_smallest_equal_share(min_size, advice):
    """3 classes of 7 over 2 clients: flwr-datasets' rounded-down equal shares give each class
    3 and 4, so the smaller client holds 9. A client may hold exactly the minimum, so for a
    minimum of 9 more even shares (a larger alpha) can still succeed; for 10 they cannot."""
    from fedpara.partition import _dirichlet_failed

    labels = np.repeat(np.arange(3), 7)
    message = str(_dirichlet_failed(labels, 2, 0.01, min_size))
    assert f"at least {min_size} of the 21 samples with alpha=0.01" in message
    assert advice in message
    if advice == "raise alpha":
        assert "too many clients" not in message
    else:
        assert "equal shares of each class leave a client 9), so raising alpha does not help" \
            in message


@pytest.mark.parametrize("labels", [[], [[0, 1], [1, 0]], [0.5, 1.5], ["a", "b"]])
def test_bad_labels(labels):
    with pytest.raises(ValueError, match="labels must be a non-empty 1-D array of integer"):
        partition(labels, 1, "iid")


# held-out data per client


def test_holdout_is_disjoint_and_follows_each_clients_label_mix():
    test_labels = np.random.default_rng(5).permutation(np.repeat(np.arange(10), 100))
    parts = split("dirichlet", num_partitions=10, alpha=0.3)
    held = holdout_indices(LABELS, parts, test_labels, seed=0)
    everything = np.concatenate(held)
    assert len(np.unique(everything)) == len(everything)
    for p, h in zip(parts, held, strict=True):
        # test : train is 1 : 6 here, up to rounding down in each class
        assert len(p) / 6 - 10 <= len(h) <= len(p) / 6
        assert np.abs(label_mix(test_labels, h) - label_mix(LABELS, p)).max() < 0.05


def test_holdout_of_shard_clients_has_only_their_classes():
    test_labels = np.repeat(np.arange(10), 100)
    parts = split("shard", num_partitions=10, shards_per_partition=2)
    held = holdout_indices(LABELS, parts, test_labels)
    for p, h in zip(parts, held, strict=True):
        assert set(test_labels[h]) == set(LABELS[p]) and len(h) == 100


def test_holdout_is_reproducible_and_seeded():
    test_labels = np.repeat(np.arange(10), 100)
    parts = split("iid", num_partitions=4)
    a, b = (
        holdout_indices(LABELS, parts, test_labels, seed=0),
        holdout_indices(LABELS, parts, test_labels, seed=0),
    )
    c = holdout_indices(LABELS, parts, test_labels, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_holdout_by_writer_takes_the_same_writers_test_samples():
    test_writers = np.array(["w01", "w02", "w02", "w07", "w39", "w01", "zz"])
    test_labels = np.arange(7) % 10
    parts = split("natural", num_partitions=40)  # client k holds writer w{k:02d}
    held = holdout_indices(LABELS, parts, test_labels, ids=WRITERS, test_ids=test_writers)
    assert held[1].tolist() == [0, 5] and held[2].tolist() == [1, 2]
    assert held[7].tolist() == [3] and held[39].tolist() == [4] and len(held[0]) == 0
    # a client holding two writers' samples gets both writers' test samples
    both = holdout_indices(LABELS, [np.concatenate([parts[1], parts[2]])], test_labels,
                           ids=WRITERS, test_ids=test_writers)
    assert both[0].tolist() == [0, 1, 2, 5]


def test_femnist_clients_are_writers_with_their_own_test_samples(fake_femnist_dir):
    from fedpara.data import load_dataset

    train, test = load_dataset("femnist", data_dir=fake_femnist_dir, download=False)
    parts = partition(train.labels, 5, "natural", ids=train.writer_ids, seed=0)
    held = holdout_indices(
        train.labels, parts, test.labels, ids=train.writer_ids, test_ids=test.writer_ids
    )
    for p, h in zip(parts, held, strict=True):
        (writer,) = np.unique(train.writer_ids[p])
        assert len(p) == (train.writer_ids == writer).sum() == 23  # 25 samples, 2 held out
        assert h.tolist() == np.flatnonzero(test.writer_ids == writer).tolist() and len(h) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ids=WRITERS), "ids and test_ids must be given together"),
        (dict(test_ids=np.array(["w01"])), "ids and test_ids must be given together"),
        (dict(ids=WRITERS[:5], test_ids=np.array(["w01"] * 100)), "ids must match"),
        (
            dict(partitions=[np.array([0, 6000])]),
            r"partitions must be 1-D arrays of positions in 0\.\.5999",
        ),
        (dict(partitions=[]), "partitions must hold at least one client"),
        (dict(test_labels=np.array([])), "test_labels must be a non-empty"),
    ],
)
def test_bad_holdout_arguments(kwargs, match):
    args = (
        dict(
            train_labels=LABELS,
            partitions=[np.arange(10)],
            test_labels=np.repeat(np.arange(10), 10),
        )
        | kwargs
    )
    with pytest.raises(ValueError, match=match):
        holdout_indices(**args)


# the plot


def test_plot_label_distribution_stacks_class_counts_per_client():
    parts = split("shard", num_partitions=6, shards_per_partition=2)
    fig = plot_label_distribution(parts, LABELS, title="shards")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "client" and ax.get_ylabel() == "number of samples"
    assert ax.get_title() == "shards"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [str(c) for c in range(10)]
    heights = np.zeros(6)
    for bar in ax.patches:
        heights[round(bar.get_x() + bar.get_width() / 2)] += bar.get_height()
    assert heights.tolist() == [len(p) for p in parts]


def test_plot_label_distribution_many_classes_uses_a_colorbar():
    labels = np.arange(620) % 62
    fig = plot_label_distribution([np.arange(300), np.arange(300, 620)], labels)
    assert fig.axes[0].get_legend() is None and len(fig.axes) == 2  # plot + colorbar
    with pytest.raises(ValueError, match="num_classes"):
        plot_label_distribution([np.arange(10)], labels, num_classes=10)
