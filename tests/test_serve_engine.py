"""The exactly-once engine alone: no threads, no broker, no files. Records in any poll chunking,
a state taken at any minibatch boundary and restored into a fresh engine, sizes taken from the
first valid message, classes grown as labels appear."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch

from amstream import AMConfig, make_learner
from amstream.connectors.codec import BinaryCodec, JsonCodec
from amstream.connectors.records import Record
from amstream.exceptions import CheckpointError, ConfigError
from amstream.serve import Engine, StreamModel, key_checksum

D, B = 6, 16
RNG = np.random.default_rng(3)
X = RNG.standard_normal((400, D)).astype(np.float32)
Y3 = (np.abs(X[:, :3]).argmax(1)).astype(np.int64)  # 3 classes


def build(d, k=2, seed=4):
    return make_learner(AMConfig(arch=(d, 12, k), seed=seed))


def records(values, topic="s", partition=0, start=0):
    return [Record(topic, partition, start + i, None, v) for i, v in enumerate(values)]


def chunks(items, rng):
    """``items`` cut into polls of random sizes (1..40)."""
    out, i = [], 0
    while i < len(items):
        n = rng.randint(1, 40)
        out.append(items[i:i + n])
        i += n
    return out


def drive(engine, recs, rng, *, stop_after_batches=None):
    """Ingest ``recs`` in random polls, learning every full minibatch; optionally stop (at a minibatch
    boundary) after that many minibatches. At the end of the input the partial minibatch is learned."""
    learned = 0
    for poll in chunks(recs, rng):
        engine.ingest(poll)
        while engine.ready:
            engine.learn()
            learned += 1
            if stop_after_batches is not None and learned >= stop_after_batches:
                return False
    while engine.buffered:
        engine.learn()
    return True


def same_model(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def reference(x, y, k0=3, grow=False):
    """The minibatches of the valid samples in stream order (the last one partial)."""
    learner = build(x.shape[1], k0)
    for i in range(0, len(x), B):
        yb = y[i:i + B]
        if grow and int(yb.max()) + 1 > learner.n_outputs:
            learner.expand(n_outputs=int(yb.max()) + 1)
        learner.learn(torch.from_numpy(x[i:i + B]), torch.from_numpy(yb))
    return learner


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_state_taken_at_any_boundary_resumes_exactly(seed):
    """Packed and single messages with bad ones among them; the first run stops at a random minibatch,
    a fresh engine restores its state and reads on from the state's offsets with other poll sizes."""
    rng = random.Random(seed)
    codec = BinaryCodec(D, 3)
    values = codec.encode_many(X[:100], Y3[:100]) + codec.encode_many(X[100:], Y3[100:], samples_per_message=4)
    bad_at = sorted(rng.sample(range(len(values)), 5))
    for j, pos in enumerate(bad_at):
        values.insert(pos + j, b"\x00broken")
    recs = records(values)

    whole = Engine(StreamModel(build(D, 3), codec), batch_size=B)
    assert drive(whole, recs, random.Random(seed + 10))

    first = Engine(StreamModel(build(D, 3), codec), batch_size=B)
    assert not drive(first, recs, rng, stop_after_batches=rng.randint(1, 20))
    state = first.state_dict()
    second = Engine(StreamModel(build(D, 3, seed=99), codec), batch_size=B)  # other init: the state wins
    second.load_state_dict(state)
    assert second.buffered == first.buffered and second.offsets == first.offsets
    rest = recs[second.offsets[("s", 0)]:]
    assert drive(second, rest, random.Random(seed + 20))

    for engine in (whole, second):
        c = engine.counters
        assert c.learned_samples == 400 and c.bad_messages == 5 and engine.offsets == {("s", 0): len(values)}
        assert c.bad_by_reason == {"malformed": 5}
    assert second.counters.key_checksum == whole.counters.key_checksum
    assert same_model(second.learner, whole.learner) and same_model(whole.learner, reference(X, Y3))
    assert second.prequential.n == whole.prequential.n == 400
    assert second.prequential.correct == whole.prequential.correct


def test_two_partitions_interleaved_each_sample_once():
    """Records of two partitions interleaved in polls: counts, offsets and the id checksum are exact."""
    codec = BinaryCodec(D, 3)
    a = records(codec.encode_many(X[:150], Y3[:150]), partition=0)
    b = records(codec.encode_many(X[150:], Y3[150:], samples_per_message=5), partition=1)
    mixed = []
    for i in range(max(len(a), len(b))):
        mixed += a[i:i + 1] + b[i:i + 1]
    engine = Engine(StreamModel(build(D, 3), codec), batch_size=B)
    drive(engine, mixed, random.Random(5))
    assert engine.offsets == {("s", 0): 150, ("s", 1): 50}
    expected = (key_checksum("s", [0] * 150, range(150), [0] * 150)
                + key_checksum("s", [1] * 250, np.repeat(np.arange(50), 5), np.tile(np.arange(5), 50))) % 2**64
    assert engine.counters.key_checksum == expected and engine.counters.learned_samples == 400


def bare_model(cap=50):
    return StreamModel(build=lambda d: build(d, 2), codec_name="auto", codec_options={"n_classes": cap},
                       grow_classes=True)


def test_sizes_from_the_first_valid_message_and_classes_grown_as_labels_appear():
    """Nothing given: bad messages before the first valid one are rejected for their own reasons,
    the first valid one sizes the learner, and the output layer grows right before the minibatch
    that brings a new label, whatever the poll sizes."""
    y = Y3.copy()
    y[200:] += 4  # labels 4..6 appear from sample 200 on (5 and 6 in the same minibatch)
    json_codec = JsonCodec(D, 50)
    early = [b"not json", json.dumps({"x": [1.0, 2.0], "y": None}).encode(),
             json.dumps({"x": [1.0, float("nan")], "y": 1}).encode()]
    values = early + json_codec.encode_many(X[:100], y[:100]) + BinaryCodec(D, 50).encode_many(X[100:], y[100:])
    models = []
    for seed in (0, 1):
        engine = Engine(bare_model(), batch_size=B)
        first = engine.ingest(records(values[:3]))
        assert [(r.index, r.reason) for r in first.rejections] == [
            (0, "malformed"), (1, "missing_label"), (2, "non_finite")]
        assert engine.learner is None and not engine.can_snapshot
        with pytest.raises(CheckpointError, match="no valid message has sized the learner"):
            engine.state_dict()
        grew = []
        for poll in chunks(records(values[3:], start=3), random.Random(seed)):
            engine.ingest(poll)
            while engine.ready:
                step = engine.learn()
                if step.grown:
                    grew.append((step.learned_samples - step.batch, step.grown))
        while engine.buffered:
            engine.learn()
        assert engine.learner.n_inputs == D and engine.learner.n_outputs == 7
        assert grew == [(0, (2, 3)), (192, (3, 7))]  # the minibatch holding sample 200 starts at 192
        assert engine.counters.learned_samples == 400 and engine.counters.bad_messages == 3
        assert engine.state_dict()["sizes"] == {"n_features": D, "n_classes": 50, "grow_classes": True}
        models.append(engine.learner)
    assert same_model(models[0], models[1])
    assert same_model(models[0], reference(X, y, k0=2, grow=True))


def test_a_grown_model_restarts_exactly_from_its_state():
    y = Y3.copy()
    y[300:] = 5
    values = BinaryCodec(D, 50).encode_many(X, y)
    whole = Engine(bare_model(), batch_size=B)
    drive(whole, records(values), random.Random(0))
    first = Engine(bare_model(), batch_size=B)
    drive(first, records(values), random.Random(1), stop_after_batches=10)
    assert first.learner.n_outputs == 3
    second = Engine(bare_model(), batch_size=B)  # nothing built yet: the state's sizes build it
    second.load_state_dict(first.state_dict())
    assert second.learner.n_inputs == D and second.model.codec.n_classes == 50 and second.model.grow_classes
    drive(second, records(values)[second.offsets[("s", 0)]:], random.Random(2))
    assert second.learner.n_outputs == 6
    assert same_model(second.learner, whole.learner)
    assert second.counters.key_checksum == whole.counters.key_checksum


def test_labels_over_the_cap_are_rejected_and_fixed_sizes_do_not_grow():
    engine = Engine(bare_model(cap=4), batch_size=4)
    got = engine.ingest(records(BinaryCodec(D, 10).encode_many(X[:6], [0, 1, 9, 3, 4, 2])))
    assert [(r.index, r.reason) for r in got.rejections] == [(2, "label_out_of_range"), (4, "label_out_of_range")]
    assert "outside `[0, 4)`" in got.rejections[0].detail
    fixed = Engine(StreamModel(build(D, 3), BinaryCodec(D, 3)), batch_size=4)
    got = fixed.ingest(records(BinaryCodec(D, 10).encode_many(X[:4], [0, 1, 2, 3])))
    assert [r.reason for r in got.rejections] == ["label_out_of_range"]
    fixed.ingest(records(BinaryCodec(D, 3).encode_many(X[:1], [2]), start=4))
    assert fixed.learn().grown is None and fixed.learner.n_outputs == 3


def test_partitions_assigned_revoked_and_rewound():
    codec = BinaryCodec(D, 3)
    engine = Engine(StreamModel(build(D, 3), codec), batch_size=B)
    engine.ingest(records(codec.encode_many(X[:10], Y3[:10]), partition=0)
                  + records(codec.encode_many(X[10:20], Y3[10:20]), partition=1))
    assert engine.assign([("s", 0), ("s", 2)]) == {("s", 0): 10}
    assert engine.assign([("s", 2)], absent_at_zero=True) == {("s", 2): 0}
    engine.revoke([("s", 1)])
    assert engine.assign([("s", 0)]) == {("s", 0): 10} and ("s", 1) not in engine.offsets  # another member has it
    assert engine.buffered == 20  # samples of a revoked partition already taken stay and are learned
    engine.rewind(("s", 0), 3)
    assert engine.offsets[("s", 0)] == 3 and engine.has_taken({("s", 0): 3}) and not engine.has_taken({("s", 0): 4})


def test_state_checks():
    engine = Engine(StreamModel(build(D, 3), BinaryCodec(D, 3)), batch_size=B)
    with pytest.raises(CheckpointError, match=re.escape("checkpoint is a `None` state, not `amstream.serve`")):
        engine.load_state_dict({"learner": {}})
    state = engine.state_dict()
    with pytest.raises(CheckpointError, match=re.escape("serve state version `7` is not supported (expected 1)")):
        engine.load_state_dict({**state, "version": 7})
    old = {k: v for k, v in state.items() if k != "sizes"}  # written before sizes were recorded
    Engine(StreamModel(build(D, 3), BinaryCodec(D, 3)), batch_size=B).load_state_dict(old)
    with pytest.raises(ConfigError, match="give a `learner`, or `build`"):
        StreamModel()
    with pytest.raises(ConfigError, match="nothing to learn"):
        engine.learn()
