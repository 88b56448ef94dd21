"""Writing files safely: every file vtprune writes goes through here.

* `atomic_write_text` / `atomic_write_bytes` / `atomic_write_json` / `atomic_open`: the data goes to a
  temporary file in the target's own folder, is flushed and fsync'ed, then renamed over the target
  (`os.replace`, atomic on POSIX and Windows). A reader, or a process killed mid-write (even with `kill -9`),
  sees the old file or the new one, never a mix or a truncated one.
* `prepare_output_dir` / `prepare_output_file`: create the (nested) folders of an output path and check that a
  file can really be written there, before any model loads (a probe file, not `os.access`, which says yes to
  root everywhere).
* `OutputLock`: one writer per output. The lock is an advisory `flock` on a lock file beside the output,
  which holds the holder's pid, host, command and start time. A second writer gets a `LockedError` naming the
  holder, or waits (`wait=True`). The kernel drops the lock when its holder dies, so a lock left by a killed
  run is taken over at once (with a note saying whose it was).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; outputs are still written atomically
    fcntl = None

_UMASK = os.umask(0)  # read once, at import (setting it back at once; not thread-safe later)
os.umask(_UMASK)

#: the lock file of an output folder
LOCK_NAME = ".vtprune.lock"


class OutputError(ValueError):
    """An output path that cannot be written (a usage error: the message names the option and the path)."""


class LockedError(RuntimeError):
    """Another vtprune process is writing the same output (the message names it)."""


# --- atomic writes ----------------------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (best effort: not every OS or file system supports it)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator:
    """`open(path, mode)` whose content replaces `path` only when the block ends without an error (mode "w" or
    "wb"; kwargs as for `open`, e.g. newline="" for csv)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode {mode!r}: use 'w' or 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600): give it the target's mode, or what open() would
        with suppress(OSError, AttributeError):
            os.fchmod(handle, os.stat(path).st_mode & 0o7777 if path.exists() else 0o666 & ~_UMASK)
        with os.fdopen(handle, mode, **kwargs) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_open(path, "wb") as file:
        file.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_open(path, "w", encoding="utf-8") as file:
        file.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data, indent: int | None = 1) -> Path:
    """Write `data` as JSON to `path` atomically; returns the path."""
    return atomic_write_text(path, json.dumps(data, indent=indent))


# --- output paths -----------------------------------------------------------------------------------------
def prepare_output_dir(path: str | os.PathLike, option: str) -> Path:
    """Create the folder `path` (with its parents) and check that a file can be written in it; an `OutputError`
    naming `option` otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file: give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".vtprune-probe.", dir=path)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OutputError(f"{option} {path}: cannot write there ({reason}): give a writable folder") from None
    return path


def prepare_output_file(path: str | os.PathLike, option: str) -> Path:
    """Check that the file `path` can be written (its folder created if needed); an `OutputError` naming
    `option` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory: give a file name")
    if path.name in ("", ".", ".."):
        raise OutputError(f"{option} {path}: give a file name")
    try:
        prepare_output_dir(path.parent, option)
    except OutputError:
        raise OutputError(
            f"{option} {path}: cannot create or write its folder {path.parent}: give a writable path"
        ) from None
    return path


# --- locks ------------------------------------------------------------------------------------------------
def _describe(holder: dict) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    command = holder.get("command") or "?"
    started = holder.get("started")
    since = "" if not isinstance(started, (int, float)) else time.strftime(" since %H:%M:%S", time.localtime(started))
    return f"pid {pid} on {host} ({command}){since}"


def _read_holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lock_path_for(output: str | os.PathLike, is_dir: bool) -> Path:
    """The lock file of an output folder (`folder/.vtprune.lock`) or file (`file.lock` beside it)."""
    output = Path(output)
    return output / LOCK_NAME if is_dir else output.with_name(output.name + ".lock")


class OutputLock:
    """An exclusive lock on one output (a folder or a file), held from `acquire` to `release` (or a `with`).

    option: how the output was given (e.g. "--out"), for messages. wait: block until the holder finishes
    instead of raising `LockedError`. note(text): called once with a line when a lock left by a dead process is
    taken over, or when waiting starts."""

    def __init__(
        self,
        output: str | os.PathLike,
        *,
        option: str = "output",
        is_dir: bool = True,
        wait: bool = False,
        command: str | None = None,
        note: Callable[[str], None] | None = None,
        poll: float = 0.2,
    ):
        self.output = Path(output)
        self.path = lock_path_for(output, is_dir)
        self.option = option
        self.wait = wait
        self.command = command if command is not None else " ".join(["vtprune", *sys.argv[1:]])[:300]
        self.note = note
        self.poll = poll
        self._handle: int | None = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> OutputLock:
        if self._handle is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            return self
        told_waiting = False
        while True:
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(handle)
                holder = _read_holder(self.path)
                if not self.wait:
                    raise LockedError(
                        f"{self.option} {self.output} is in use by another vtprune run, {_describe(holder)}: wait "
                        "for it to finish, pass --wait to wait for it, or write to another folder"
                    ) from None
                if not told_waiting and self.note is not None:
                    self.note(f"waiting for {_describe(holder)} to release {self.output}")
                told_waiting = True
                time.sleep(self.poll)
                continue
            try:  # the file may have been removed (and re-created) by the holder we waited for: lock the current one
                same = os.fstat(handle).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(handle)
                continue
            break
        previous = _read_holder(self.path)
        if previous.get("pid") is not None and self.note is not None:  # released locks are removed: its holder died
            self.note(
                f"took over the lock of {self.output} left by {_describe(previous)}, which is no longer "
                "running; its saved work is kept"
            )
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "started": time.time()}
        os.ftruncate(handle, 0)
        os.pwrite(handle, json.dumps(record).encode(), 0)
        os.fsync(handle)
        self._handle = handle
        return self

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is None:
            return
        with suppress(OSError):
            os.unlink(self.path)  # while still locked: a waiter then finds the file gone and locks a new one
        os.close(handle)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = [
    "OutputError",
    "LockedError",
    "OutputLock",
    "LOCK_NAME",
    "lock_path_for",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "prepare_output_dir",
    "prepare_output_file",
]
