"""webdataset tar shards: reading that notices what was lost, and locks for writing them.

Reading (`tar_samples`): the webdataset layout (members `{key}.{suffix}` grouped by key, the
suffix lower-cased, `__*__` members skipped), opened with `webdataset.gopen` (local paths,
`pipe:CMD`, http(s)), with three checks that webdataset's own reader does not make:
- end of archive: a tar ends with an end-of-archive marker (a zero block). Python's `tarfile`
  reads a file cut at a member boundary or inside a header block as a shorter, valid archive;
  here a missing marker raises `ShardError` naming the number of members read;
- every other read error (a cut inside member data, a failed download, a `pipe:` command that
  exits non-zero) raises `ShardError` too, so a caller never mistakes a partial read for a shard;
- duplicate keys: a key seen before in the shard, adjacent or not, is the same sample again. The
  first is kept and each later one is passed to `on_duplicate(key)` and dropped.

Writing (`FileLock`): an exclusive lock on a file between processes and hosts, for one shard or
one output folder. It is a POSIX record lock (`fcntl.lockf`: the kernel releases it when its
process dies, however it dies; NFS and GPFS carry it between hosts) on a file that also names the
holder (host, pid). On a file system without POSIX locks (Lustre mounted without `flock`), the
file itself is the lock (created with O_EXCL) and a holder counts as gone when its process is dead
(same host: pid and start time) or its heartbeat (the file's mtime, refreshed by `heartbeat()`)
is older than `STALE_S` seconds (other hosts). Writers check `still_held()` before they commit.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import tarfile
import time
from pathlib import Path
from typing import Callable, Iterator

STALE_S = 600.0       # fallback locks: a holder on another host whose heartbeat is older is gone
HEARTBEAT_S = 30.0
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
_HELD: dict[str, "FileLock"] = {}  # locks of this process: POSIX locks do not exclude their own process
os.register_at_fork(after_in_child=_HELD.clear)


class ShardError(Exception):
    """A shard that could not be read to its end."""


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


class _Info(tarfile.TarInfo):
    """Records on its TarFile whether the member loop ended at an end-of-archive block."""

    @classmethod
    def fromtarfile(cls, tf):
        tf.lct_end = None
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            tf.lct_end = "marker"
            raise
        except tarfile.HeaderError as err:
            tf.lct_end = f"{type(err).__name__}: {err}"
            raise


def tar_members(url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular member of a tar (plain or compressed) in order; raises
    `ShardError` for a read error or a missing end-of-archive marker."""
    import webdataset as wds

    n = 0
    try:
        stream = wds.gopen(url, "rb")
    except Exception as err:
        raise ShardError(f"cannot open: {type(err).__name__}: {str(err)[:300]}") from None
    complete = False
    try:
        tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_Info)
        for info in tf:
            if info.isreg():
                data = tf.extractfile(info).read()
                n += 1
                yield info.name, data
            tf.members = []  # stream mode: do not keep every header
        if getattr(tf, "lct_end", None) != "marker":
            why = getattr(tf, "lct_end", None) or "the data ends without one"
            raise ShardError(f"truncated: no end-of-archive marker after {n} members ({why}); the file was cut "
                             "or its writer died before closing it")
        complete = True
    except ShardError:
        raise
    except Exception as err:  # tarfile.ReadError, EOFError, zlib/gzip errors, pipe exit status
        raise ShardError(f"read error after {n} members: {type(err).__name__}: {str(err)[:300]}") from None
    finally:
        try:
            stream.close()
        except Exception as err:  # a pipe: command that failed: the data read is not trusted
            if complete:
                raise ShardError(f"{type(err).__name__}: {str(err)[:300]}") from None


def split_name(name: str) -> tuple[str | None, str | None]:
    """webdataset's `base_plus_ext`: ("dir/key", "suffix") at the first dot of the basename."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2)) if m else (None, None)


def tar_samples(url: str, on_duplicate: Callable[[str], None] | None = None) -> Iterator[dict]:
    """Samples {"__key__", "__url__", suffix: bytes} of a shard in order (module docstring)."""
    seen: set[str] = set()
    current: dict | None = None

    def done(sample):
        if sample is None:
            return None
        if sample["__key__"] in seen:
            if on_duplicate is not None:
                on_duplicate(sample["__key__"])
            return None
        seen.add(sample["__key__"])
        return sample

    for name, data in tar_members(url):
        if re.match(r"__[^/]*__($|/)", name):
            continue
        key, suffix = split_name(name)
        if key is None:
            continue
        suffix = suffix.lower()
        if current is None or key != current["__key__"] or suffix in current:
            out = done(current)
            if out is not None:
                yield out
            current = {"__key__": key, "__url__": url}
        current[suffix] = data
    out = done(current)
    if out is not None:
        yield out


# ----------------------------------------------------------------------------------------------
# Locks
# ----------------------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot) from /proc, to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _start_time(pid)
    return started is None or now is None or now == started


class FileLock:
    """An exclusive lock on `path` (module docstring). `acquire()` returns True or False (then
    `holder` says who has it); `release(remove=True)` also deletes the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd: int | None = None
        self.mode: str | None = None        # "posix" | "file" while held
        self.holder: dict | None = None
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}
        self._beat = 0.0

    def describe(self, info: dict | None = None) -> str:
        info = info if info is not None else self.holder
        if not info:
            return "another process"
        return f"pid {info.get('pid')} on {info.get('host')}"

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def _write(self, fd: int) -> None:
        data = json.dumps({**self.me, "time": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def acquire(self, wait: bool = False, timeout: float = 3600.0) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.time() + timeout
        while True:
            got = self._try(wait)
            if got or not wait:
                return got
            if time.time() > deadline:
                return False
            time.sleep(0.5)

    def _try(self, wait: bool) -> bool:
        other = _HELD.get(str(self.path.absolute()))
        if other is not None:
            self.holder = {**other.me, "note": "this process"}
            return False
        got = self._try_os(wait)
        if got:
            _HELD[str(self.path.absolute())] = self
        return got

    def _try_os(self, wait: bool) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EACCES, errno.EAGAIN):
                self.holder = self._read()
                return False
            if err.errno not in _NO_LOCKS:
                raise
            return self._try_file()
        if not self.path.exists() or os.stat(fd).st_ino != self.path.stat().st_ino:
            os.close(fd)  # removed by its previous holder after we opened it: try the new file
            return self._try_os(wait)
        self._write(fd)
        self.fd, self.mode, self.holder = fd, "posix", None
        return True

    def _try_file(self) -> bool:
        """The fallback: the file exists while held."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = self._read()
                if not self._stale(info):
                    self.holder = info
                    return False
                try:  # break it: only one of several breakers wins the rename
                    gone = self.path.with_name(f"{self.path.name}.stale.{self.me['host']}.{self.me['pid']}")
                    os.rename(self.path, gone)
                    gone.unlink()
                except FileNotFoundError:
                    pass
                continue
            self._write(fd)
            os.close(fd)
            self.mode, self.holder = "file", None
            return True
        self.holder = self._read()
        return False

    def _stale(self, info: dict | None) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if info and info.get("host") == self.me["host"] and isinstance(info.get("pid"), int):
            return not _alive(info["pid"], info.get("started"))
        return age > STALE_S

    def still_held(self) -> bool:
        if self.mode == "posix":
            return True  # the kernel holds it for us
        if self.mode == "file":
            info = self._read() or {}
            return all(info.get(k) == v for k, v in self.me.items())
        return False

    def heartbeat(self) -> None:
        now = time.time()
        if self.mode == "file" and now - self._beat > HEARTBEAT_S:
            self._beat = now
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self, remove: bool = False) -> None:
        if self.mode is None:
            return
        if remove or self.mode == "file":
            if self.still_held():
                self.path.unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)  # closing releases the POSIX lock
        self.fd, self.mode = None, None
        _HELD.pop(str(self.path.absolute()), None)

    def probe(self) -> dict | None:
        """The holder of an existing lock file, or None when it is free (without taking it)."""
        if not self.path.exists():
            return None
        if self.acquire(wait=False):
            self.release()
            return None
        return self.holder or {}

    def __enter__(self):
        if not self.acquire(wait=True):
            raise TimeoutError(f"{self.path}: held by {self.describe()}")
        return self

    def __exit__(self, *exc):
        self.release()
        return False
