"""Codecs: round trips, and every rejection reason with its message."""
from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest

from amstream.connectors.codec import (
    REASONS,
    AutoCodec,
    BinaryCodec,
    CsvCodec,
    JsonCodec,
    encode_binary_rows,
    make_codec,
)
from amstream.exceptions import ConfigError, DecodeError

D = 5
RNG = np.random.default_rng(0)
X = RNG.standard_normal((64, D)).astype(np.float32) * np.float32(10.0) ** RNG.integers(-30, 30, (64, D)).astype(np.float32)
Y = RNG.integers(0, 3, 64)
CODECS = [BinaryCodec, JsonCodec, CsvCodec, AutoCodec]


def binary_message(x, *, kind=1, label=0, n=None, magic=b"AMS", version=1, reserved=b"\0\0\0"):
    x = np.asarray(x, dtype="<f4")
    n = len(x) if n is None else n
    label_bits = struct.pack("<d", label) if kind == 2 else struct.pack("<q", int(label))
    return magic + bytes([version, kind]) + reserved + struct.pack("<I", n) + label_bits + x.tobytes()


def reasons(batch):
    return [(r.index, r.reason) for r in batch.rejections]


# ---- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CODECS)
def test_round_trip_classes(cls):
    codec = cls(D, 3)
    batch = codec.decode_many(codec.encode_many(X, Y))
    assert batch.rejections == []
    assert batch.X.dtype == np.float32 and batch.X.flags.c_contiguous
    np.testing.assert_array_equal(batch.X, X)  # bit-exact, JSON/CSV included
    assert batch.y.dtype == np.int64
    np.testing.assert_array_equal(batch.y, Y)
    np.testing.assert_array_equal(batch.index, np.arange(len(X)))
    assert batch.labelled.all()


@pytest.mark.parametrize("cls", CODECS)
def test_round_trip_targets_and_unlabelled(cls):
    y = RNG.standard_normal(len(X))
    codec = cls(D, None)
    batch = codec.decode_many(codec.encode_many(X, y))
    assert batch.y.dtype == np.float64
    np.testing.assert_array_equal(batch.y, y)

    unlabelled = cls(D, 3, require_label=False)
    batch = unlabelled.decode_many(unlabelled.encode_many(X))
    assert len(batch) == len(X) and not batch.labelled.any()
    assert (batch.y == -1).all()
    assert batch.sample(0).y is None


@pytest.mark.parametrize("cls", [BinaryCodec, JsonCodec])
def test_encode_one_decode_one_and_keys(cls):
    codec = cls(D, 3)
    msg = codec.encode_one(X[1], 2)
    sample = codec.decode_one(msg, key=b"k1")
    np.testing.assert_array_equal(sample.x, X[1])
    assert sample.y == 2 and sample.key == b"k1"
    batch = codec.decode_many([msg, msg], keys=[b"a", None])
    assert batch.keys == [b"a", None]


def test_json_key_field_is_used_when_the_record_has_no_key():
    codec = JsonCodec(2, 3)
    msg = codec.encode_one([1.0, 2.0], 1, key=b"user-7")
    assert json.loads(msg)["key"] == "user-7"
    assert codec.decode_one(msg).key == b"user-7"
    assert codec.decode_one(msg, key=b"kafka-key").key == b"kafka-key"


def test_binary_layout_is_as_documented():
    codec = BinaryCodec(3, 4)
    msg = codec.encode_one([1.0, 2.0, 3.0], 3)
    assert len(msg) == 20 + 4 * 3 == codec.message_size
    assert msg == binary_message([1.0, 2.0, 3.0], kind=1, label=3)
    assert BinaryCodec(54).message_size == 236


def test_one_bad_record_does_not_spoil_the_batch():
    codec = BinaryCodec(D, 3)
    msgs = codec.encode_many(X[:6], Y[:6])
    msgs[2] = msgs[2][:-1]
    msgs[4] = binary_message(np.full(D, np.nan), label=1)
    batch = codec.decode_many(msgs, keys=[bytes([i]) for i in range(6)])
    assert reasons(batch) == [(2, "malformed"), (4, "non_finite")]
    np.testing.assert_array_equal(batch.index, [0, 1, 3, 5])
    np.testing.assert_array_equal(batch.X, X[[0, 1, 3, 5]])
    np.testing.assert_array_equal(batch.y, Y[[0, 1, 3, 5]])
    assert batch.keys == [b"\0", b"\1", b"\3", b"\5"]


def test_auto_codec_mixes_binary_and_json_in_order():
    auto = AutoCodec(D, 3)
    msgs = JsonCodec(D, 3).encode_many(X[:4], Y[:4])
    msgs[1] = auto.encode_one(X[1], Y[1])
    msgs[3] = b'{"x": [1], "y": 0}'
    batch = auto.decode_many(msgs, keys=[b"0", b"1", b"2", b"3"])
    np.testing.assert_array_equal(batch.index, [0, 1, 2])
    np.testing.assert_array_equal(batch.X, X[:3])
    assert batch.keys == [b"0", b"1", b"2"]
    assert reasons(batch) == [(3, "feature_count")]


# ---- rejections: binary --------------------------------------------------------------------------
GOOD = np.arange(D, dtype=np.float32)
BINARY_CASES = [
    (binary_message(GOOD) + b"\0" * 1000, "oversize", "message of `1040` bytes exceeds `max_bytes=100`"),
    (b"AMS\x01", "malformed", "message of `4` bytes is shorter than the 20-byte header"),
    (binary_message(GOOD, magic=b"XYZ"), "malformed", "bad magic `b'XYZ'`, expected `b'AMS'`"),
    (binary_message(GOOD, version=3), "malformed", "unsupported version `3`, expected `1` or `2`"),
    (binary_message(GOOD, reserved=b"\0\1\0"), "malformed", "reserved bytes `b'\\x00\\x01\\x00'` are not zero"),
    (binary_message(GOOD, n=4), "malformed", "length `40` does not match the header's `4` features (`36` bytes)"),
    (binary_message(GOOD)[:-2], "malformed", "length `38` does not match the header's `5` features (`40` bytes)"),
    (binary_message(GOOD[:4]), "feature_count", "expected `5` features, got `4`"),
    (binary_message([0, 1, np.inf, 3, np.nan]), "non_finite", "feature `2` is `inf`"),
    (binary_message(GOOD, kind=0), "missing_label", "no label"),
    (binary_message(GOOD, kind=7), "unknown_label", "label kind `7` is not 0, 1 or 2"),
    (binary_message(GOOD, kind=2, label=1.5), "unknown_label", "label `1.5` is not an integer class index"),
    (binary_message(GOOD, kind=1, label=3), "label_out_of_range", "label `3` is outside `[0, 3)`"),
    (binary_message(GOOD, kind=1, label=-1), "label_out_of_range", "label `-1` is outside `[0, 3)`"),
]


@pytest.mark.parametrize("msg,reason,detail", BINARY_CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(BINARY_CASES)])
def test_binary_rejections(msg, reason, detail):
    codec = BinaryCodec(D, 3, max_bytes=100)
    good = codec.encode_one(GOOD, 1)
    batch = codec.decode_many([good, msg, good])
    assert batch.rejections == [(1, reason, detail)]
    np.testing.assert_array_equal(batch.index, [0, 2])
    with pytest.raises(DecodeError, match=re.escape(f"{reason}: {detail}")) as info:
        codec.decode_one(msg)
    assert info.value.reason == reason


def test_binary_labels_of_the_other_kind_are_converted_when_exact():
    codec = BinaryCodec(D, 3)
    assert codec.decode_one(binary_message(GOOD, kind=2, label=2.0)).y == 2
    target = BinaryCodec(D)
    assert target.decode_one(binary_message(GOOD, kind=1, label=7)).y == 7.0
    with pytest.raises(DecodeError, match=re.escape("non_finite: label `nan` is not finite")):
        target.decode_one(binary_message(GOOD, kind=2, label=float("nan")))


def test_encode_binary_rows_keeps_bad_labels_for_the_decoder():
    msgs = encode_binary_rows(np.zeros((3, 2)), np.array([1.0, 2.5, np.nan]))
    batch = BinaryCodec(2, 3).decode_many(msgs)
    assert batch.y.tolist() == [1]
    assert reasons(batch) == [(1, "unknown_label"), (2, "unknown_label")]


# ---- rejections: JSON ----------------------------------------------------------------------------
JSON_CASES = [
    (b'{"x": [' + b"0," * 60 + b'0], "y": 1}', "oversize", "message of `138` bytes exceeds `max_bytes=100`"),
    (b'{"x": [0, 1, 2, 3, 4], "y": 1', "malformed", "invalid JSON: Expecting ',' delimiter: line 1 column 30 (char 29)"),
    (b"\xff\xfe", "malformed", "not UTF-8: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
    (b"[0, 1, 2, 3, 4]", "malformed", "expected a JSON object, got `list`"),
    (b'{"y": 1}', "malformed", "missing field `x`"),
    (b'{"x": "0,1,2,3,4", "y": 1}', "malformed", "field `x` must be a list, got `str`"),
    (b'{"x": [0, 1, 2, 3, 4], "y": 1, "key": 5}', "malformed", "field `key` must be a string, got `int`"),
    (b'{"x": [0, 1, 2, 3], "y": 1}', "feature_count", "expected `5` features, got `4`"),
    (b'{"x": [0, 1, "2", 3, 4], "y": 1}', "non_numeric", "feature `2` is `'2'`, not a number"),
    (b'{"x": [0, 1, 2, true, 4], "y": 1}', "non_numeric", "feature `3` is `True`, not a number"),
    (b'{"x": [0, null, 2, 3, 4], "y": 1}', "non_numeric", "feature `1` is `None`, not a number"),
    (b'{"x": [0, 1, 2, NaN, 4], "y": 1}', "non_finite", "feature `3` is `nan`"),
    (b'{"x": [0, 1, 2, 3, 1e39], "y": 1}', "non_finite", "feature `4` is `inf`"),  # beyond float32
    (b'{"x": [0, 1, 2, 3, 4]}', "missing_label", "no label"),
    (b'{"x": [0, 1, 2, 3, 4], "y": null}', "missing_label", "no label"),
    (b'{"x": [0, 1, 2, 3, 4], "y": "cat"}', "unknown_label", "label `'cat'` is not a number"),
    (b'{"x": [0, 1, 2, 3, 4], "y": true}', "unknown_label", "label `True` is not a number"),
    (b'{"x": [0, 1, 2, 3, 4], "y": 1.5}', "unknown_label", "label `1.5` is not an integer class index"),
    (b'{"x": [0, 1, 2, 3, 4], "y": 3}', "label_out_of_range", "label `3` is outside `[0, 3)`"),
]


@pytest.mark.parametrize("msg,reason,detail", JSON_CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(JSON_CASES)])
def test_json_rejections(msg, reason, detail):
    codec = JsonCodec(D, 3, max_bytes=100)
    good = codec.encode_one(GOOD, 1)
    batch = codec.decode_many([msg, good])
    assert batch.rejections == [(0, reason, detail)]
    np.testing.assert_array_equal(batch.index, [1])
    with pytest.raises(DecodeError, match=re.escape(f"{reason}: {detail}")) as info:
        codec.decode_one(msg)
    assert info.value.reason == reason


def test_json_accepts_integral_float_labels_and_ignores_extra_fields():
    codec = JsonCodec(2, 3)
    assert codec.decode_one(b'{"x": [1, 2.5], "y": 2.0, "ts": 123}').y == 2
    with pytest.raises(DecodeError, match=re.escape("non_finite: label `inf` is not finite")):
        JsonCodec(2).decode_one(b'{"x": [1, 2], "y": Infinity}')


def test_reason_precedence():
    codec = JsonCodec(D, 3)
    # wrong count beats non-numeric beats non-finite beats label problems
    assert codec.decode_many([b'{"x": ["a", NaN], "y": 9}']).rejections[0].reason == "feature_count"
    assert codec.decode_many([b'{"x": ["a", NaN, 0, 0, 0], "y": 9}']).rejections[0].reason == "non_numeric"
    assert codec.decode_many([b'{"x": [NaN, 0, 0, 0, 0], "y": 9}']).rejections[0].reason == "non_finite"
    binary = BinaryCodec(D, 3)
    assert binary.decode_many([binary_message([np.nan] * D, kind=1, label=9)]).rejections[0].reason == "non_finite"


# ---- rejections: CSV -----------------------------------------------------------------------------
CSV_CASES = [
    (b"0,1,2,3,4," + b"0" * 100, "oversize", "message of `110` bytes exceeds `max_bytes=100`"),
    (b"0,1,2,3,\xff,1", "malformed", "not UTF-8: 'utf-8' codec can't decode byte 0xff in position 8: invalid start byte"),
    (b"0,1,2,3,1", "feature_count", "expected `6` fields (`5` features and a label), got `5`"),
    (b"0,1,x,3,4,1", "non_numeric", "feature `2` is `'x'`, not a number"),
    (b"0,1,,3,4,1", "non_numeric", "feature `2` is `''`, not a number"),
    (b"0,1,2,nan,4,1", "non_finite", "feature `3` is `nan`"),
    (b"0,1,2,3,4,", "missing_label", "no label"),
    (b"0,1,2,3,4,cat", "unknown_label", "label `'cat'` is not a number"),
    (b"0,1,2,3,4,0.5", "unknown_label", "label `0.5` is not an integer class index"),
    (b"0,1,2,3,4,3", "label_out_of_range", "label `3` is outside `[0, 3)`"),
]


@pytest.mark.parametrize("msg,reason,detail", CSV_CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CSV_CASES)])
def test_csv_rejections(msg, reason, detail):
    codec = CsvCodec(D, 3, max_bytes=100)
    batch = codec.decode_many([b" 0, 1, 2, 3, 4, 2 \r\n", msg])
    assert batch.rejections == [(1, reason, detail)]
    np.testing.assert_array_equal(batch.X, [np.arange(D)])
    assert batch.y.tolist() == [2]


def test_csv_label_column_in_the_middle_or_none():
    codec = CsvCodec(3, 3, label_column=0)
    assert codec.decode_one(b"2,0.5,1,1.5").y == 2
    np.testing.assert_array_equal(codec.decode_one(b"2,0.5,1,1.5").x, [0.5, 1, 1.5])
    unlabelled = CsvCodec(3, 3, label_column=None, require_label=False)
    assert unlabelled.decode_one(b"0.5,1,1.5").y is None


def test_every_reason_is_covered_by_these_tests():
    covered = {c[1] for c in BINARY_CASES + JSON_CASES + CSV_CASES}
    assert covered == set(REASONS)


# ---- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: BinaryCodec(0), "`n_features` must be an int >= 1, got `0`"),
        (lambda: JsonCodec(3, 0), "`n_classes` must be an int >= 1 or None, got `0`"),
        (lambda: JsonCodec(3, max_bytes=-1), "`max_bytes` must be an int >= 1, got `-1`"),
        (lambda: BinaryCodec(54, max_bytes=200), "`max_bytes=200` is below the `236` bytes of one binary message"),
        (lambda: CsvCodec(3, label_column=4), "`label_column` must be an int in `[-4, 4)` or None, got `4`"),
        (lambda: make_codec("xml", 3), "unknown codec `xml`; choose one of `json, binary, csv, auto`"),
    ],
)
def test_config_errors(make, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make()


def test_encode_checks_shapes():
    with pytest.raises(ValueError, match=re.escape("`X` must have shape `(n, 5)`, got `(2, 4)`")):
        BinaryCodec(D, 3).encode_many(np.zeros((2, 4)), [0, 1])
    with pytest.raises(ValueError, match="class labels must be integral"):
        BinaryCodec(D, 3).encode_many(np.zeros((1, D)), [0.5])


def test_binary_packs_several_samples_per_message():
    codec = BinaryCodec(D, 3)
    msgs = codec.encode_many(X[:10], Y[:10], samples_per_message=4)
    assert [len(m) for m in msgs] == [4 * codec.message_size] * 2 + [2 * codec.message_size]
    bad = bytearray(msgs[1])
    bad[codec.message_size + 20 : codec.message_size + 24] = struct.pack("<f", np.nan)  # sample 5, feature 0
    batch = codec.decode_many([msgs[0], bytes(bad), msgs[2], msgs[2][:-1]], keys=[b"a", b"b", b"c", b"d"])
    assert batch.rejections == [
        (1, "non_finite", "feature `0` is `nan`"),
        (3, "malformed", f"length `{2 * codec.message_size - 1}` does not match the header's `5` features (`40` bytes)"),
    ]
    keep = [0, 1, 2, 3, 4, 6, 7, 8, 9]
    np.testing.assert_array_equal(batch.X, X[keep])
    np.testing.assert_array_equal(batch.y, Y[keep])
    np.testing.assert_array_equal(batch.index, [0, 0, 0, 0, 1, 1, 1, 2, 2])  # the message of each sample
    assert batch.keys == [b"a"] * 4 + [b"b"] * 3 + [b"c"] * 2
    with pytest.raises(ValueError, match=re.escape("`samples_per_message=5000` makes messages of `200000` bytes")):
        BinaryCodec(D, 3, max_bytes=100_000).encode_many(X, Y, samples_per_message=5000)
