"""File source (CSV / TSV / JSONL / NPZ) and the shared offset bookkeeping."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from amstream.connectors.codec import BinaryCodec, CsvCodec, JsonCodec
from amstream.connectors.files import FileSource
from amstream.connectors.records import OffsetTracker, Record, decode_offsets, encode_offsets
from amstream.exceptions import ConfigError, DatasetError, OffsetError

RNG = np.random.default_rng(1)
X = RNG.standard_normal((25, 3)).astype(np.float32)
Y = RNG.integers(0, 4, 25)


def read_all(src, max_records=7):
    records = []
    while True:
        batch = src.next_batch(max_records=max_records)
        if not batch:
            return records
        assert len(batch) <= max_records
        records += batch


@pytest.fixture
def csv_path(tmp_path):
    path = tmp_path / "data.csv"
    lines = ["f0,f1,f2,label"] + [",".join([*("%.9g" % v for v in x), str(y)]) for x, y in zip(X, Y)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def jsonl_path(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(JsonCodec(3, 4).encode_many(X, Y)) + b"\n")
    return path


@pytest.fixture
def npz_path(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, X=X, y=Y)
    return path


@pytest.mark.parametrize("fixture", ["csv_path", "jsonl_path", "npz_path"])
def test_reads_every_row_with_row_offsets(fixture, request):
    path = request.getfixturevalue(fixture)
    src = FileSource(path, n_classes=4)
    records = read_all(src)
    assert [r.offset for r in records] == list(range(25))
    assert {(r.topic, r.partition) for r in records} == {(path.name, 0)}
    assert src.exhausted and src.snapshot() == {(path.name, 0): 25}
    assert src.lag() == {(path.name, 0): 0}
    assert src.codec.n_features == 3  # inferred
    batch = src.codec.decode_records(records)
    assert batch.rejections == []
    np.testing.assert_array_equal(batch.X, X)
    np.testing.assert_array_equal(batch.y, Y)
    src.close()


@pytest.mark.parametrize("fixture", ["csv_path", "jsonl_path", "npz_path"])
def test_seek_resumes_exactly_and_backwards(fixture, request):
    path = request.getfixturevalue(fixture)
    tp = (path.name, 0)
    src = FileSource(path, n_classes=4)
    first = src.next_batch(max_records=10)
    assert src.snapshot() == {tp: 10}
    assert src.lag() == {tp: 15}
    # a new source resumes from the checkpointed next row
    resumed = FileSource(path, n_classes=4)
    resumed.seek(src.snapshot())
    rest = read_all(resumed)
    assert [r.offset for r in rest] == list(range(10, 25))
    assert [r.value for r in first + rest] == [r.value for r in read_all(FileSource(path, n_classes=4))]
    # seeking backwards is explicit and allowed
    resumed.seek({tp: 3})
    assert [r.offset for r in resumed.next_batch(max_records=2)] == [3, 4]
    # closing and opening again continues where it was
    resumed.close()
    assert resumed.next_batch(max_records=1)[0].offset == 5
    # past the end: stays at the end
    resumed.seek({tp: 1000})
    assert resumed.next_batch() == [] and resumed.exhausted


def test_csv_header_label_by_name_blank_lines_and_bad_rows(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("label,a,b\n1,0.5,1.5\n\n2,x,1\n0,1,2\n9,1,2\n")
    src = FileSource(path, n_classes=3, label_column="label")
    records = read_all(src)
    assert [r.offset for r in records] == [0, 2, 3, 4]  # the blank line keeps its row index
    assert src.snapshot() == {("rows.csv", 0): 5}
    batch = src.codec.decode_records(records)
    np.testing.assert_array_equal(batch.X, [[0.5, 1.5], [1, 2]])
    assert batch.y.tolist() == [1, 0]
    assert [(records[r.index].offset, r.reason) for r in batch.rejections] == [
        (2, "non_numeric"),
        (4, "label_out_of_range"),
    ]


def test_csv_without_header_or_label_and_tsv(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("1,2\n3,4\n")
    src = FileSource(path, label_column=None, require_label=False)
    assert isinstance(src.codec, CsvCodec) and src.codec.n_features == 2
    batch = src.codec.decode_records(read_all(src))
    np.testing.assert_array_equal(batch.X, [[1, 2], [3, 4]])
    tsv = tmp_path / "t.tsv"
    tsv.write_text("a\tb\ty\n1\t2\t0\n")
    batch = FileSource(tsv, n_classes=2).codec.decode_records(read_all(FileSource(tsv, n_classes=2)))
    np.testing.assert_array_equal(batch.X, [[1, 2]])


def test_jsonl_bad_lines_are_rejected_not_fatal(tmp_path):
    path = tmp_path / "mixed.ndjson"
    lines = [b'{"x": [1, 2], "y": 1, "key": "a"}', b"not json", b'{"x": [1], "y": 1}', b'{"x": [3, 4], "y": 0}']
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    src = FileSource(path, n_classes=2)
    records = read_all(src)
    batch = src.codec.decode_records(records)
    np.testing.assert_array_equal(batch.X, [[1, 2], [3, 4]])
    assert batch.keys == [b"a", None]
    assert [(r.index, r.reason) for r in batch.rejections] == [(1, "malformed"), (2, "feature_count")]


def test_npz_float_labels_and_missing_labels(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, X=np.zeros((3, 2)), y=np.array([1.0, 0.5, 2.0]))
    src = FileSource(path, n_classes=3)
    assert isinstance(src.codec, BinaryCodec)
    batch = src.codec.decode_records(read_all(src))
    assert batch.y.tolist() == [1, 2] and [r.reason for r in batch.rejections] == ["unknown_label"]
    unlabelled = tmp_path / "u.npz"
    np.savez(unlabelled, features=np.ones((2, 2)))
    src = FileSource(unlabelled, x_key="features", n_classes=3, require_label=False)
    batch = src.codec.decode_records(read_all(src))
    assert len(batch) == 2 and not batch.labelled.any()


def test_errors(tmp_path, csv_path):
    with pytest.raises(DatasetError, match=re.escape(f"input file `{tmp_path / 'nope.csv'}` does not exist")):
        FileSource(tmp_path / "nope.csv").next_batch()
    with pytest.raises(ConfigError, match=re.escape("cannot tell the format of")):
        FileSource(tmp_path / "data.parquet")
    with pytest.raises(ConfigError, match=re.escape("unknown file format `xls`")):
        FileSource(csv_path, format="xls")
    with pytest.raises(ConfigError, match=re.escape("`label_column='y'` is not a column of")):
        FileSource(csv_path, label_column="y").open()
    headerless = tmp_path / "h.csv"
    headerless.write_text("1,2,0\n")
    with pytest.raises(ConfigError, match=re.escape("`label_column='y'` is a name, but")):
        FileSource(headerless, label_column="y").open()
    npz = tmp_path / "a.npz"
    np.savez(npz, A=np.zeros((2, 2)))
    with pytest.raises(ConfigError, match=re.escape("has no array `X` (arrays: `A`); pass `x_key=`")):
        FileSource(npz).open()
    src = FileSource(csv_path)
    with pytest.raises(OffsetError, match=re.escape("cannot seek `other:0`: this source has only `data.csv:0`")):
        src.seek({("other", 0): 1})
    with pytest.raises(OffsetError, match=re.escape("offset of `data.csv:0` must be an int >= 0, got `-1`")):
        src.seek({("data.csv", 0): -1})


def test_commit_never_goes_backwards(csv_path):
    src = FileSource(csv_path, n_classes=4)
    src.next_batch(max_records=5)
    assert src.commit() is True
    with pytest.raises(OffsetError, match=re.escape("commit of `data.csv:0` went backwards: `2` after `5`")):
        src.commit({("data.csv", 0): 2})
    src.seek({("data.csv", 0): 2})  # an explicit rewind resets the check
    assert src.commit() is True


# ---- records.py ----------------------------------------------------------------------------------
def test_offset_tracker():
    t = OffsetTracker()
    t.advance(("a", 0), 5)
    t.advance(("a", 0), 9)  # gaps are fine
    assert t.snapshot() == {("a", 0): 10}
    with pytest.raises(OffsetError, match=re.escape("offset of `a:0` went backwards: got `9`, expected at least `10`")):
        t.advance(("a", 0), 9)
    t.reset(("a", 0), 3)
    t.advance(("a", 0), 3)
    t.mark_committed({("a", 0): 4})
    with pytest.raises(OffsetError, match=re.escape("commit of `a:0` went backwards: `3` after `4`")):
        t.check_commit({("a", 0): 3})
    t.forget([("a", 0)])
    assert t.snapshot() == {} and t.committed() == {}


def test_offsets_encoding_round_trip():
    offsets = {("samples.v1", 0): 3, ("samples.v1", 11): 0, ("x:y", 2): 5}
    encoded = encode_offsets(offsets)
    assert json.loads(json.dumps(encoded)) == encoded
    assert encoded["samples.v1:11"] == 0
    assert decode_offsets(encoded) == offsets
    with pytest.raises(OffsetError, match=re.escape("malformed offsets key `nopartition`")):
        decode_offsets({"nopartition": 1})
    assert Record("t", 0, 41, None, b"").next_offset == 42
