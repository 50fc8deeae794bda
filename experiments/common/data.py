"""Offline-first loading of MNIST and Fashion-MNIST, shared by all experiments.

The data root uses torchvision's layout::

    ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    ROOT/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]

Either the gzip files or the extracted ones are accepted. The IDX files are parsed here (a big-endian
header then raw bytes), so no checksum of torchvision's downloader is involved: any faithful copy of the
data works. When only .gz files are present they are extracted once, next to themselves when that
folder is writable, otherwise into a per-user cache (``$PLASTIC_OPS_CACHE``, else
``$XDG_CACHE_HOME/plastic_ops``, else ``~/.cache/plastic_ops``); a read-only root is never written to.
When the files are missing and ``download=True``, torchvision's downloader is tried (if its servers are
reachable); otherwise a FileNotFoundError says which files to put where.

    images, labels = load_dataset("mnist", "train")   # float32 (N, 1, 28, 28) in [0, 1], int64 (N,)
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

__all__ = ["DATASETS", "SPLITS", "resolve_data_root", "cache_dir", "load_dataset", "dataset_files",
           "read_idx", "write_idx", "synthetic_dataset",
           "VALIDATION_IMAGES", "split_validation"]

# name -> torchvision folder (and class name)
DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}
SPLITS = ("train", "test")
_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` when given, else ``$PLASTIC_OPS_DATA``, else ``./data``."""
    if root is None or str(root) == "":
        root = os.environ.get("PLASTIC_OPS_DATA") or "data"
    return Path(root).expanduser()


def cache_dir() -> Path:
    """Writable place for extracted files when the data root is read-only."""
    if os.environ.get("PLASTIC_OPS_CACHE"):
        return Path(os.environ["PLASTIC_OPS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base).expanduser() / "plastic_ops"


def _canonical(name: str) -> str:
    key = name.lower().strip()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(DATASETS)}")
    return key


def dataset_files(name: str, split: str) -> tuple[str, str]:
    """The (images, labels) file names of a split, without the .gz suffix."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _canonical(name)
    p = _PREFIX[split]
    return f"{p}-images-idx3-ubyte", f"{p}-labels-idx1-ubyte"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (plain or .gz): magic 0x0000 <type> <ndim>, ndim big-endian uint32 sizes, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: truncated or corrupt IDX file ({len(data)} bytes, header says {expected})")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (gzip-compressed when the name ends in .gz); for tests and tools."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes() + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)
    return path


def _writable(folder: Path) -> bool:
    """May we create files in folder? A folder without write permission bits counts as read-only even for
    the superuser (who would bypass them): a data root marked read-only is never written to. The probe
    with a real file catches read-only mounts, where os.access can answer yes."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        mode = probe.stat().st_mode
    except OSError:
        return False
    if not os.access(probe, os.W_OK | os.X_OK) or not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
        return True
    except OSError:
        return False


def _cache_raw_dir(root: Path, folder: str) -> Path:
    # one cache folder per data root, so two different roots never share extracted files
    tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "data" / tag / folder / "raw"


def _extract(gz: Path, dest: Path) -> None:
    """Decompress atomically (temporary file then rename): concurrent loaders never see a partial file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(gz, "rb") as src:
            shutil.copyfileobj(src, out, length=1 << 20)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _locate(root: Path, folder: str, fname: str) -> Path | None:
    """Path of a readable IDX file for fname, extracting a .gz into a writable place when needed."""
    raw = root / folder / "raw"
    cached = _cache_raw_dir(root, folder) / fname
    plain, gz = raw / fname, raw / (fname + ".gz")
    if plain.is_file():
        return plain
    if cached.is_file() and (not gz.is_file() or cached.stat().st_mtime >= gz.stat().st_mtime):
        return cached
    if gz.is_file():
        for dest in (plain, cached):
            if _writable(dest.parent):
                try:
                    _extract(gz, dest)
                    return dest
                except OSError:
                    continue
        return gz  # nowhere to write: parse the .gz in memory every time
    return None


def _missing_message(root: Path, folder: str, names: list[str], reason: str) -> str:
    lines = [f"{folder} not found under the data root {root.resolve()} ({reason}).",
             f"Put these files (the .gz downloads or their extracted versions) in {(root / folder / 'raw').resolve()}/:"]
    lines += [f"    {n}.gz  (or {n})" for n in names]
    lines.append("or pass another root with --data-root / the PLASTIC_OPS_DATA environment variable, "
                 "or allow download=True with network access.")
    return "\n".join(lines)


def _reachable(urls, timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine fails in seconds instead of waiting on download retries."""
    for url in urls:
        host = urlparse(url).hostname
        if not host:
            continue
        try:
            with socket.create_connection((host, 443 if url.startswith("https") else 80), timeout=timeout):
                return True
        except OSError:
            continue
    return False


def _download(root: Path, folder: str) -> Path:
    """Download with torchvision into root (or the cache when root is read-only); returns the raw folder."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, folder)
    if not _reachable(getattr(cls, "mirrors", [])):
        raise OSError("the download servers are not reachable")
    target = root if _writable(root / folder / "raw") else _cache_raw_dir(root, folder).parent.parent
    for train in (True, False):
        cls(str(target), train=train, download=True)
    return target / folder / "raw"


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None,
                 download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST or Fashion-MNIST.

    Args:
        name: "mnist" or "fashion-mnist".
        split: "train" or "test".
        root: data root in torchvision's layout; see :func:`resolve_data_root` for the default.
        download: when the files are missing, try torchvision's download (needs network access).

    Returns:
        images, float32 (N, 1, 28, 28) in [0, 1], and labels, int64 (N,).

    Raises:
        FileNotFoundError: the files are missing and could not be downloaded; the message says where
            to put which files. ValueError: a file is not a valid IDX file or the two disagree.
    """
    key = _canonical(name)
    folder = DATASETS[key]
    root = resolve_data_root(root)
    names = list(dataset_files(key, split))
    paths = [_locate(root, folder, n) for n in names]
    if any(p is None for p in paths):
        missing = [n for n, p in zip(names, paths) if p is None]
        if not download:
            raise FileNotFoundError(_missing_message(root, folder, missing, "download=False"))
        try:
            raw = _download(root, folder)
        except Exception as exc:  # offline, server error, ...: the user needs the file list, not a traceback
            raise FileNotFoundError(_missing_message(root, folder, missing, f"download failed: {exc}")) from exc
        paths = [raw / n for n in names]
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder} {split}: inconsistent files {paths[0]} {images.shape} and "
                         f"{paths[1]} {labels.shape}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def synthetic_dataset(n: int, seed: int = 0, size: int = 28, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Small MNIST-like stand-in for tests and smoke runs: a blurred stroke pattern per class plus noise,
    float32 (n, 1, size, size) in [0, 1] and int64 labels. Needs no files."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(classes, 1, size, size, generator=g) > 0.8).float()
    protos = torch.nn.functional.avg_pool2d(protos, 3, stride=1, padding=1)
    protos = protos / protos.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    labels = torch.randint(0, classes, (n,), generator=g)
    images = (protos[labels] + 0.1 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1)
    return images, labels


# The validation split: the last VALIDATION_IMAGES images of the training file, always the same ones, so that
# every model-selection choice is made without the test set and a run's split depends on nothing else.
VALIDATION_IMAGES = 5000


def split_validation(images: torch.Tensor, labels: torch.Tensor | None = None, n_val: int = VALIDATION_IMAGES):
    """Carve a validation split out of a training set: its last n_val images (fixed, not shuffled).

    Returns (train_images, train_labels, val_images, val_labels) (labels None when not given); the two parts
    are disjoint and together are the whole training set, in order. Raises ValueError naming n_val when it
    does not leave at least one training image.
    """
    n = images.shape[0]
    if isinstance(n_val, bool) or not isinstance(n_val, int) or not 0 < n_val < n:
        raise ValueError(f"n_val must be an integer in [1, {n - 1}] (the training set has {n} images), got {n_val!r}")
    if labels is not None and labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries, images has {n}")
    cut = n - n_val
    if labels is None:
        return images[:cut], None, images[cut:], None
    return images[:cut], labels[:cut], images[cut:], labels[cut:]
