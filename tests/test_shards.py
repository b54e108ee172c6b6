"""lct.shards: a tar cut anywhere is an error (not a shorter shard), duplicate keys are reported,
and FileLock excludes other processes, dies with its holder and breaks stale fallback locks."""

import errno
import gzip
import json
import os
import subprocess
import sys
import time

import pytest

from helpers_data import cut_points, hold_lock, write_tar
from lct.shards import FileLock, ShardError, tar_samples


@pytest.fixture
def shard(tmp_path):
    members = []
    for i in range(6):
        members += [(f"k{i:02d}.jpg", bytes([i]) * (300 + 700 * i)), (f"k{i:02d}.txt", f"caption {i}".encode())]
    return write_tar(tmp_path / "00000.tar", members)


def test_an_intact_shard_reads_completely(shard):
    samples = list(tar_samples(str(shard)))
    assert [s["__key__"] for s in samples] == [f"k{i:02d}" for i in range(6)]
    assert samples[3]["txt"] == b"caption 3" and samples[3]["__url__"] == str(shard)


@pytest.mark.parametrize("where", ["member_boundary", "inside_header", "inside_data", "before_end_marker"])
def test_a_tar_cut_anywhere_is_an_error(shard, tmp_path, where):
    """tarfile (and webdataset) read a cut at a member boundary or inside a header as a valid,
    shorter archive; here it raises."""
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:cut_points(shard)[where]])
    got = []
    with pytest.raises(ShardError, match="truncated|read error"):
        for s in tar_samples(str(cut)):
            got.append(s["__key__"])
    assert len(got) < 6


def test_a_truncated_gzip_tar_is_an_error(shard, tmp_path):
    gz = tmp_path / "00000.tar.gz"
    gz.write_bytes(gzip.compress(shard.read_bytes()))
    assert len(list(tar_samples(str(gz)))) == 6
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(gz.read_bytes()[: gz.stat().st_size * 2 // 3])
    with pytest.raises(ShardError):
        list(tar_samples(str(cut)))


def test_missing_file_and_failed_pipe_are_errors(shard, tmp_path):
    with pytest.raises(ShardError, match="cannot open"):
        list(tar_samples(str(tmp_path / "nope.tar")))
    with pytest.raises(ShardError):  # the whole tar arrives, but the command failed
        list(tar_samples(f"pipe:sh -c 'cat {shard}; exit 3'"))
    assert len(list(tar_samples(f"pipe:cat {shard}"))) == 6


def test_duplicate_keys_adjacent_or_not_keep_the_first(tmp_path):
    path = write_tar(tmp_path / "d.tar", [
        ("a.jpg", b"a1"), ("a.txt", b"ta1"), ("a.jpg", b"a2"), ("a.txt", b"ta2"),   # adjacent repeat
        ("b.jpg", b"b1"), ("c.jpg", b"c1"), ("b.jpg", b"b2"), ("b.txt", b"tb2")])    # later repeat
    dups = []
    samples = list(tar_samples(str(path), on_duplicate=dups.append))
    assert [(s["__key__"], s["jpg"]) for s in samples] == [("a", b"a1"), ("b", b"b1"), ("c", b"c1")]
    assert samples[0]["txt"] == b"ta1" and dups == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# Locks
# ---------------------------------------------------------------------------------------------


@pytest.mark.proc
def test_file_lock_excludes_other_processes_and_dies_with_its_holder(tmp_path):
    path = tmp_path / "records" / "00000.lock"
    holder = hold_lock(path)
    try:
        lock = FileLock(path)
        assert not lock.acquire()
        assert f"pid {holder.pid}" in lock.describe()
        assert FileLock(path).probe()["pid"] == holder.pid
        holder.kill()  # SIGKILL, no cleanup: the kernel releases the lock
        holder.wait(30)
        assert lock.acquire() and lock.still_held()
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert not FileLock(path).acquire()  # the same process does not take it twice
        lock.release(remove=True)
        assert not path.exists() and FileLock(path).probe() is None
    finally:
        holder.kill()
        holder.wait()


def test_fallback_lock_without_posix_locks_breaks_only_stale_holders(tmp_path, monkeypatch):
    """On a file system without fcntl locks (Lustre without flock) the file is the lock."""
    import fcntl

    def no_locks(*a):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    path = tmp_path / "x.lock"
    sleeper = subprocess.Popen(["sleep", "60"])  # a live pid of this host (not a Python: no imports)
    try:
        me = FileLock(path)
        host = me.me["host"]
        path.write_text(json.dumps({"host": host, "pid": sleeper.pid}))  # alive, this host
        assert not me.acquire() and me.holder["pid"] == sleeper.pid
        sleeper.kill()
        sleeper.wait()
        assert me.acquire() and me.mode == "file" and me.still_held()  # dead holder: broken
        me.release()
        assert not path.exists()
        path.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
        assert not me.acquire()  # another host, fresh heartbeat
        old = time.time() - 3600
        os.utime(path, (old, old))
        assert me.acquire()  # another host, heartbeat an hour old
        path.write_text(json.dumps({"host": "thief", "pid": 2}))
        assert not me.still_held()  # a writer checks this before it commits
    finally:
        sleeper.kill()
