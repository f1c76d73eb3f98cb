"""Atomic, versioned, checksummed checkpoint files.

A checkpoint is one file: a fixed 84-byte header followed by a `torch.save` payload.

========  ======  ==============================================================
offset    size    field
========  ======  ==============================================================
0         8       magic bytes ``b"AMSTREAM"``
8         4       format version, unsigned little-endian (`FORMAT_VERSION`)
12        8       payload length in bytes, unsigned little-endian
20        64      sha256 of the payload, lowercase hex (ASCII)
84        ...     payload: ``torch.save({"state": state, "metadata": metadata})``
========  ======  ==============================================================

The header is checked before anything is unpickled, so a truncated or corrupt file is
refused with a `CheckpointError` that names the file and the problem. The payload is
then read with ``torch.load(..., weights_only=True)``, which never runs arbitrary
pickled code: a checkpoint holds only tensors, Python scalars, strings, bytes, ``None``
and lists / tuples / dicts of those (a model's or optimizer's ``state_dict()``, Kafka
offsets, counters, a config as a dict). `save_checkpoint` refuses anything else up front.

Writes are atomic: the file is written to a temporary file in the same directory,
flushed and fsynced, renamed over the target with `os.replace`, and the directory is
fsynced. A crash leaves either the old file or the new one, never half of one.

`CheckpointManager` keeps numbered files (``step-000000123.ckpt``) in one directory,
prunes old ones and restores the newest valid one; it is what a streaming service uses
to checkpoint learner state together with the Kafka offsets it has consumed (commit
the offsets to Kafka only after `CheckpointManager.save` has returned).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict, Union

import torch

from amstream.exceptions import CheckpointError, CheckpointsLostError
from amstream.faults import kill_point

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "CheckpointManager",
    "LoadedCheckpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
State = dict[str, Any]

MAGIC = b"AMSTREAM"
FORMAT_VERSION = 1
# magic, format version (uint32), payload length (uint64), sha256 hex (64 ASCII bytes)
_HEADER = struct.Struct("<8sIQ64s")
HEADER_SIZE = _HEADER.size  # 84

# Leaf values `torch.load(weights_only=True)` reads back without running pickled code.
_LEAF_TYPES = (torch.Tensor, bool, int, float, complex, str, bytes, type(None))
_KEY_TYPES = (str, int, float, bool, type(None))


class LoadedCheckpoint(TypedDict):
    """What `load_checkpoint` returns.

    Keys: ``state`` (the dict given to `save_checkpoint`), ``metadata`` (the metadata
    dict, ``{}`` when none was given), ``format_version`` (int, from the header) and
    ``path`` (the `Path` that was read).
    """

    state: State
    metadata: dict[str, Any]
    format_version: int
    path: Path


def _check_plain(obj: Any, where: str) -> None:
    """Refuse values that would not load back with ``weights_only=True``."""
    if isinstance(obj, Mapping):
        if not isinstance(obj, dict):  # OrderedDict is a dict; other mappings are not
            raise CheckpointError(
                f"cannot checkpoint `{where}`: type `{type(obj).__name__}` is not a plain dict"
            )
        for key, value in obj.items():
            if not (isinstance(key, _KEY_TYPES) or _is_plain_tuple_key(key)):
                raise CheckpointError(
                    f"cannot checkpoint `{where}`: key `{key!r}` of type "
                    f"`{type(key).__name__}` is not a str, int, float, bool or None"
                )
            _check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):  # includes torch.Size
        if type(obj) not in (list, tuple, torch.Size):
            raise CheckpointError(
                f"cannot checkpoint `{where}`: type `{type(obj).__name__}` is not a plain list or tuple"
            )
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _LEAF_TYPES):
        hint = " (convert it with `torch.from_numpy`)" if type(obj).__module__ == "numpy" else ""
        raise CheckpointError(
            f"cannot checkpoint `{where}`: type `{type(obj).__module__}.{type(obj).__qualname__}` "
            f"is not a tensor, Python scalar, string, list or dict{hint}"
        )


def _is_plain_tuple_key(key: Any) -> bool:
    return type(key) is tuple and all(isinstance(k, _KEY_TYPES) for k in key)


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, header: bytes, payload: memoryview) -> None:
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint `{path}`: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            kill_point("checkpoint-write")
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        kill_point("checkpoint-rename")
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise CheckpointError(f"cannot write checkpoint `{path}`: {exc}") from exc
        raise
    try:
        _fsync_directory(directory)
    except OSError as exc:  # the file is in place; only its durability is in doubt
        raise CheckpointError(f"wrote checkpoint `{path}` but could not fsync `{directory}`: {exc}") from exc


def save_checkpoint(
    path: PathLike, state: Mapping[str, Any], *, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``state`` (and ``metadata``) to ``path`` atomically; return the path.

    Parameters
    ----------
    path
        Target file. Its directory is created if needed. An existing file is replaced
        only once the new one has been written and fsynced completely.
    state
        A dict of tensors, Python scalars, strings, bytes, ``None``, and lists / tuples /
        dicts of those, such as ``{"model": model.state_dict(), "offsets": {...}}``.
        Tensors are saved as they are (move them to the CPU first if the file should load
        without a GPU; `load_checkpoint` maps them to the CPU by default anyway).
    metadata
        A small dict of the same kinds of values (step, time, config) stored next to
        the state.

    Raises
    ------
    CheckpointError
        If ``state`` or ``metadata`` holds a value that cannot be loaded back safely, or
        the file cannot be written; the previous file at ``path`` is then left as it was.

    Examples
    --------
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> p = save_checkpoint(d / "a.ckpt", {"w": torch.arange(3.0), "n_samples": 3},
    ...                     metadata={"step": 1})
    >>> ckpt = load_checkpoint(p)
    >>> ckpt["state"]["w"], ckpt["state"]["n_samples"], ckpt["metadata"], ckpt["format_version"]
    (tensor([0., 1., 2.]), 3, {'step': 1}, 1)
    """
    path = Path(path)
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"cannot checkpoint to `{path}`: `state` must be a dict, got `{type(state).__name__}`"
        )
    if metadata is not None and not isinstance(metadata, Mapping):
        raise CheckpointError(
            f"cannot checkpoint to `{path}`: `metadata` must be a dict or None, "
            f"got `{type(metadata).__name__}`"
        )
    state = dict(state)
    metadata = dict(metadata or {})
    _check_plain(state, "state")
    _check_plain(metadata, "metadata")

    # Serialise in memory first: the checksum and length go in the header, and a
    # failure here leaves the file system untouched.
    buffer = io.BytesIO()
    try:
        torch.save({"state": state, "metadata": metadata}, buffer)
    except Exception as exc:
        raise CheckpointError(f"cannot checkpoint to `{path}`: serialising failed: {exc}") from exc
    with buffer.getbuffer() as payload:
        digest = hashlib.sha256(payload).hexdigest().encode("ascii")
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), digest)
        _write_atomically(path, header, payload)
    return path


def load_checkpoint(path: PathLike, *, map_location: Any = "cpu") -> LoadedCheckpoint:
    """Read and verify a file written by `save_checkpoint`.

    Parameters
    ----------
    path
        The checkpoint file.
    map_location
        Passed to `torch.load`: where tensors go (default: the CPU).

    Returns
    -------
    LoadedCheckpoint
        A dict with keys ``state``, ``metadata``, ``format_version`` and ``path``.

    Raises
    ------
    CheckpointError
        One error naming the file and the problem, when the file is missing, is not an
        amstream checkpoint, has an unsupported format version, is truncated or has
        trailing bytes, fails its checksum, or holds anything but plain tensors and
        containers (it is loaded with ``torch.load(..., weights_only=True)``).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header = f.read(HEADER_SIZE)
            if len(header) < len(MAGIC) or header[: len(MAGIC)] != MAGIC:
                if MAGIC.startswith(header):
                    raise CheckpointError(
                        f"checkpoint `{path}` is truncated: {len(header)} bytes, "
                        f"shorter than its {HEADER_SIZE}-byte header"
                    )
                hint = " (it looks like a plain `torch.save` file)" if header[:4] == b"PK\x03\x04" else ""
                raise CheckpointError(
                    f"`{path}` is not an amstream checkpoint: it does not start with `{MAGIC.decode()}`{hint}"
                )
            if len(header) < HEADER_SIZE:
                raise CheckpointError(
                    f"checkpoint `{path}` is truncated: {len(header)} bytes, "
                    f"shorter than its {HEADER_SIZE}-byte header"
                )
            _, version, length, digest = _HEADER.unpack(header)
            if not 1 <= version <= FORMAT_VERSION:
                raise CheckpointError(
                    f"checkpoint `{path}` has format version `{version}`; this amstream reads "
                    f"versions 1 to `{FORMAT_VERSION}` (was it written by a newer amstream?)"
                )
            payload = f.read(length)
            if len(payload) < length:
                raise CheckpointError(
                    f"checkpoint `{path}` is truncated: its header announces {length} payload "
                    f"bytes, the file holds {len(payload)}"
                )
            extra = len(f.read(1 << 20))
            if extra:
                raise CheckpointError(
                    f"checkpoint `{path}` is corrupt: {'at least ' if extra == 1 << 20 else ''}"
                    f"{extra} unexpected bytes after its {length}-byte payload"
                )
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint `{path}` does not exist") from exc
    except IsADirectoryError as exc:
        raise CheckpointError(f"checkpoint `{path}` is a directory, not a file") from exc
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint `{path}`: {exc}") from exc

    actual = hashlib.sha256(payload).hexdigest()
    expected = digest.decode("ascii", errors="replace")
    if actual != expected:
        raise CheckpointError(
            f"checkpoint `{path}` is corrupt: checksum mismatch (header `{expected[:16]}…`, "
            f"payload `{actual[:16]}…`)"
        )
    try:
        content = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint `{path}` cannot be loaded with `torch.load(weights_only=True)`: {_load_reason(exc)}"
        ) from exc
    if not (isinstance(content, dict) and isinstance(content.get("state"), dict)):
        raise CheckpointError(f"checkpoint `{path}` is corrupt: its payload has no `state` dict")
    metadata = content.get("metadata") or {}
    return LoadedCheckpoint(state=content["state"], metadata=metadata, format_version=version, path=path)


def _load_reason(exc: Exception) -> str:
    """The informative part of a `torch.load` error, without its generic advice."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", str(exc)) if p.strip()]
    useful = [
        p
        for p in paragraphs
        if not p.startswith(("Weights only load failed", "Check the documentation", "Please file an issue"))
    ]
    return "; ".join(useful or paragraphs[:1]) or type(exc).__name__


def latest_checkpoint(
    directory: PathLike, pattern: str = "*.ckpt", *, map_location: Any = "cpu"
) -> LoadedCheckpoint | None:
    """Load the newest valid checkpoint among the files in ``directory`` matching ``pattern``.

    "Newest" means the latest modification time (ties broken by file name). Files that
    fail to load are skipped with a logged warning, so a checkpoint corrupted by a crash
    or a full disk falls back to the one before it. Returns ``None`` when the directory
    is missing or holds no valid checkpoint.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = []
    for p in directory.glob(pattern):
        try:
            if p.is_file():
                candidates.append((p.stat().st_mtime_ns, p.name, p))
        except OSError:  # removed meanwhile
            continue
    return _first_valid([p for *_, p in sorted(candidates, reverse=True)], map_location)


def _first_valid(paths: list[Path], map_location: Any) -> LoadedCheckpoint | None:
    for p in paths:
        try:
            return load_checkpoint(p, map_location=map_location)
        except CheckpointError as exc:
            logger.warning("skipping checkpoint: %s", exc)
    return None


class CheckpointManager:
    """Numbered checkpoints in one directory: save, prune, restore the newest valid one.

    Files are named ``step-000000123.ckpt`` (the step zero-padded to 9 digits) and are
    ordered by that step, not by modification time. Use one manager per directory.

    Parameters
    ----------
    directory
        Where the checkpoints live; created on the first `save`.
    keep
        How many of the newest checkpoints to keep (at least 1). Older ones are deleted
        after each successful save, so a corrupt newest file still has fallbacks.

    Examples
    --------
    >>> import tempfile, torch
    >>> manager = CheckpointManager(tempfile.mkdtemp(), keep=2)
    >>> for step in (100, 200, 300):
    ...     path = manager.save(step, {"w": torch.full((2,), float(step)), "offsets": {"0": step}})
    >>> [p.name for p in manager.checkpoints()]
    ['step-000000200.ckpt', 'step-000000300.ckpt']
    >>> restored = manager.restore()
    >>> restored["metadata"]["step"], restored["state"]["offsets"]
    (300, {'0': 300})
    """

    prefix = "step-"
    suffix = ".ckpt"
    _name_re = re.compile(r"^step-(\d+)\.ckpt$")

    def __init__(self, directory: PathLike, *, keep: int = 3) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise CheckpointError(f"`keep` must be an int >= 1, got `{keep!r}`")
        self.directory = Path(directory)
        self.keep = keep

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.directory)!r}, keep={self.keep})"

    def path_for(self, step: int) -> Path:
        """The file name used for ``step``."""
        return self.directory / f"{self.prefix}{step:09d}{self.suffix}"

    def checkpoints(self) -> list[Path]:
        """Checkpoint files in the directory, oldest step first (validity not checked)."""
        return [p for _, p in self._numbered()]

    def steps(self) -> list[int]:
        """The steps that have a checkpoint file, in increasing order."""
        return [s for s, _ in self._numbered()]

    def _numbered(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = self._name_re.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(self, step: int, state: Mapping[str, Any], *, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write ``state`` as the checkpoint of ``step``, then prune old ones; return its path.

        ``metadata["step"]`` is set to ``step``. Steps must not go backwards: saving a step
        lower than the newest file already in the directory raises `CheckpointError`
        (saving the same step again replaces that file atomically).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(f"`step` must be an int >= 0, got `{step!r}`")
        existing = self.steps()
        if existing and step < existing[-1]:
            raise CheckpointError(
                f"cannot save step `{step}` in `{self.directory}`: it already holds step "
                f"`{existing[-1]}`; steps must not go backwards (use a new directory to start over)"
            )
        meta = dict(metadata or {})
        meta["step"] = step
        path = save_checkpoint(self.path_for(step), state, metadata=meta)
        self.prune()
        return path

    def prune(self) -> list[Path]:
        """Delete all but the `keep` newest checkpoints and stale temporary files; return what was deleted."""
        removed = []
        for p in self.checkpoints()[: -self.keep]:
            p.unlink(missing_ok=True)
            removed.append(p)
        # temporary files left by a writer killed mid-write (see `save_checkpoint`)
        for p in self.directory.glob(f".{self.prefix}*{self.suffix}.*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
        for p in removed:
            logger.debug("pruned %s", p)
        return removed

    def restore(self, *, map_location: Any = "cpu", strict: bool = False) -> LoadedCheckpoint | None:
        """Load the checkpoint with the highest step that is valid, or ``None``.

        Corrupt or truncated files are skipped with a logged warning. With ``strict``, a directory
        whose checkpoints are all unreadable raises `CheckpointError` instead of returning ``None``:
        a model that existed is lost, which a long-running learner must not take for a first start.
        """
        paths = self.checkpoints()[::-1]
        loaded = _first_valid(paths, map_location)
        if loaded is None and strict and paths:
            raise CheckpointsLostError(
                f"none of the {len(paths)} checkpoint(s) in `{self.directory}` can be read (newest: "
                f"`{paths[0].name}`); the model they held is lost")
        return loaded
