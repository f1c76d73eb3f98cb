"""The command line as a user runs it: subprocesses, JSON last lines, clear errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from amstream.cli import main


def _amstream(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "amstream", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_import_amstream_pulls_no_kafka_river_or_avalanche():
    code = ("import sys, amstream, amstream.training, amstream.checkpoint, amstream.datasets, amstream.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('kafka', 'river', 'avalanche')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_version_needs_no_torch():
    code = "import sys; from amstream.cli import main; main(['--version'])"
    proc = subprocess.run([sys.executable, "-c", code + "\n"], capture_output=True, text=True, timeout=60)
    assert proc.stdout.startswith("amstream ")
    code = ("import sys, amstream.cli; amstream.cli.build_parser(); "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, "building the CLI parser imported torch: " + proc.stderr


def test_train_then_evaluate_json(tmp_path):
    ckpt = tmp_path / "digits.ckpt"
    proc = _amstream("train", "--dataset", "digits", "--algo", "am-adam", "--arch", "64-32-32-10", "--epochs", "2",
                     "--batch-size", "32", "--seed", "1", "--checkpoint", str(ckpt), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("test_accuracy", "epochs", "samples", "seconds", "algo", "arch", "seed"):
        assert key in result
    assert result["algo"] == "am-adam" and result["arch"] == "64-32-32-10" and result["epochs"] == 2
    assert result["test_accuracy"] > 0.5
    proc = _amstream("evaluate", "--checkpoint", str(ckpt), "--dataset", "digits", "--json")
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads(proc.stdout.strip().splitlines()[-1])
    assert evaluated["test_accuracy"] == pytest.approx(result["test_accuracy"])


@pytest.mark.parametrize("arch, activation, expected", [
    ("lenet5", "relu", "1x28x28-c6k5p2-pool2-c16k5-pool2-120-84-10"),
    ("rnn:15", "relu", "784-rnn15-10"),
    ("784-64-32-10", "sign,tanh", "784-64-32-10"),
])
def test_train_other_architectures(arch, activation, expected, capsys):
    """`--arch lenet5`, `--arch rnn:15` and the binary net's `--activation sign,tanh`."""
    assert main(["train", "--dataset", "mnist", "--limit", "256", "--arch", arch, "--activation", activation,
                 "--epochs", "1", "--batch-size", "128", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["arch"] == expected and result["updates"] == 2


@pytest.mark.parametrize("args, message", [
    (("train", "--dataset", "digits", "--arch", "784-100-10", "--epochs", "1"),
     "`--arch 784-100-10` does not fit the data: it has 64 features"),
    (("train", "--dataset", "digits", "--arch", "lenet5", "--epochs", "1"),
     "takes 784 inputs and gives 10 outputs, but the data has 64 features"),
    (("train", "--dataset", "no-such-set", "--epochs", "1"), "no-such-set"),
    (("train", "--dataset", "digits", "--set", "mem_decay=2", "--epochs", "1"), "`mem_decay` must be in (0, 1]"),
])
def test_bad_arguments_give_one_clear_error(args, message, capsys):
    assert main(list(args)) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1


def test_corrupt_checkpoint_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"AMSTREAM" + b"\x00" * 10)
    assert main(["evaluate", "--checkpoint", str(bad), "--dataset", "digits"]) == 1
    assert str(bad) in capsys.readouterr().err
