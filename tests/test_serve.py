"""`amstream serve` without a broker: file sources (CSV, JSONL, NPZ) resuming exactly, bad rows,
the prequential score, sample-id checksums, Prometheus metrics, and the CLI's errors."""
from __future__ import annotations

import doctest
import json
import re
import urllib.request

import numpy as np
import pytest
import torch

import amstream.connectors.base
import amstream.connectors.testing
import amstream.retry
import amstream.serve.engine
import amstream.serve.lockstep
import amstream.serve.runner
import amstream.serve.telemetry
from amstream import AMConfig, make_learner
from amstream.checkpoint import CheckpointManager
from amstream.cli import main
from amstream.connectors.codec import JsonCodec
from amstream.connectors.files import FileSource
from amstream.connectors.records import Record
from amstream.exceptions import ConfigError
from amstream.serve import (Engine, Prequential, Runner, RunnerConfig, StreamModel, Telemetry, key_checksum,
                            load_serve_checkpoint)

D, K, N, B = 12, 3, 700, 32
RNG = np.random.default_rng(11)
X = RNG.standard_normal((N, D)).astype(np.float32)
Y = ((X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5)).astype(np.int64)


def reference_model(x, y, *, batch_size=B, seed=1, hidden=(16,)):
    """What an uninterrupted run learns: the same minibatches, in order, the last one partial."""
    learner = make_learner(AMConfig(arch=(x.shape[1], *hidden, K), algo="am-adam", seed=seed))
    for i in range(0, len(x), batch_size):
        learner.learn(torch.from_numpy(x[i:i + batch_size]), torch.from_numpy(y[i:i + batch_size]))
    return learner


def assert_same_model(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def write(path, fmt, x=X, y=Y):
    if fmt == "npz":
        np.savez(path, X=x, y=y)
    elif fmt == "csv":
        lines = ["," .join([f"f{j}" for j in range(x.shape[1])] + ["label"])]
        lines += [",".join(["%.9g" % v for v in row] + [str(int(t))]) for row, t in zip(x, y)]
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_bytes(b"\n".join(JsonCodec(x.shape[1], K).encode_many(x, y)) + b"\n")
    return path


def serve_file(path, ckpt, capsys, *extra):
    argv = ["serve", "--source", str(path), "--n-classes", str(K), "--arch", "16", "--batch-size", str(B),
            "--checkpoint-dir", str(ckpt), "--checkpoint-every-batches", "4", "--log-every", "0", "--json", *extra]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "npz"])
def test_file_source_resumes_exactly(tmp_path, capsys, fmt):
    path = write(tmp_path / f"data.{fmt}", fmt)
    first = serve_file(path, tmp_path / "ck", capsys, "--max-samples", "300")
    assert first["learned_samples"] == 320  # stops at the first minibatch boundary at or after 300
    assert first["stop_reason"] == "max_samples=300 reached"
    assert first["carry"] == first["records"] - 320  # taken but not learned: in the checkpoint
    second = serve_file(path, tmp_path / "ck", capsys)
    assert second["learned_samples"] == N and second["learned_samples_this_run"] == N - 320
    assert second["offsets"] == {f"data.{fmt}:0": N} and second["stop_reason"] == "end of input"
    assert second["key_checksum"] == key_checksum(f"data.{fmt}", np.zeros(N), np.arange(N), np.zeros(N))
    learner, state, _ = load_serve_checkpoint(tmp_path / "ck")
    assert_same_model(learner, reference_model(X, Y))
    assert state["counters"]["learned_samples"] == N and not state["carry"]
    # the prequential score of the two runs together is the uninterrupted one's
    assert second["prequential_accuracy"] == pytest.approx(
        serve_file(path, tmp_path / "ck2", capsys)["prequential_accuracy"], abs=1e-12)


def test_bad_rows_are_counted_and_never_learned(tmp_path, capsys):
    path = write(tmp_path / "d.csv", "csv", X[:100], Y[:100])
    lines = path.read_text().splitlines()
    bad = {3: "0.5,x" + "," * (D - 1) + "1", 10: ",".join(["1"] * D) + ",7", 20: ",".join(["nan"] * D) + ",1",
           30: ",".join(["1"] * (D - 2)) + ",1"}
    for row, text in bad.items():
        lines.insert(row + 1, text)  # +1: the header
    path.write_text("\n".join(lines) + "\n")
    out = serve_file(path, tmp_path / "ck", capsys)
    assert out["learned_samples"] == 100 and out["bad_messages"] == 4
    assert out["bad_messages_by_reason"] == {"feature_count": 1, "label_out_of_range": 1, "non_finite": 1,
                                             "non_numeric": 1}
    assert out["offsets"] == {"d.csv:0": 104}
    learner, _, _ = load_serve_checkpoint(tmp_path / "ck")
    assert_same_model(learner, reference_model(X[:100], Y[:100]))


def runner_for(source, learner, *, batch_size=B, state=None, checkpoints=None, **config):
    engine = Engine(StreamModel(learner, source.codec), batch_size=batch_size)
    if state is not None:
        engine.load_state_dict(state)
    return Runner(engine, source, checkpoints=checkpoints, config=RunnerConfig(**config))


def test_runner_on_a_file_in_process(tmp_path):
    """The library API: build a learner and a source, run, resume with the checkpoint's state."""
    path = write(tmp_path / "d.npz", "npz")
    source = FileSource(path, n_classes=K)
    runner = runner_for(source, make_learner(AMConfig(arch=(D, 16, K), seed=1)),
                        checkpoints=CheckpointManager(tmp_path / "ck"), max_samples=200)
    steps = list(runner.steps())
    assert [s.learned_samples for s in steps] == [B * (i + 1) for i in range(7)]
    assert all(0 <= s.window_accuracy <= 1 for s in steps)
    learner, state, meta = load_serve_checkpoint(tmp_path / "ck")
    assert meta["reason"] == "shutdown" and state["offsets"] == {"d.npz:0": 2 * B * 4}  # polls of 2 minibatches
    assert state["sizes"] == {"n_features": D, "n_classes": K, "grow_classes": False}
    source = FileSource(path, n_classes=K)
    runner = runner_for(source, learner, state=state)
    summary = runner.run()
    assert summary["learned_samples"] == N and summary["stop_reason"] == "end of input"
    assert_same_model(runner.engine.learner, reference_model(X, Y))


def test_prequential_is_test_then_train():
    """The loop scores each minibatch with the pre-update outputs, without a second forward pass."""
    learner = make_learner(AMConfig(arch=(D, 16, K), seed=1))
    before = learner.predict(torch.from_numpy(X[:B]))
    update = learner.learn(torch.from_numpy(X[:B]), torch.from_numpy(Y[:B]))
    assert torch.equal(update.outputs.argmax(1), before)
    p = Prequential(window=64)
    for i in range(10):
        p.update(32, i, 1.0 * i)
    assert p.n == 320 and p.correct == 45 and p.window_accuracy == pytest.approx((8 + 9) / 64)
    p2 = Prequential()
    p2.load_state_dict(p.state_dict())
    assert (p2.n, p2.correct, p2.loss_sum) == (p.n, p.correct, p.loss_sum)


def test_key_checksum_is_order_independent_and_exact():
    parts = np.array([0, 1, 0, 2]), np.array([5, 5, 6, 1]), np.array([0, 0, 0, 3])
    total = key_checksum("t", *parts)
    order = np.array([3, 1, 0, 2])
    assert key_checksum("t", *(a[order] for a in parts)) == total
    assert (key_checksum("t", *(a[:2] for a in parts)) + key_checksum("t", *(a[2:] for a in parts))) % 2**64 == total
    assert key_checksum("u", *parts) != total
    assert key_checksum("t", parts[0], parts[1] + np.array([0, 0, 0, 1]), parts[2]) != total
    assert 0 <= total < 2**64 and key_checksum("t", [], [], []) == 0


def test_doctests():
    for module in (amstream.serve.engine, amstream.serve.runner, amstream.serve.telemetry, amstream.serve.lockstep,
                   amstream.retry,
                   amstream.connectors.base, amstream.connectors.testing):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_metrics_endpoint_serves_prometheus_text():
    t = Telemetry(log_every_s=None)
    learner = make_learner(AMConfig(arch=(D, 16, K), seed=1))
    engine = Engine(StreamModel(learner, JsonCodec(D, K)), batch_size=B, events=t)
    records = [Record("t", 0, i, None, v) for i, v in enumerate(JsonCodec(D, K).encode_many(X[:70], Y[:70]))]
    engine.ingest(records + [Record('we"ird', 0, 0, None, b"nope")])
    engine.learn()
    engine.learn()
    port = t.serve_http(0, "127.0.0.1")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        t.close()
    assert "# TYPE amstream_bad_messages_total counter" in body
    assert 'amstream_bad_messages_total{reason="malformed"} 1.0' in body
    assert "amstream_learned_samples_total 64.0" in body and "amstream_records_total 71.0" in body
    assert "amstream_step_seconds_count 2.0" in body and 'amstream_step_seconds_bucket{le="+Inf"} 2.0' in body
    assert "amstream_model_step 2.0" in body
    assert "amstream_checkpoint_age_seconds NaN" in body  # no checkpoint yet


def test_serve_cli_errors(tmp_path, capsys):
    assert main(["serve", "--topic", "t", "--source", "x.csv"]) == 1
    assert "give `--topic` (Kafka) or `--source PATH`" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=re.escape("`batch_size` must be an int >= 1, got `0`")):
        Engine(StreamModel(make_learner(AMConfig(arch=(D, K))), JsonCodec(D, K)), batch_size=0)
    with pytest.raises(ConfigError, match=re.escape("the codec expects `5` features, the learner `12`")):
        StreamModel(make_learner(AMConfig(arch=(D, K))), JsonCodec(5, K))
    with pytest.raises(ConfigError, match=re.escape("the codec expects `4` classes, the learner `3`")):
        StreamModel(make_learner(AMConfig(arch=(D, K))), JsonCodec(D, 4))
    path = write(tmp_path / "d.npz", "npz")
    ck = tmp_path / "ck"
    assert main(["serve", "--source", str(path), "--n-classes", str(K), "--checkpoint-dir", str(ck), "--json",
                 "--max-samples", "64", "--log-every", "0"]) == 0
    capsys.readouterr()
    assert main(["serve", "--source", str(path), "--n-classes", "5", "--checkpoint-dir", str(ck)]) == 1
    assert f"`--n-classes 5` contradicts the checkpoint in `{ck}` (3)" in capsys.readouterr().err


def test_dataset_sizes_and_resume_without_model_flags(tmp_path, capsys):
    """`--dataset` gives the sizes; a restart needs only the checkpoint directory."""
    x, y = X[:64, :9], Y[:64] % 2
    path = write(tmp_path / "p.npz", "npz", x, y)
    argv = ["serve", "--source", str(path), "--dataset", "phishing", "--batch-size", "16", "--log-every", "0",
            "--checkpoint-dir", str(tmp_path / "ck"), "--json"]
    assert main(argv + ["--max-samples", "16"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["arch"] == "9-100-100-2"
    assert main(["serve", "--source", str(path), "--checkpoint-dir", str(tmp_path / "ck"), "--json",
                 "--batch-size", "16", "--log-every", "0"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["learned_samples"] == 64


def test_prefetching_thread_on_a_file_gives_the_same_model(tmp_path):
    path = write(tmp_path / "d.npz", "npz")
    source = FileSource(path, n_classes=K)
    learner = make_learner(AMConfig(arch=(D, 16, K), seed=1))
    summary = runner_for(source, learner, prefetch=True).run()
    assert summary["learned_samples"] == N and summary["stop_reason"] == "end of input"
    assert_same_model(learner, reference_model(X, Y))


def test_a_file_without_sizes_grows_its_classes_and_resumes_exactly(tmp_path, capsys):
    """No `--n-classes`: the output layer grows as labels appear, the checkpoint records it, and a run
    cut in two ends with the model of one uninterrupted run."""
    y = Y.copy()
    y[400:] = 5  # a new class late in the stream
    path = write(tmp_path / "grow.csv", "csv", X, y)
    base = ["serve", "--source", str(path), "--arch", "16", "--batch-size", str(B), "--log-every", "0", "--json",
            "--checkpoint-every-batches", "4"]
    assert main(base + ["--checkpoint-dir", str(tmp_path / "whole")]) == 0
    whole = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert whole["learned_samples"] == N and whole["n_classes"] == 6 and whole["arch"] == f"{D}-16-6"
    assert main(base + ["--checkpoint-dir", str(tmp_path / "cut"), "--max-samples", "300"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert first["n_classes"] == 3
    _, state, _ = load_serve_checkpoint(tmp_path / "cut")
    assert state["sizes"] == {"n_features": D, "n_classes": 1000, "grow_classes": True}
    assert main(base + ["--checkpoint-dir", str(tmp_path / "cut")]) == 0
    second = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert second["learned_samples"] == N and second["key_checksum"] == whole["key_checksum"]
    a, _, _ = load_serve_checkpoint(tmp_path / "whole")
    b, _, _ = load_serve_checkpoint(tmp_path / "cut")
    assert_same_model(a, b)


@pytest.mark.parametrize("arch, expected", [("lenet5", "1x28x28-c6k5p2-pool2-c16k5-pool2-120-84-10"),
                                            ("28x28-rnn64-10", "28x28-rnn64-10")])
def test_serve_learns_an_image_stream_with_a_cnn_or_an_rnn(tmp_path, capsys, arch, expected):
    """`--arch lenet5` (or a row-by-row RNN) on a stream of MNIST images: the same engine, a
    convolutional (recurrent) learner, prequential accuracy well above chance after one pass."""
    from amstream.datasets import load_dataset

    data = load_dataset("mnist", limit=1200)
    path = write(tmp_path / "mnist.npz", "npz", data.x_train, data.y_train)
    assert main(["serve", "--source", str(path), "--arch", arch, "--batch-size", "50", "--log-every", "0",
                 "--lr", "0.01", "--lr-out", "0.01", "--checkpoint-dir", str(tmp_path / "ck"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["arch"] == expected and summary["learned_samples"] == 1200
    assert summary["prequential_accuracy"] > (0.5 if arch == "lenet5" else 0.2), summary
