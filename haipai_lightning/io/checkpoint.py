"""Reading checkpoints safely, writing them atomically.

A checkpoint carries `checkpoint["haipai"]`: the architecture (io/arch.py), the growth log and
the tokenizer. That is enough to rebuild the model without the YAML that trained it, and it holds
only plain types, so every load uses `torch.load(weights_only=True)`; the component specs in it
resolve through the allowlist of io/spec.py.

Writing (no Lightning here, so `haipai generate` / `serve` start without importing it; the Lightning
CheckpointIO that uses these is io/checkpoint_io.py): every checkpoint is written to a temporary file in the destination
directory, fsyncs it, renames it over the final name and fsyncs the directory, so a crash or
SIGKILL at any moment leaves either the previous file or the new one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
import socket
from typing import Any

import torch

from haipai_lightning.config import ConfigError

CHECKPOINT_KEY = "haipai"


def local_path(path: str | os.PathLike) -> str | None:
    path = os.fspath(path)
    if path.startswith("file://"):
        return path[len("file://"):]
    return None if "://" in path else path


def _tmp_path(path: str) -> str:
    d, name = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _fsync_dir(d: str) -> None:
    with contextlib.suppress(OSError):  # not possible on every platform (Windows); the rename is still atomic
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_temps(d: str) -> None:
    """Delete the temporary files a killed save of this host left in `d` (their process is gone)."""
    host = socket.gethostname()
    for entry in os.scandir(d):
        if not entry.name.startswith(".") or ".tmp-" not in entry.name:
            continue
        tag = entry.name.rsplit(".tmp-", 1)[1]
        owner, _, pid = tag.rpartition("-")
        if owner != host or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # dead: the file is an orphan of a killed save
            with contextlib.suppress(OSError):
                os.remove(entry.path)
        except OSError:  # alive (another user's process): leave it
            pass


def _replace_atomically(path: str, write) -> None:
    """write(tmp) then fsync + rename onto `path` + fsync the directory; the temp file never outlives a failure."""
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    _remove_stale_temps(d)
    tmp = _tmp_path(path)
    try:
        write(tmp)
        if not os.path.islink(tmp):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt / SystemExit too: no half-written temp file stays behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(d)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save(obj) to `path` so that a crash at any moment leaves the old file or the new one, whole."""
    _replace_atomically(os.fspath(path), lambda tmp: torch.save(obj, tmp))


def atomic_link(target: str | os.PathLike, link: str | os.PathLike) -> None:
    """Point `link` at `target` (relative symlink; a copy where symlinks are not allowed), atomically."""
    target, link = os.path.abspath(target), os.path.abspath(link)
    if target == link:
        return

    def write(tmp: str) -> None:
        try:
            os.symlink(os.path.relpath(target, os.path.dirname(link)), tmp)
        except OSError:
            shutil.copyfile(target, tmp)

    _replace_atomically(link, write)


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load(weights_only=True) with one-line errors for a missing or damaged file."""
    if isinstance(path, (str, os.PathLike)) and not os.path.isfile(path):
        raise FileNotFoundError(f"--ckpt_path {str(path)!r} does not exist; pass the path of a .ckpt file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses: one line is enough
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...
        raise ConfigError(
            f"checkpoint {str(path)!r} cannot be read safely ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "it is damaged or not a Haipai checkpoint"
        ) from e
    if not isinstance(ckpt, dict):
        raise ConfigError(f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}, not a checkpoint; it is not a Haipai "
                          "checkpoint")
    return ckpt
