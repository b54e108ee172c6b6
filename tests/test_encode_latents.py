"""data_prep/encode_latents.py on tiny models: counts, keys, skips, empty shards, resume after a
kill, two ranks without a process group, latents vs a direct VAE encode, text, CLI errors, bench."""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from helpers_data import (TINY_TEXT_MODEL, cut_points, expected_keys, make_image_shards, make_tiny_vae,
                          hold_lock, read_latent_dir, run_forked, tar_members, tiny_encode_args, write_tar)
from lct.errors import UserError

SCRIPT = str(ROOT / "data_prep" / "encode_latents.py")
CORRUPT, NOCAP = (0, 1), (1, 2)


def encode(argv):
    from lct.data_prep.encode_latents import main

    return main(argv)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a loaded 2-core machine two OpenMP threads make tiny convolutions
    ~50x slower; subprocesses get OMP_NUM_THREADS=1 too (and identical numerics)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("encode")
    return base, make_tiny_vae(base / "vae", latent_channels=4, downsample=4)


@pytest.fixture(scope="module")
def bad_run(tiny):
    """3 input shards of 4: a corrupt JPEG, a caption-less sample, an empty shard; --flip
    --text-states, 2 DataLoader workers. First without, then with --skip-empty-shards."""
    base, vae = tiny
    pattern = make_image_shards(base / "bad", n_shards=3, per_shard=4, size=(40, 28), corrupt=[CORRUPT],
                                missing_caption=[NOCAP], empty=[2])
    out = base / "bad-lat"
    argv = tiny_encode_args(pattern, out, vae, num_workers=2, extra=["--flip", "--text-states"])
    with pytest.raises(UserError) as err:
        encode(argv)
    state = {"error": str(err.value), "tars_after_error": sorted(p.name for p in out.glob("*.tar")),
             "manifest_after_error": (out / "manifest.json").exists()}
    encode(argv + ["--skip-empty-shards"])
    return {"out": out, "pattern": pattern, "vae": vae, "argv": argv, **state,
            "manifest": json.loads((out / "manifest.json").read_text())}


@pytest.fixture(scope="module")
def clean_run(tiny):
    """Reference: 4 clean shards of 3, one process."""
    base, vae = tiny
    pattern = make_image_shards(base / "clean", n_shards=4, per_shard=3, size=(24, 30), seed=1)
    out = base / "clean-lat"
    encode(tiny_encode_args(pattern, out, vae, batch_size=2))
    return {"pattern": pattern, "vae": vae, "out": out, "manifest": json.loads((out / "manifest.json").read_text())}


def input_images(pattern_dir: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(pattern_dir.glob("*.tar")):
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    out[m.name[:-4]] = tar.extractfile(m).read()
    return out


# ----------------------------------------------------------------------------------------------
# One job with bad input
# ----------------------------------------------------------------------------------------------


def test_counts_keys_and_skips(bad_run):
    m, out = bad_run["manifest"], bad_run["out"]
    want = expected_keys(3, 4, skip=[CORRUPT, NOCAP], empty=[2])
    got = read_latent_dir(out)
    assert {k: list(v) for k, v in got.items()} == want  # keys kept, in input order
    assert m["num_samples"] == 6 and m["num_shards"] == 2
    assert m["skipped"] == {"corrupt_image": 1, "missing_caption": 1}
    by_name = {s["name"]: s for s in m["shards"]}
    assert by_name["00000"]["skipped"] == {"corrupt_image": 1} and by_name["00000"]["samples"] == 3
    assert by_name["00001"]["skipped"] == {"missing_caption": 1}
    assert by_name["00000"]["bytes"] == (out / "00000.tar").stat().st_size
    assert not list(out.rglob("*.tmp"))
    assert m["latent_shape"] == [4, 4, 4] and m["resolution"] == 16 and m["flip"] is True
    assert m["format"] == "lct-latents/1" and m["dtype"] == "float16"
    assert m["vae"]["id"] == str(Path(bad_run["vae"]).resolve()) and m["vae"]["downsample"] == 4


def test_empty_shard_fails_after_the_others_then_is_recorded_with_the_flag(bad_run):
    assert "00002" in bad_run["error"] and "--skip-empty-shards" in bad_run["error"]
    assert bad_run["tars_after_error"] == ["00000.tar", "00001.tar"]  # the others completed
    assert not bad_run["manifest_after_error"]
    m = bad_run["manifest"]
    assert m["empty_shards"] == ["00002"] and not (bad_run["out"] / "00002.tar").exists()


def test_latents_equal_a_direct_vae_encode(bad_run):
    from diffusers import AutoencoderKL

    from lct.vae import open_image, preprocess_image

    vae = AutoencoderKL.from_pretrained(bad_run["vae"]).eval()
    images = input_images(Path(bad_run["pattern"]).parent)
    samples = {k: s for shard in read_latent_dir(bad_run["out"]).values() for k, s in shard.items()}
    keys = sorted(samples)
    x = torch.stack([preprocess_image(open_image(images[k]), 16) for k in keys])
    with torch.no_grad():
        d = vae.encode(x).latent_dist
        f = vae.encode(x.flip(-1)).latent_dist
    for i, k in enumerate(keys):
        s = samples[k]
        assert s["mean"].dtype == np.float16 and s["mean"].shape == (4, 4, 4)
        for name, ref in (("mean", d.mean), ("std", d.std), ("flip_mean", f.mean), ("flip_std", f.std)):
            np.testing.assert_allclose(s[name].astype(np.float32), ref[i].numpy().astype(np.float16),
                                       rtol=2e-3, atol=1e-4, err_msg=f"{k} {name}")


def test_text_tokens_states_and_identity(bad_run):
    from lct.latents import load_manifest
    from lct.text import TextEncoder

    m = load_manifest(bad_run["out"])
    t = m["text"]
    enc = TextEncoder.from_manifest(m)
    assert t["tokenizer"] == enc.identity() and t["model"] == TINY_TEXT_MODEL
    assert (t["context_length"], t["state_dim"], t["pooled_dim"]) == (77, 128, 128)
    assert t["states"] is True and t["max_captions"] == 5
    s = read_latent_dir(bad_run["out"])["00000"]["000000000"]
    assert s["captions"] == s["meta"]["captions"] and len(s["captions"]) == 3
    assert np.array_equal(s["tokens"], enc.tokenize(s["captions"]).numpy())
    states, mask, pooled = enc(torch.from_numpy(s["tokens"]).long())
    assert s["states"].shape == (3, 77, 128) and s["states"].dtype == np.float16
    np.testing.assert_allclose(s["states"].astype(np.float32), states.numpy().astype(np.float16), rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(s["pooled"].astype(np.float32), pooled.numpy().astype(np.float16), rtol=2e-3, atol=1e-3)
    per = (3 * 77 * 128 + 3 * 128) * 2
    assert t["states_bytes"]["total"] >= 6 * per and t["states_bytes"]["per_sample"] > per


def test_manifest_statistics_match_the_stored_latents(bad_run):
    from lct.latents import latent_stats
    from lct.vae import LatentNorm

    samples = [s for shard in read_latent_dir(bad_run["out"]).values() for s in shard.values()]
    m = np.stack([s["mean"] for s in samples]).astype(np.float64)  # unflipped only
    sd = np.stack([s["std"] for s in samples]).astype(np.float64)
    mean, std = latent_stats(bad_run["manifest"], "channel")
    np.testing.assert_allclose(mean.ravel(), m.mean(axis=(0, 2, 3)), rtol=1e-12)
    var = (m ** 2).mean(axis=(0, 2, 3)) - m.mean(axis=(0, 2, 3)) ** 2 + (sd ** 2).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(std.ravel(), np.sqrt(var), rtol=1e-10)
    emean, estd = latent_stats(bad_run["manifest"], "element")
    np.testing.assert_allclose(estd, np.sqrt(m.var(axis=0) + (sd ** 2).mean(axis=0)), rtol=1e-10)
    assert LatentNorm.from_manifest(bad_run["out"] / "manifest.json", "element").mean.shape == (4, 4, 4)


def test_merge_only_rewrites_the_same_manifest_and_other_settings_are_refused(bad_run):
    out = bad_run["out"]
    before = (out / "manifest.json").read_bytes()
    (out / "manifest.json").unlink()
    encode(bad_run["argv"] + ["--skip-empty-shards", "--merge-only"])
    assert (out / "manifest.json").read_bytes() == before
    argv = [a if a != "16" else "32" for a in bad_run["argv"]]  # --resolution 32
    with pytest.raises(UserError, match="other settings"):
        encode(argv)


def test_fp16_range_error_names_the_sample():
    from lct.latent_writer import to_fp16

    t = torch.zeros(3, 2)
    t[1, 0] = 7e4
    with pytest.raises(UserError, match="sample k1"):
        to_fp16(t, "the posterior mean", "00007", ["k0", "k1", "k2"])
    assert to_fp16(torch.ones(2, 2), "x", "s", ["a", "b"]).dtype == np.float16


# ----------------------------------------------------------------------------------------------
# Resume, ranks, CLI
# ----------------------------------------------------------------------------------------------


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


@pytest.mark.proc
def test_resume_after_a_kill_mid_shard(tiny, clean_run, tmp_path):
    out = tmp_path / "lat"
    argv = tiny_encode_args(clean_run["pattern"], out, clean_run["vae"], batch_size=2)
    # A forked child (no import cost) dies (lct.faults: status 137, as SIGKILL) in the middle of its second shard.
    assert run_forked(argv, [{"LCT_FAULT_EXIT_MID_SHARD": "1"}]) == [137]
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"]
    assert [p.stat().st_size > 0 for p in out.glob("00001.tar.*.tmp")] == [True]  # half written, per-process name
    assert not (out / "records" / "00001.json").exists() and not (out / "manifest.json").exists()
    first = out / "00000.tar"
    stat0, bytes0 = first.stat(), first.read_bytes()
    encode(argv)
    assert not list(out.rglob("*.tmp"))
    assert first.stat().st_mtime_ns == stat0.st_mtime_ns and first.read_bytes() == bytes0  # untouched
    got = read_latent_dir(out)
    assert {k: list(v) for k, v in got.items()} == expected_keys(4, 3)  # each key exactly once
    assert shard_files(out) == shard_files(clean_run["out"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["stats"] == clean_run["manifest"]["stats"]
    # Run again on the finished output (the demo's second run): no shard or record is written again,
    # and the manifest it merges anew says the same.
    def written():
        return {p.name: p.stat().st_mtime_ns for p in [*out.glob("*.tar"), *out.glob("records/*")]}

    before, manifest = written(), (out / "manifest.json").read_text()
    encode(argv)
    assert written() == before and len(before) == 12 and (out / "manifest.json").read_text() == manifest


@pytest.mark.proc
def test_two_ranks_without_a_process_group_match_one_process(clean_run, tmp_path):
    """Two concurrent processes with RANK=0/1, WORLD_SIZE=2 and no torch.distributed."""
    out = tmp_path / "lat"
    argv = tiny_encode_args(clean_run["pattern"], out, clean_run["vae"], batch_size=2)
    assert "MASTER_ADDR" not in os.environ
    assert run_forked(argv, [{"RANK": str(r), "WORLD_SIZE": "2"} for r in (0, 1)]) == [0, 0]
    for i in range(4):
        rec = json.loads((out / "records" / f"{i:05d}.json").read_text())
        assert (rec["rank"], rec["world_size"]) == (i % 2, 2)  # rank r took shards r, r+2
    m = json.loads((out / "manifest.json").read_text())
    ref = clean_run["manifest"]
    assert m["stats"] == ref["stats"]  # exactly: float64 sums merged in sorted order
    assert m["shards"] == ref["shards"] and m["num_samples"] == 12
    assert shard_files(out) == shard_files(clean_run["out"])


@pytest.mark.slow
@pytest.mark.proc
def test_cli_user_errors_exit_2_without_traceback(tiny, tmp_path):
    base, vae = tiny
    pattern = make_image_shards(tmp_path / "img", n_shards=1, per_shard=1, size=16)
    cases = {
        "--vae": tiny_encode_args(pattern, tmp_path / "a", str(tmp_path / "no-vae-here")),
        # argparse: the last --text-pretrained wins
        "--text-pretrained": [*tiny_encode_args(pattern, tmp_path / "b", vae), "--text-pretrained",
                              str(tmp_path / "missing_open_clip.bin")],
    }
    procs = {flag: subprocess.Popen([sys.executable, SCRIPT, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
             for flag, argv in cases.items()}
    for flag, p in procs.items():
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err[-3000:]
        assert "Traceback" not in err and flag in err, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("error (")  # one line


def test_bench_tiny_runs(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("lct_bench_encode", ROOT / "bench" / "encode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--out", str(tmp_path / "b.json")]) == 0
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["pipeline"]["images"] == r["bare_vae"]["images"] == 48
    assert r["pipeline"]["images_per_s"] > 0 and r["bare_vae"]["images_per_s"] > 0
    assert "images/s" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Nothing lost or forged (issue 19): truncated inputs, concurrent jobs, locks, failed jobs,
# foreign outputs, captions, duplicate keys, orphaned workers, the progress total
# ----------------------------------------------------------------------------------------------


def test_a_truncated_input_shard_is_never_recorded(tiny, tmp_path):
    """Cut at a member boundary, inside a header block and just before the end-of-archive marker
    (tarfile reads all three as shorter valid tars): each fails, is not recorded, and the rerun
    with the repaired files completes them."""
    base, vae = tiny
    pattern = make_image_shards(tmp_path / "img", n_shards=4, per_shard=4, size=16)
    originals = {}
    for i, where in ((1, "member_boundary"), (2, "inside_header"), (3, "before_end_marker")):
        p = tmp_path / "img" / f"{i:05d}.tar"
        originals[p] = p.read_bytes()
        p.write_bytes(originals[p][:cut_points(p)[where]])
    out = tmp_path / "lat"
    argv = tiny_encode_args(pattern, out, vae)
    with pytest.raises(UserError, match=r"00001 \(truncated.*00002 \(truncated.*00003 \(truncated"):
        encode(argv)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"]
    assert sorted(p.name for p in (out / "records").glob("*.json")) == ["00000.json"]
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))
    for p, data in originals.items():
        p.write_bytes(data)
    encode(argv)
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_samples"] == 16 and [s["samples"] for s in m["shards"]] == [4, 4, 4, 4]


@pytest.mark.proc
def test_two_jobs_on_one_output_share_its_shards(tiny, tmp_path):
    """A relaunch while the first job runs (or a SLURM array without RANK): two world-1 jobs on
    one --output at once. Per-shard locks split the work; every shard is written once and checked
    (before: both wrote the same temporary file; one renamed the other's half-written file or
    crashed on its missing temporary file)."""
    base, vae = tiny
    pattern = make_image_shards(tmp_path / "img", n_shards=3, per_shard=24, size=16, seed=2)
    ref, out = tmp_path / "ref", tmp_path / "lat"
    encode(tiny_encode_args(pattern, ref, vae, batch_size=2))
    argv = tiny_encode_args(pattern, out, vae, batch_size=2)
    assert run_forked(argv, [{}, {}]) == [0, 0]
    assert shard_files(out) == shard_files(ref)
    m, r = (json.loads((d / "manifest.json").read_text()) for d in (out, ref))
    assert m["stats"] == r["stats"] and m["shards"] == r["shards"]
    assert not list(out.rglob("*.tmp")) and not list((out / "records").glob("*.lock"))
    recs = [json.loads((out / "records" / f"{i:05d}.json").read_text()) for i in range(3)]
    assert all(len(rec["sha256"]) == 64 and rec["samples"] == 24 for rec in recs)


@pytest.mark.proc
def test_a_shard_another_process_holds_is_left_to_it(clean_run, tmp_path, capfd):
    out = tmp_path / "lat"
    argv = tiny_encode_args(clean_run["pattern"], out, clean_run["vae"], batch_size=2)
    holder = hold_lock(out / "records" / "00001.lock")
    try:
        encode(argv)
        err = capfd.readouterr().err
        assert f"shard 00001 is being encoded by pid {holder.pid}" in err
        assert sorted(p.stem for p in (out / "records").glob("*.json")) == ["00000", "00002", "00003"]
        assert not (out / "00001.tar").exists() and not (out / "manifest.json").exists()
    finally:
        holder.stdin.close()
        holder.wait(30)
    encode(argv)
    assert shard_files(out) == shard_files(clean_run["out"])


def test_a_shard_that_does_not_read_back_is_not_recorded(tiny, tmp_path):
    """The written file is read back before it is renamed and recorded (here another writer
    truncated it under us)."""
    from lct.latent_writer import ShardWriter
    from lct.latents import encode_latent_sample
    from lct.shards import FileLock

    out = tmp_path / "lat"
    out.mkdir()
    lock = FileLock(out / "records" / "00000.lock")
    assert lock.acquire()
    w = ShardWriter(out, "00000", "in.tar", (4, 2, 2), "job", lock)
    mean = np.zeros((4, 2, 2), np.float16)
    for i in range(10):  # more than the tar stream's 10 kB buffer: some of it is on disk
        w.add(encode_latent_sample(f"k{i}", mean=mean, std=mean, tokens=np.zeros((1, 77), np.int32),
                                   captions=["c"]), mean, mean)
    w.stream.flush()
    assert w.tmp.stat().st_size > 0
    os.truncate(w.tmp, 0)
    with pytest.raises(UserError, match="holds 0 samples, 10 were written"):
        w.commit({}, 1, False)
    assert not list(out.glob("00000.tar*")) and not (out / "records" / "00000.json").exists()
    assert FileLock(out / "records" / "00000.lock").acquire()  # released


@pytest.mark.proc
def test_a_failed_job_does_not_block_the_corrected_rerun(clean_run, tmp_path):
    out = tmp_path / "lat"
    argv = tiny_encode_args(clean_run["pattern"], out, clean_run["vae"], batch_size=2)
    # The first attempt (other settings) dies in its first shard: job.json written, nothing recorded.
    assert run_forked(argv + ["--max-captions", "2"], [{"LCT_FAULT_EXIT_MID_SHARD": "0"}]) == [137]
    assert json.loads((out / "job.json").read_text())["options"]["max_captions"] == 2
    assert not list((out / "records").glob("*.json"))
    encode(argv)  # the corrected settings replace the failed job's
    assert json.loads((out / "job.json").read_text())["options"]["max_captions"] == 5
    assert shard_files(out) == shard_files(clean_run["out"])
    with pytest.raises(UserError, match="other settings.*4 shard"):  # once shards are recorded: refused
        encode(argv + ["--max-captions", "2"])


def test_an_output_holding_other_files_is_refused_before_any_work(clean_run, tmp_path):
    pattern, vae = clean_run["pattern"], clean_run["vae"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"mine": true}')
    with pytest.raises(UserError, match="manifest.json but no job.json"):
        encode(tiny_encode_args(pattern, foreign, vae))
    assert (foreign / "manifest.json").read_text() == '{"mine": true}' and not (foreign / "job.json").exists()
    with pytest.raises(UserError, match="folder of the input shards"):
        encode(tiny_encode_args(pattern, Path(pattern).parent, vae))
    other = tmp_path / "other"  # a finished job whose manifest.json was replaced by another data set's
    shutil.copytree(clean_run["out"], other)
    m = json.loads((other / "manifest.json").read_text())
    m["options"]["resolution"] = 512
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="not written by the job recorded in job.json"):
        encode(tiny_encode_args(pattern, other, vae, batch_size=2))


def test_non_utf8_captions_and_duplicate_keys_are_counted(tiny, tmp_path):
    """A txt caption that is not UTF-8 is `caption_not_utf8`; a repeated key, adjacent or not,
    keeps its first sample and counts `duplicate_key` (webdataset failed the whole shard for the
    first and kept both for the second)."""
    base, vae = tiny
    src = make_image_shards(tmp_path / "src", n_shards=1, per_shard=4, size=16)
    by_key: dict[str, list] = {}
    for name, data in tar_members(src):
        by_key.setdefault(name.split(".")[0], []).append((name, data))
    k0, k1, k2, k3 = sorted(by_key)
    bad = [(n, b"caption \xff\xfe not utf-8" if n.endswith(".txt") else
            (json.dumps({"key": k1}).encode() if n.endswith(".json") else d)) for n, d in by_key[k1]]
    write_tar(tmp_path / "in" / "00000.tar",
              by_key[k0] + by_key[k0] + bad + by_key[k2] + by_key[k0] + by_key[k3])
    out = tmp_path / "lat"
    encode(tiny_encode_args(str(tmp_path / "in" / "00000.tar"), out, vae))
    m = json.loads((out / "manifest.json").read_text())
    assert m["skipped"] == {"caption_not_utf8": 1, "duplicate_key": 2}
    assert list(read_latent_dir(out)["00000"]) == [k0, k2, k3]


def test_progress_total_is_the_number_of_images(tiny, tmp_path, capfd):
    base, vae = tiny
    pattern = make_image_shards(tmp_path / "img", n_shards=4, per_shard=3, size=16)
    encode(tiny_encode_args(pattern, tmp_path / "lat", vae, batch_size=2, num_workers=2))
    lines = [ln for ln in re.split(r"[\r\n]", capfd.readouterr().err) if ln.startswith("encode rank 0")]
    assert re.search(r" 12/12 ", lines[-1]), lines[-3:]
    assert not any(re.search(r" \d+/(2[4-9]|[3-9]\d)\b", ln) for ln in lines), lines  # never twice the total


@pytest.mark.slow
@pytest.mark.proc
def test_data_workers_die_with_a_killed_encode(tiny, tmp_path):
    """kill -9 of encode_latents while its DataLoader worker waits on a stalled download: the
    worker goes too (before, it lived on until the read returned)."""
    import signal

    base, vae = tiny
    shard = make_image_shards(tmp_path / "img", n_shards=1, per_shard=4, size=16)
    stall = tmp_path / "stall.sh"
    stall.write_text('head -c 3000 "$1"; sleep 60\n')
    argv = tiny_encode_args(f"pipe:sh {stall} {shard}", tmp_path / "lat", vae, num_workers=1)
    p = subprocess.Popen([sys.executable, SCRIPT, *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         start_new_session=True)

    def children(pid):
        out = []
        for d in os.listdir("/proc"):
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except (OSError, ValueError):
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if d.isdigit() and int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d))
        return out

    try:
        deadline = time.time() + 180
        worker = None
        while time.time() < deadline and p.poll() is None:
            kids = children(p.pid)
            if kids and any(children(k) for k in kids):  # the worker has started the download
                worker = next(k for k in kids if children(k))
                break
            time.sleep(0.5)
        assert worker is not None, "the encode never started its data worker"
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        t = time.time()
        while time.time() - t < 20 and Path(f"/proc/{worker}").exists():
            st = Path(f"/proc/{worker}/stat").read_text() if Path(f"/proc/{worker}").exists() else ""
            if st and st.rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.2)
        alive = Path(f"/proc/{worker}").exists() and Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        assert not alive, "the data worker outlived its killed parent"
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the stalled pipe's sh/sleep, and anything left
        except ProcessLookupError:
            pass
