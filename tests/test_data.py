"""experiments.common.data on small synthetic IDX files: no real data set and no network needed."""
from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.common import data


N_TRAIN, N_TEST = 7, 3


def _make_split(raw: Path, prefix: str, n: int, seed: int, gz: bool):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    suffix = ".gz" if gz else ""
    data.write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", images)
    data.write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


def _make_root(root: Path, folder: str = "MNIST", gz: bool = True):
    raw = root / folder / "raw"
    return {"train": _make_split(raw, "train", N_TRAIN, 1, gz), "test": _make_split(raw, "t10k", N_TEST, 2, gz)}


def _snapshot(root: Path):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def _set_mode(root: Path, dir_mode: int):
    for p in [root, *root.rglob("*")]:
        if p.is_dir():
            p.chmod(dir_mode)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLASTIC_OPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PLASTIC_OPS_DATA", raising=False)


def _check(images, labels, expected):
    exp_x, exp_y = expected
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.shape == (len(exp_y), 1, 28, 28) and labels.shape == (len(exp_y),)
    assert 0.0 <= images.min() and images.max() <= 1.0
    torch.testing.assert_close(images, torch.from_numpy(exp_x).float().div(255).unsqueeze(1))
    assert labels.tolist() == exp_y.astype(np.int64).tolist()


def test_resolve_data_root(tmp_path, monkeypatch):
    assert data.resolve_data_root(str(tmp_path)) == tmp_path
    assert data.resolve_data_root(None) == Path("data")
    monkeypatch.setenv("PLASTIC_OPS_DATA", str(tmp_path / "env"))
    assert data.resolve_data_root() == tmp_path / "env"
    assert data.resolve_data_root(tmp_path / "explicit") == tmp_path / "explicit"  # the argument wins


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "extracted"])
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_load_both_layouts(tmp_path, gz, name, folder):
    root = tmp_path / "root"
    expected = _make_root(root, folder, gz=gz)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x, y = data.load_dataset(name, split, root=str(root), download=False)
        assert len(y) == n
        _check(x, y, expected[split])


def test_env_root_is_used(tmp_path, monkeypatch):
    root = tmp_path / "envroot"
    expected = _make_root(root)
    monkeypatch.setenv("PLASTIC_OPS_DATA", str(root))
    _check(*data.load_dataset("mnist", "test", download=False), expected["test"])


def test_writable_root_extracts_in_place(tmp_path):
    root = tmp_path / "root"
    _make_root(root)
    data.load_dataset("mnist", "train", root=root, download=False)
    assert (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()  # as torchvision would
    assert not (tmp_path / "cache").exists()


def test_read_only_root_uses_cache(tmp_path):
    root = tmp_path / "ro"
    expected = _make_root(root)
    _set_mode(root, 0o555)
    try:
        before = _snapshot(root)
        x, y = data.load_dataset("mnist", "train", root=root, download=False)
        _check(x, y, expected["train"])
        assert _snapshot(root) == before, "a read-only root must never be written to"
        cached = list((tmp_path / "cache").rglob("train-images-idx3-ubyte"))
        assert len(cached) == 1 and (cached[0].stat().st_mode & stat.S_IRGRP)
        # a second load reads the extracted copy and still gives the same data
        _check(*data.load_dataset("mnist", "train", root=root, download=False), expected["train"])
        assert _snapshot(root) == before
    finally:
        _set_mode(root, 0o755)


def test_read_only_root_and_no_cache_parses_gz(tmp_path, monkeypatch):
    root = tmp_path / "ro"
    expected = _make_root(root)
    cache = tmp_path / "ro_cache"
    cache.mkdir()
    monkeypatch.setenv("PLASTIC_OPS_CACHE", str(cache / "sub"))
    _set_mode(root, 0o555)
    cache.chmod(0o555)
    try:
        _check(*data.load_dataset("mnist", "test", root=root, download=False), expected["test"])
        assert list(cache.iterdir()) == []
    finally:
        _set_mode(root, 0o755)
        cache.chmod(0o755)


def test_missing_files_error_says_where(tmp_path):
    root = tmp_path / "empty"
    with pytest.raises(FileNotFoundError) as info:
        data.load_dataset("fashion-mnist", "train", root=root, download=False)
    msg = str(info.value)
    assert str((root / "FashionMNIST" / "raw").resolve()) in msg
    assert "train-images-idx3-ubyte.gz" in msg and "train-labels-idx1-ubyte.gz" in msg
    assert not root.exists()


def test_missing_files_offline_download(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_reachable", lambda urls, timeout=3.0: False)
    root = tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match="not reachable") as info:
        data.load_dataset("mnist", "test", root=root, download=True)
    assert "t10k-images-idx3-ubyte.gz" in str(info.value)


def test_partial_files_error(tmp_path):
    root = tmp_path / "root"
    _make_root(root)
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.load_dataset("mnist", "test", root=root, download=False)


def test_corrupt_and_inconsistent_files(tmp_path):
    root = tmp_path / "root"
    _make_root(root, gz=False)
    raw = root / "MNIST" / "raw"
    data.write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(N_TEST + 1, np.uint8))
    with pytest.raises(ValueError, match="inconsistent"):
        data.load_dataset("mnist", "test", root=root, download=False)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(ValueError, match="IDX"):
        data.load_dataset("mnist", "test", root=root, download=False)
    head = (raw / "train-images-idx3-ubyte").read_bytes()[:100]
    (raw / "train-images-idx3-ubyte").write_bytes(head)
    with pytest.raises(ValueError, match="truncated"):
        data.load_dataset("mnist", "train", root=root, download=False)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown data set"):
        data.load_dataset("cifar10", "train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        data.load_dataset("mnist", "validation", root=tmp_path)
    assert data.dataset_files("fashion_mnist", "test") == ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def test_synthetic_dataset():
    x, y = data.synthetic_dataset(12, seed=3)
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1
    torch.testing.assert_close(x, data.synthetic_dataset(12, seed=3)[0])


def test_validation_split_is_the_end_of_the_training_file(tmp_path):
    """The validation images are the last n_val rows of the training file: disjoint from the training part
    and from the test file, and together with the training part the whole file, in order."""
    root = tmp_path / "root"
    expected = _make_root(root)
    x, y = data.load_dataset("mnist", "train", root=root, download=False)
    tx, _ = data.load_dataset("mnist", "test", root=root, download=False)
    train_x, train_y, val_x, val_y = data.split_validation(x, y, 2)
    assert len(train_x) == N_TRAIN - 2 and len(val_x) == 2
    _check(val_x, val_y, (expected["train"][0][-2:], expected["train"][1][-2:]))
    _check(train_x, train_y, (expected["train"][0][:-2], expected["train"][1][:-2]))
    rows = lambda t: {tuple(r.tolist()) for r in t.reshape(len(t), -1)}  # noqa: E731
    assert not rows(val_x) & rows(train_x) and not rows(val_x) & rows(tx)
    # the same split every time, labels optional
    again = data.split_validation(x, None, 2)
    assert torch.equal(again[2], val_x) and again[1] is None and again[3] is None
    assert data.VALIDATION_IMAGES == 5000


@pytest.mark.parametrize("n_val", [0, -1, N_TRAIN, N_TRAIN + 1, 2.5, True])
def test_validation_split_bad_size(n_val):
    x = torch.zeros(N_TRAIN, 1, 28, 28)
    with pytest.raises(ValueError, match="n_val"):
        data.split_validation(x, None, n_val)


def test_validation_split_label_mismatch():
    with pytest.raises(ValueError, match="labels"):
        data.split_validation(torch.zeros(5, 1, 28, 28), torch.zeros(4), 2)
