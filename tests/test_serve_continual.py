"""`amstream serve` on a task sequence: task ids in the codecs, minibatches cut at task changes,
per-task accuracy and forgetting (the accuracy matrix of a continual benchmark), Prometheus gauges,
JSON lines, the matrix kept across kill -9, and the same matrix as the continual training loop."""
from __future__ import annotations

import doctest
import json
import os
import signal
import time

import numpy as np
import pytest
import torch

import amstream.serve.continual
from amstream import AMConfig, make_learner
from amstream.checkpoint import CheckpointManager
from amstream.cli import main
from amstream.connectors.broker import EmbeddedBroker
from amstream.connectors.codec import AutoCodec, BinaryCodec, JsonCodec
from amstream.connectors.files import FileSource
from amstream.connectors.records import Record
from amstream.continual import iter_continual, make_tasks, summarize
from amstream.serve import Engine, StreamModel, Telemetry
from amstream.serve.continual import Continual, EvalSet
from serve_child import Serve

D, K = 6, 4
rng = np.random.default_rng(5)
X = rng.standard_normal((120, D)).astype(np.float32)
Y = (np.abs(X[:, :K]).argmax(1)).astype(np.int64)
T = np.repeat([0, 1, 2], 40)  # three tasks of 40 samples


def test_doctests():
    result = doctest.testmod(amstream.serve.continual, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# ---- task ids in the messages ---------------------------------------------------------------------
@pytest.mark.parametrize("codec", [JsonCodec(D, K), BinaryCodec(D, K), AutoCodec(D, K)])
def test_codecs_carry_task_ids(codec):
    batch = codec.decode_many(codec.encode_many(X, Y, tasks=T))
    assert batch.task.tolist() == T.tolist() and np.array_equal(batch.X, X) and not batch.rejections
    assert (codec.decode_many(codec.encode_many(X[:3], Y[:3])).task == -1).all()  # no task named


def test_binary_task_header_is_version_2_and_packs():
    values = BinaryCodec(D, K).encode_many(X[:4], Y[:4], tasks=[7, 7, 70000, 3], samples_per_message=2)
    assert values[0][3] == 2 and values[1][5:8] == (70000).to_bytes(3, "little")
    batch = BinaryCodec(D, K).decode_many(values)
    assert batch.task.tolist() == [7, 7, 70000, 3] and batch.index.tolist() == [0, 0, 1, 1]
    v1 = bytearray(BinaryCodec(D, K).encode_many(X[:1], Y[:1])[0])
    v1[5] = 1  # version 1 keeps its reserved bytes at zero
    assert BinaryCodec(D, K).decode_many([bytes(v1)]).rejections[0].reason == "malformed"


def test_a_bad_task_field_is_malformed():
    values = [b'{"x": [0,0,0,0,0,0], "y": 1, "task": %s}' % v for v in (b"-1", b'"a"', b"1.5", b"true", b"2.0")]
    batch = JsonCodec(D, K).decode_many(values)
    assert [r.reason for r in batch.rejections] == ["malformed"] * 4 and batch.task.tolist() == [2]


def test_npz_file_source_reads_task_ids(tmp_path):
    np.savez(tmp_path / "t.npz", X=X, y=Y, task=T)
    src = FileSource(tmp_path / "t.npz", n_classes=K)
    batch = src.codec.decode_records(src.next_batch(max_records=500))
    assert batch.task.tolist() == T.tolist()
    np.savez(tmp_path / "bad.npz", X=X, y=Y, task=-T)
    with pytest.raises(Exception, match="task"):
        FileSource(tmp_path / "bad.npz", n_classes=K).open()


# ---- the engine --------------------------------------------------------------------------------
def engine(continual=None, **kw):
    learner = make_learner(AMConfig(arch=(D, 8, K), algo="am-mem", seed=1))
    return Engine(StreamModel(learner, BinaryCodec(D, K)), batch_size=16, continual=continual, **kw)


def records(tasks=T):
    values = BinaryCodec(D, K).encode_many(X, Y, tasks=tasks)
    return [Record("t", 0, i, None, v) for i, v in enumerate(values)]


def test_a_minibatch_holds_one_task_unless_mixed():
    e = engine()
    e.ingest(records())
    sizes = []
    while e.buffered:
        step = e.learn()
        sizes.append((step.batch, set(step.chunk.task.tolist())))
    assert [n for n, _ in sizes] == [16, 16, 8] * 3 and all(len(t) == 1 for _, t in sizes)
    e = engine(mixed_tasks=True)
    e.ingest(records())
    assert [e.learn().batch for _ in range(8)] == [16] * 7 + [8]
    e = engine()  # without task ids nothing changes
    e.ingest(records(tasks=None))
    assert [e.learn().batch for _ in range(8)] == [16] * 7 + [8]


def evalset():
    return EvalSet.from_arrays(X, Y, T)


def test_rows_at_task_ends_and_scores_match_summarize():
    e = engine(Continual(evalset(), eval_every=None))
    e.ingest(records())
    evaluations = [s.evaluation for s in iter(lambda: e.learn() if e.buffered else None, None) if s.evaluation]
    assert [(ev.reason, ev.after_task) for ev in evaluations] == [("task_end", 0), ("task_end", 1)]
    final = e.continual.finish(e.learner)
    summary = e.continual.summary()
    assert summary["trained_tasks"] == [0, 1, 2] and len(summary["matrix"]) == 3
    R = np.array(summary["matrix"])
    expected = summarize(R)
    assert summary["scores"]["forgetting"] == pytest.approx(expected["forgetting"], abs=1e-6)
    assert summary["average_accuracy"] == pytest.approx(expected["average_accuracy"], abs=1e-6)
    assert final.forgetting == pytest.approx({0: R[0, 0] - R[2, 0], 1: R[1, 1] - R[2, 1]})
    assert set(summary["prequential_accuracy"]) == {"0", "1", "2"}


def test_periodic_scoring_without_task_ids_uses_the_best_accuracy():
    e = engine(Continual(evalset(), eval_every=32))
    e.ingest(records(tasks=None))
    evaluations = [s.evaluation for s in iter(lambda: e.learn() if e.buffered else None, None) if s.evaluation]
    assert [ev.reason for ev in evaluations] == ["periodic"] * 3 and evaluations[0].forgetting == {}
    best = {t: max(ev.accuracies[t] for ev in evaluations[:2]) for t in (0, 1, 2)}
    assert evaluations[2].forgetting == pytest.approx({t: best[t] - evaluations[2].accuracies[t] for t in best})
    summary = e.continual.summary()  # no task ends: no rows but the latest scoring, and no matrix scores
    assert summary["matrix"] == [[round(evaluations[2].accuracies[t], 6) for t in (0, 1, 2)]]
    assert summary["trained_tasks"] == [None] and "scores" not in summary


def test_the_rows_and_the_carry_survive_a_restart():
    whole = engine(Continual(evalset()))
    whole.ingest(records())
    while whole.buffered:
        whole.learn()
    first = engine(Continual(evalset()))
    first.ingest(records())
    for _ in range(5):  # into task 1, with part of it in the carry
        first.learn()
    second = engine(Continual(evalset()))
    second.load_state_dict(first.state_dict())
    assert second.buffered == first.buffered and second.continual.current == 1
    while second.buffered:
        second.learn()
    whole.continual.finish(whole.learner)
    second.continual.finish(second.learner)
    assert second.continual.summary()["matrix"] == whole.continual.summary()["matrix"]


def test_gauges():
    t = Telemetry(log_every_s=None)
    e = engine(Continual(evalset()))
    e.events = t
    e.ingest(records())
    while e.buffered:
        e.learn()
    text = t.render()
    assert 'amstream_task_accuracy{task="2"}' in text and 'amstream_task_forgetting{task="0"}' in text
    assert 'amstream_evaluations_total{reason="task_end"} 2.0' in text
    assert "amstream_continual_average_accuracy" in text


# ---- end to end ----------------------------------------------------------------------------------
ARCH = ["--algo", "am-mem", "--arch", "784-32-10", "--n-classes", "10", "--batch-size", "32", "--seed", "0",
        "--log-every", "0", "--json"]


def reference_matrix():
    """The continual training loop on the same sequence and model (one torch thread, as serve)."""
    tasks = make_tasks("split-mnist", train_per_class=60, test_per_class=30, seed=0)
    learner = make_learner(AMConfig(arch=(784, 32, 10), algo="am-mem", seed=0))
    return [r["accuracies"] for r in iter_continual(learner, tasks, batch_size=32, seed=0)]


def json_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


@pytest.mark.kafka
@pytest.mark.slow
def test_serve_learns_a_produced_task_sequence_like_the_continual_loop(tansu, tmp_path, capsys):
    with EmbeddedBroker() as broker:
        servers = broker.bootstrap_servers
        assert main(["produce", "--benchmark", "split-mnist", "--topic", "tasks", "--bootstrap-servers", servers,
                     "--codec", "binary", "--train-per-class", "60", "--test-per-class", "30",
                     "--eval-file", str(tmp_path / "eval.npz"), "--json"]) == 0
        capsys.readouterr()
        serve = Serve(["--topic", "tasks", "--bootstrap-servers", servers, "--group-id", "continual",
                       "--eval-source", str(tmp_path / "eval.npz"), "--idle-exit", "2", *ARCH], tmp_path, "serve")
        assert serve.join(120) == 0, serve.log()[-3000:]
    lines = json_lines(serve.out)
    assert [(d["reason"], d["after_task"]) for d in lines[:-1]] == [("task_end", t) for t in range(4)] + [("final", 4)]
    result = lines[-1]["continual"]
    assert result["trained_tasks"] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(result["matrix"], reference_matrix(), atol=1e-6)
    assert result["scores"]["forgetting"] == pytest.approx(summarize(np.array(reference_matrix()))["forgetting"],
                                                           abs=1e-6)


def _slow_steps():
    """In the child: 50 ms per minibatch, so that the test can kill it in the middle of the stream."""
    learn = Engine.learn

    def slow(self, **kw):
        time.sleep(0.05)
        return learn(self, **kw)

    Engine.learn = slow


@pytest.mark.slow
def test_kill_9_keeps_the_matrix(tmp_path):
    tasks = make_tasks("split-mnist", train_per_class=60, test_per_class=30, seed=0)
    from amstream.continual import training_order

    parts = [(t.inputs("train")[training_order(t.n_train, seed=0, task=i)],
              t.y_train[training_order(t.n_train, seed=0, task=i)]) for i, t in enumerate(tasks)]
    np.savez(tmp_path / "train.npz", X=np.concatenate([p[0] for p in parts]), y=np.concatenate([p[1] for p in parts]),
             task=np.concatenate([np.full(len(p[1]), i) for i, p in enumerate(parts)]))
    np.savez(tmp_path / "eval.npz", X=np.concatenate([t.inputs("test") for t in tasks]),
             y=np.concatenate([t.y_test for t in tasks]), task=np.concatenate([np.full(t.n_test, t.label) for t in tasks]))
    common = ["--source", str(tmp_path / "train.npz"), "--eval-source", str(tmp_path / "eval.npz"), *ARCH]
    whole = Serve(common, tmp_path, "whole")
    assert whole.join(120) == 0
    ckpt = tmp_path / "ck"
    killed = Serve([*common, "--checkpoint-dir", str(ckpt), "--checkpoint-every-batches", "1"], tmp_path, "killed",
                   before=_slow_steps)

    def past_task_1():
        loaded = CheckpointManager(ckpt).restore() if ckpt.exists() else None
        return loaded is not None and loaded["state"]["counters"]["learned_samples"] >= 330

    killed.wait_for(past_task_1, 60, "a checkpoint past task 1")
    os.kill(killed.proc.pid, signal.SIGKILL)
    killed.proc.join(10)
    rest = Serve([*common, "--checkpoint-dir", str(ckpt)], tmp_path, "rest")
    assert rest.join(120) == 0, rest.log()[-3000:]
    assert "resuming" in rest.log()
    expected = json_lines(whole.out)[-1]["continual"]["matrix"]
    assert json_lines(rest.out)[-1]["continual"]["matrix"] == expected
    np.testing.assert_allclose(expected, reference_matrix(), atol=1e-6)
