from __future__ import annotations

import decimal
import hashlib
import io
import logging
import os
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch

from amstream import checkpoint
from amstream.checkpoint import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    CheckpointManager,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from amstream.exceptions import CheckpointError


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "version": 1,
        "model": OrderedDict(
            [("layer.weight", torch.randn(4, 3, generator=g)), ("layer.bias", torch.randn(4, generator=g))]
        ),
        "am_state": {"codes": [torch.randn(2, 4, generator=g), torch.zeros(2, dtype=torch.int64)]},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]},
        "offsets": {"events": {0: 124, 1: 7}},
        "n_samples": 131,
        "config": {"name": "am-adam", "mu": 0.5, "flag": True, "extra": None},
    }


def _with_header(payload: bytes, *, version: int = FORMAT_VERSION, digest: str | None = None) -> bytes:
    digest = digest or hashlib.sha256(payload).hexdigest()
    return checkpoint._HEADER.pack(MAGIC, version, len(payload), digest.encode()) + payload


def test_round_trip_is_bit_exact(tmp_path):
    state = _state()
    path = save_checkpoint(tmp_path / "a.ckpt", state, metadata={"step": 5, "note": "hi"})
    loaded = load_checkpoint(path)
    assert loaded["path"] == path
    assert loaded["format_version"] == FORMAT_VERSION
    assert loaded["metadata"] == {"step": 5, "note": "hi"}
    got = loaded["state"]
    for name, tensor in state["model"].items():
        assert got["model"][name].dtype == tensor.dtype
        assert got["model"][name].numpy().tobytes() == tensor.numpy().tobytes()
    assert list(got["model"]) == list(state["model"])
    assert torch.equal(got["am_state"]["codes"][0], state["am_state"]["codes"][0])
    assert got["offsets"] == {"events": {0: 124, 1: 7}}
    assert got["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert {k: got[k] for k in ("version", "n_samples", "config")} == {
        k: state[k] for k in ("version", "n_samples", "config")
    }


def test_header_layout(tmp_path):
    path = save_checkpoint(tmp_path / "a.ckpt", {"x": 1})
    raw = path.read_bytes()
    magic, version, length, digest = checkpoint._HEADER.unpack(raw[:HEADER_SIZE])
    assert (magic, version, HEADER_SIZE) == (b"AMSTREAM", 1, 84)
    assert length == len(raw) - HEADER_SIZE
    assert digest.decode() == hashlib.sha256(raw[HEADER_SIZE:]).hexdigest()


def test_no_temporary_files_left(tmp_path):
    save_checkpoint(tmp_path / "a.ckpt", _state())
    save_checkpoint(tmp_path / "a.ckpt", _state(1))
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]


def test_failed_serialisation_keeps_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "a.ckpt", _state(0))
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(torch, "save", broken_save)
    expect = f"cannot checkpoint to `{path}`: serialising failed: disk on fire"
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        save_checkpoint(path, _state(1))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]


def test_failed_write_keeps_previous_file_and_removes_temp(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "a.ckpt", _state(0))
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    expect = f"cannot write checkpoint `{path}`: [Errno 28] No space left on device"
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        save_checkpoint(path, _state(1))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]
    assert torch.equal(load_checkpoint(path)["state"]["model"]["layer.bias"], _state(0)["model"]["layer.bias"])


def test_unsafe_state_refused_before_writing(tmp_path):
    expect = "cannot checkpoint `state['config']['obj']`: type `decimal.Decimal` is not a tensor, Python scalar, string, list or dict"
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        save_checkpoint(tmp_path / "a.ckpt", {"config": {"obj": decimal.Decimal(1)}})
    expect = (
        "cannot checkpoint `metadata['x']`: type `numpy.ndarray` is not a tensor, Python scalar, "
        "string, list or dict (convert it with `torch.from_numpy`)"
    )
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        save_checkpoint(tmp_path / "a.ckpt", {}, metadata={"x": np.zeros(2)})
    assert os.listdir(tmp_path) == []


def test_missing_file(tmp_path):
    path = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint `{path}` does not exist")):
        load_checkpoint(path)
    # CheckpointError is also an OSError, so generic handlers still catch it
    with pytest.raises(OSError):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0, 10, HEADER_SIZE - 1])
def test_truncated_header_refused(tmp_path, keep):
    path = save_checkpoint(tmp_path / "a.ckpt", _state())
    path.write_bytes(path.read_bytes()[:keep])
    expect = f"checkpoint `{path}` is truncated: {keep} bytes, shorter than its 84-byte header"
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        load_checkpoint(path)


def test_truncated_payload_refused(tmp_path):
    path = save_checkpoint(tmp_path / "a.ckpt", _state())
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    n = len(raw) - HEADER_SIZE
    expect = f"checkpoint `{path}` is truncated: its header announces {n} payload bytes, the file holds {n - 100}"
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        load_checkpoint(path)


def test_trailing_bytes_refused(tmp_path):
    path = save_checkpoint(tmp_path / "a.ckpt", _state())
    n = path.stat().st_size - HEADER_SIZE
    with open(path, "ab") as f:
        f.write(b"junk")
    expect = f"checkpoint `{path}` is corrupt: 4 unexpected bytes after its {n}-byte payload"
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        load_checkpoint(path)


def test_flipped_byte_refused(tmp_path):
    path = save_checkpoint(tmp_path / "a.ckpt", _state())
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    expect = f"checkpoint `{path}` is corrupt: checksum mismatch (header `"
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        load_checkpoint(path)


def test_wrong_magic_refused(tmp_path):
    path = tmp_path / "a.ckpt"
    path.write_bytes(b"NOTAMSTR" + bytes(200))
    with pytest.raises(CheckpointError, match=re.escape(f"`{path}` is not an amstream checkpoint: it does not start with `AMSTREAM`")):
        load_checkpoint(path)


def test_plain_torch_save_file_gets_a_hint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)
    expect = f"`{path}` is not an amstream checkpoint: it does not start with `AMSTREAM` (it looks like a plain `torch.save` file)"
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        load_checkpoint(path)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0])
def test_unsupported_version_refused(tmp_path, version):
    buffer = io.BytesIO()
    torch.save({"state": {}, "metadata": {}}, buffer)
    path = tmp_path / "a.ckpt"
    path.write_bytes(_with_header(buffer.getvalue(), version=version))
    expect = f"checkpoint `{path}` has format version `{version}`; this amstream reads versions 1 to `{FORMAT_VERSION}`"
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        load_checkpoint(path)


class Payload:
    """Stands in for an arbitrary object a malicious or careless writer might pickle."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_arbitrary_object_payload_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save({"state": {"evil": Payload()}, "metadata": {}}, buffer)
    path = tmp_path / "evil.ckpt"
    path.write_bytes(_with_header(buffer.getvalue()))  # correct header and checksum
    expect = (
        f"checkpoint `{path}` cannot be loaded with `torch.load(weights_only=True)`: "
        f"Trying to load unsupported GLOBAL {os.system.__module__}.system"
    )
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        load_checkpoint(path)


def test_payload_without_state_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save([1, 2, 3], buffer)
    path = tmp_path / "a.ckpt"
    path.write_bytes(_with_header(buffer.getvalue()))
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint `{path}` is corrupt: its payload has no `state` dict")):
        load_checkpoint(path)


def test_latest_checkpoint_skips_corrupt_newer_one(tmp_path, caplog):
    older = save_checkpoint(tmp_path / "older.ckpt", {"n": 1})
    newer = save_checkpoint(tmp_path / "newer.ckpt", {"n": 2})
    (tmp_path / "ignored.txt").write_text("not a checkpoint")
    os.utime(older, ns=(1_000_000_000, 1_000_000_000))
    os.utime(newer, ns=(2_000_000_000, 2_000_000_000))
    assert latest_checkpoint(tmp_path)["state"] == {"n": 2}

    newer.write_bytes(newer.read_bytes()[:-3])
    os.utime(newer, ns=(2_000_000_000, 2_000_000_000))
    with caplog.at_level(logging.WARNING, logger="amstream.checkpoint"):
        found = latest_checkpoint(tmp_path)
    assert found["path"] == older and found["state"] == {"n": 1}
    assert f"skipping checkpoint: checkpoint `{newer}` is truncated" in caplog.text


def test_latest_checkpoint_none(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "bad.ckpt").write_bytes(b"garbage")
    assert latest_checkpoint(tmp_path) is None


def test_manager_names_prunes_and_restores(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpts", keep=3)
    assert manager.restore() is None
    for step in (10, 20, 30, 40, 50):
        manager.save(step, {"offsets": {"events": {0: step + 1}}, "w": torch.full((2,), float(step))})
    assert [p.name for p in manager.checkpoints()] == [
        "step-000000030.ckpt",
        "step-000000040.ckpt",
        "step-000000050.ckpt",
    ]
    restored = manager.restore()
    assert restored["metadata"] == {"step": 50}
    assert restored["state"]["offsets"] == {"events": {0: 51}}


def test_manager_restore_falls_back_past_corrupt_newest(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save(1, {"n": 1})
    newest = manager.save(2, {"n": 2})
    raw = bytearray(newest.read_bytes())
    raw[-1] ^= 0xFF
    newest.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="amstream.checkpoint"):
        restored = manager.restore()
    assert restored["state"] == {"n": 1}
    assert "checksum mismatch" in caplog.text
    # the service carries on from step 1 and overwrites the corrupt step 2
    manager.save(2, {"n": 22})
    assert manager.restore()["state"] == {"n": 22}


def test_manager_refuses_backwards_steps_and_bad_arguments(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save(5, {"n": 5})
    expect = f"cannot save step `4` in `{tmp_path}`: it already holds step `5`; steps must not go backwards"
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        manager.save(4, {"n": 4})
    with pytest.raises(CheckpointError, match=re.escape("`step` must be an int >= 0, got `-1`")):
        manager.save(-1, {})
    with pytest.raises(CheckpointError, match=re.escape("`keep` must be an int >= 1, got `0`")):
        CheckpointManager(tmp_path, keep=0)


def test_manager_removes_stale_temporary_files(tmp_path):
    stale = tmp_path / ".step-000000001.ckpt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    manager = CheckpointManager(tmp_path, keep=1)
    manager.save(1, {"n": 1})
    assert sorted(os.listdir(tmp_path)) == ["step-000000001.ckpt"]
