"""Atomic writes (files, JSON, directories) and file hashes, for every writer in lct, data_prep and eval.

A reader sees the old content or the whole new content, never a torn file: data go to a temporary
name beside the target, are flushed to disk, and are renamed over it (`os.replace` is atomic on
POSIX within one filesystem). Temporary names are unique per process (`.NAME.tmpPID`), so two
processes writing the same target never share a temporary file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from lct.errors import UserError


def temp_path(path: str | os.PathLike) -> Path:
    """The per-process temporary name of `path`: `.NAME.tmpPID` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """`with atomic_file(p) as f: ...` writes `f` to a temporary file, renamed to `p` when the block
    ends normally (after flush and fsync); on an exception the temporary file is removed."""
    path = Path(path)
    tmp = temp_path(path)
    f = open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    f.close()
    os.replace(tmp, path)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write bytes (or UTF-8 text) to `path` atomically."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> None:
    """`obj` as JSON (UTF-8, non-ASCII kept, a final newline), atomically."""
    write_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a fully written directory `tmp` to `final`; an old `final` is moved aside first and
    removed after the swap (a crash in between leaves `.NAME.old`, never a half directory)."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_dir(d) as tmp: ...` fills a temporary directory beside `d`, which replaces `d`
    when the block ends normally; on an exception the temporary directory is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def output_dir_problem(path: str | os.PathLike, key: str) -> str | None:
    """Why `path` cannot be an output folder (it is a file; a file or an unwritable folder stands
    where it would be made), as one line naming `key` (a flag or config key); None if it can."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        return f"{key} {path} is a file, not a folder; give a folder (it is made if missing)"
    above = next((a for a in [p, *p.absolute().parents] if a.exists()), None)
    if above is not None and not above.is_dir():
        return f"{key} {path}: {above} is a file, so the folder cannot be made; give another folder"
    if above is not None and not os.access(above, os.W_OK | os.X_OK):
        return f"{key} {path}: no permission to write in {above}; give a writable folder"
    return None


def check_out_dir(path: str | os.PathLike, flag: str) -> Path:
    """`path` as an output folder that exists or can be made, else a one-line `UserError` naming
    `flag` (`output_dir_problem`), before any work is spent."""
    problem = output_dir_problem(path, flag)
    if problem:
        raise UserError(problem)
    return Path(path).expanduser()


def read_text(path: str | os.PathLike, flag: str) -> str:
    """The UTF-8 text of a file the user named with `flag`; one-line errors for a missing file, a
    folder, or bytes that are not UTF-8."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{flag} {p}: {'is a folder, not a file' if p.is_dir() else 'file not found'}")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"{flag} {p}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
                        "save the file as UTF-8") from None
