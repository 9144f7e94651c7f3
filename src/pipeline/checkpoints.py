"""Atomic files, the output-dir lock, and checkpoint loading with clear errors."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from compress_run.core.errors import UserError
from compress_run.core.restore import restore_compression

LOCK_FILE = ".lock"
TEMP_SUFFIX = ".partial.tmp"  # atomic_write_bytes writes .<name>.<random>.partial.tmp, then renames it to <name>
TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.partial\.tmp")
_HELD: dict[Path, IO[str]] = {}  # output dir -> its open lock file (kept here: a pipeline must stay picklable)


def lock_output_dir(out: Path) -> None:
    """Hold an exclusive lock on the output dir ``out`` until :func:`unlock_output_dir`: a second compress-run on
    the same dir is refused (exit 2) and told the owner's pid, never two writers. The OS releases the lock when
    the process ends, however it ends (SIGKILL included), so a killed run never leaves it held."""
    out = out.absolute()
    if out in _HELD:
        return
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_FILE, "a+")  # noqa: SIM115 (held open for the run)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "owner unknown"
        handle.close()
        raise UserError(f"output dir {out} is in use by another compress-run ({owner})",
                        "wait for that run to end (a finished or killed run releases the dir), or choose another "
                        "output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                 f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
    handle.flush()
    _HELD[out] = handle
    for stale in out.rglob(".*.tmp"):  # a write a killed run left unfinished: never renamed, so never read
        if stale.is_file() and TEMP_NAME.fullmatch(stale.name):
            stale.unlink(missing_ok=True)


def unlock_output_dir(out: Path) -> None:
    handle = _HELD.pop(out.absolute(), None)
    if handle is not None:
        handle.close()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full(what: str) -> UserError:
    """The error for a write that found no room (disk, quota or file-size limit): ``what`` could not be written."""
    return UserError(f"no room to write {what}", "free space on that disk (or raise the quota or file-size limit) "
                     "and run the same command again: it resumes from the last finished checkpoint")


class _WriteErrors:
    """A file object that remembers the OSError of a failed write (torch.save reports it as a RuntimeError)."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def atomic_write_bytes(path: Path, write) -> None:
    """Write through ``write(fileobj)`` into a temp file beside ``path``, fsync, rename. A full disk (or quota or
    file-size limit) becomes a :class:`UserError`; the file ``path`` held before is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    with os.fdopen(fd, "wb") as raw:
        file = _WriteErrors(raw)
        try:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            cause = file.error if file.error is not None else exc
            if isinstance(cause, OSError) and cause.errno in DISK_FULL:
                raise disk_full(f"{path} ({cause.strerror}); the file it would replace, and every finished stage, "
                                "are left as they were") from exc
            raise
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a half-written checkpoint behind (temp file + rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, Path(path))


def load_checkpoint(path: Path, what: str, fix: str) -> dict[str, Any]:
    """torch.load a checkpoint; an unreadable or foreign file becomes a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist", fix)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"{what} {path} is corrupt or not a PyTorch checkpoint "
                        f"({type(exc).__name__}: {str(exc)[:120]})", fix) from exc
    if not isinstance(ckpt, dict):
        raise UserError(f"{what} {path} holds a {type(ckpt).__name__}, not a checkpoint dict", fix)
    return ckpt


def net_state_from_checkpoint(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network's state dict from a compress-run/Lightning checkpoint (``net.`` prefix) or a plain one."""
    state = ckpt.get("state_dict", ckpt)
    if any(k.startswith("net.") for k in state):
        return {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) or k.endswith("_extra_state")}


def load_net_state(net: torch.nn.Module, state: dict[str, torch.Tensor], misfit: str, fix: str) -> None:
    """Restore the compression ``state`` records into ``net``, then load it strictly; a state that does not fit
    becomes a :class:`UserError` "``misfit``: <the first mismatch torch names>"."""
    restore_compression(net, state)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).split("\n")[1].strip() if "\n" in str(exc) else str(exc)[:200]
        raise UserError(f"{misfit}: {first}", fix) from exc
