"""Writing files so that a crash, a full disk or a second process never leaves a half-written one.

- ``atomic_write(path)``: a context manager yielding a temporary path beside ``path``; the caller writes
  there (with any writer: ``torch.save``, ``safetensors.save_file``, ``json.dump``), and only when the
  block ends without an error is the file renamed onto ``path`` (``os.replace``, atomic on POSIX). On an
  error the temporary file is removed and an ``OSError`` names the file and the cause (a full disk raises
  e.g. torch's ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``; here it reads
  "writing X failed ... nothing was written under that name").
- ``atomic_write_json`` / ``atomic_write_text``: the same for small text files.
- ``FileLock``: an exclusive lock file (``O_CREAT | O_EXCL``) holding the owner's host and pid; a lock
  left by a dead process on this host is taken over, a live one is refused with its owner named.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path`` in one rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=folder)
    os.close(handle)
    try:
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise OSError(
            getattr(err, "errno", None) or errno.EIO,
            f"writing {path} failed ({type(err).__name__}: {err}); nothing was written under that name "
            "(is the disk full or the folder read-only?)",
        ) from err


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    with atomic_write(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
    return os.fspath(path)


def atomic_write_json(path: str | os.PathLike, data, indent: int = 2) -> str:
    return atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=True, ensure_ascii=False) + "\n")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """An exclusive lock on a resource, held as the file ``lock_path`` (``{"host", "pid"}``).

    ``acquire`` raises ``FileExistsError`` naming the owner when another live process holds it; a lock whose
    owner process is gone (same host) is stale and taken over. Use as a context manager.
    """

    def __init__(self, lock_path: str | os.PathLike, what: str = ""):
        self.lock_path = os.fspath(lock_path)
        self.what = what or self.lock_path
        self.held = False

    def _owner(self) -> dict:
        try:
            with open(self.lock_path, encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return {}

    def acquire(self) -> FileLock:
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _attempt in range(2):
            try:
                descriptor = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                same_host = owner.get("host") == me["host"]
                pid = owner.get("pid")
                if same_host and isinstance(pid, int) and not process_alive(pid):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.lock_path)  # stale: its process died without releasing it
                    continue
                raise FileExistsError(
                    errno.EEXIST,
                    f"{self.what} is in use by another process (lock {self.lock_path}: host "
                    f"{owner.get('host')!r}, pid {pid}); wait for it to finish, or delete the lock file if "
                    "that process is gone"
                ) from None
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise RuntimeError(f"could not take the lock {self.lock_path}")

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.lock_path)
            self.held = False

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
