"""`amstream demo` end to end (embedded broker, producer, serve, held-out test), small."""
from __future__ import annotations

import json

import pytest

from amstream.cli import main
from amstream.serve import load_serve_checkpoint

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_demo_runs_end_to_end(tansu, tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-000099999.ckpt").write_bytes(b"an earlier demo's")  # removed first
    assert main(["demo", "--samples", "2000", "--out", str(out), "--json", "--no-progress"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["learned_samples"] == 2000 and result["bad_messages"] == 0
    assert 0.3 < result["prequential_accuracy"] < result["test_accuracy"] <= 1.0  # it learned, and held-out > early
    assert result["offsets"] == {"samples:0": 250}  # 8 images per message
    assert (out / "prequential_accuracy.png").stat().st_size > 10_000
    assert (out / "prequential_accuracy.csv").read_text().count("\n") == 1 + -(-2000 // 64)
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] == result["test_accuracy"]
    learner, state, _ = load_serve_checkpoint(out / "checkpoints")
    assert learner.n_samples == 2000 and state["offsets"] == {"samples:0": 250}
    assert "[4/4] evaluating on the held-out MNIST test set" in captured.err
