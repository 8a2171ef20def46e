"""One guard for every command that writes a whole folder (``llava.convert``, training's output directory).

What it promises (docs/reliability.md):

- **never into its input**: the destination may not be, contain, or lie inside any input folder
  (``to-hf SRC SRC`` would overwrite the checkpoint it reads);
- **never over a different kind of artifact**: the destination is absent, empty, or a folder this same
  command wrote before (its ``.llava-output.json`` marker names the command); anything else (a model, a
  dataset, a home directory) is refused, naming what it holds, before anything is read or written;
- **never into a folder another live process holds**: an exclusive lock beside the destination
  (``.NAME.lock``, ``llava.utils_io.FileLock``: host + pid; a dead owner's lock is taken over);
- **nothing half-written**: ``output_folder`` yields a fresh temporary sibling to write into; only when the
  block ends without an error does it become the destination (one rename). An earlier output of the same
  command is moved aside and deleted only then (it was written by this command, so removing it deletes
  nothing the user made). On an error the temporary folder is removed and the destination is untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from .utils_io import FileLock

MARKER = ".llava-output.json"


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path)))).resolve()


def check_not_input(destination: str | os.PathLike, inputs: Sequence[str | os.PathLike], command: str) -> Path:
    """``destination`` resolved; a ValueError when it is, contains, or lies inside one of ``inputs``."""
    dst = _resolved(destination)
    for source in inputs:
        if source is None:
            continue
        src = _resolved(source)
        if dst == src or src in dst.parents or dst in src.parents:
            relation = "is" if dst == src else ("lies inside" if src in dst.parents else "contains")
            raise ValueError(
                f"{command}: the destination {str(destination)!r} {relation} the input {str(source)!r}; "
                "writing there would overwrite what is being read: choose another destination folder"
            )
    return dst


def folder_kind(path: Path) -> dict | None:
    """The marker of a folder a guarded command wrote ({"command": ...}), or None."""
    marker = path / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_destination(dst: Path, command: str) -> bool:
    """Whether ``dst`` holds an earlier output of ``command`` (to be replaced); a ValueError when it holds
    anything else. Absent or empty folders are fine (False)."""
    if not dst.exists():
        return False
    if not dst.is_dir():
        raise ValueError(f"{command}: the destination {str(dst)!r} is a file, not a folder")
    entries = sorted(p.name for p in dst.iterdir())
    if not entries:
        return False
    marker = folder_kind(dst)
    if marker is not None and marker.get("command") == command:
        return True
    shown = ", ".join(entries[:6]) + (f", ... ({len(entries)} entries)" if len(entries) > 6 else "")
    written_by = f" (written by {marker.get('command')!r})" if marker else ""
    raise ValueError(
        f"{command}: the destination {str(dst)!r} is not empty and was not written by this command"
        f"{written_by}: it holds {shown}. Nothing was written; choose a new or empty folder"
    )


@contextlib.contextmanager
def output_folder(
    destination: str | os.PathLike,
    command: str,
    inputs: Sequence[str | os.PathLike | None] = (),
    details: dict | None = None,
) -> Iterator[Path]:
    """Guard a command that writes the folder ``destination`` (module docstring). Yields the temporary
    folder to write into; ``command`` names the command and kind of output (``"llava.convert to-hf"``),
    ``inputs`` the folders it reads, ``details`` what goes into the marker besides."""
    dst = check_not_input(destination, inputs, command)
    check_destination(dst, command)  # refuse before taking the lock: a clear error, nothing created
    dst.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(dst.parent / f".{dst.name}.lock", what=f"the output folder {str(dst)!r}"):
        replace = check_destination(dst, command)  # again, under the lock
        staging = dst.parent / f".{dst.name}.partial-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)  # our own pid's leftover: written by this command
        staging.mkdir()
        try:
            yield staging
            marker = {"command": command, "inputs": [str(_resolved(p)) for p in inputs if p is not None]}
            marker.update(details or {})
            (staging / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            if replace:
                old = dst.parent / f".{dst.name}.replaced-{os.getpid()}"
                os.replace(dst, old)
                os.replace(staging, dst)
                shutil.rmtree(old)  # an earlier output of this same command (its marker says so)
            else:
                if dst.exists():
                    dst.rmdir()  # empty (checked under the lock)
                os.replace(staging, dst)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
