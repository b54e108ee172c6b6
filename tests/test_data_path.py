"""The trainer's data path against bad latent data (issue 19): every sample is checked against
the manifest (shape, members, finite values) and skipped, counted and named once; a NaN latent
never reaches the OT coupling; stream mode fails like indexed mode when nothing is usable;
data.shards is checked against the manifest's shard list; skip counts reach stats.jsonl and the
progress bar."""

import json
import os
import re
import sys
import threading

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cmd, tiny_train_config
from helpers_data import from_npy, npy, tampered_latent_dir
from lct.errors import UserError

TRAIN = str(ROOT / "lct" / "train.py")


def _with(name, value):
    def edit(s):
        s[name] = value
        return s
    return edit


def _drop(name):
    def edit(s):
        s.pop(name)
        return s
    return edit


def _poison(name, value):
    def edit(s):
        a = from_npy(s[name]).copy()
        a.flat[3] = value
        s[name] = npy(a)
        return s
    return edit


def _twice(s):
    return [s, dict(s)]


# Sample index in shard 00000 -> (edit, reason).
BAD = {
    0: (lambda s: {**s, "mean.npy": npy(from_npy(s["mean.npy"])[:1])}, "wrong_shape"),   # [1,h,w]: broadcast before
    1: (lambda s: {**s, "mean.npy": npy(np.zeros((4, 8, 8), np.float16)),
                   "std.npy": npy(np.ones((4, 8, 8), np.float16))}, "wrong_shape"),      # another resolution
    2: (_drop("tokens.npy"), "missing_member"),
    3: (_poison("mean.npy", np.nan), "non_finite"),
    4: (_poison("flip_std.npy", np.inf), "non_finite"),
    5: (_with("mean.npy", b"\x93NUMPY garbage"), "corrupt_sample"),
    6: (lambda s: {**s, "tokens.npy": npy(from_npy(s["tokens.npy"])[:, :32])}, "wrong_shape"),
    7: (_twice, "duplicate_key"),
}
WANT = {"wrong_shape": 3, "missing_member": 1, "non_finite": 2, "corrupt_sample": 1, "duplicate_key": 1}


@pytest.fixture(scope="module")
def bad_data(latent_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-latents")
    return tampered_latent_dir(latent_data["train"], root / "train", "00000", {i: e for i, (e, _) in BAD.items()})


def _spec(data_dir, mode="indexed", ot=False, micro=8, urls=None):
    from lct.data import DataSpec, expand_urls
    from lct.latents import SampleLayout, load_manifest
    from lct.vae import LatentNorm

    m = load_manifest(data_dir)
    return DataSpec(urls=urls or expand_urls(str(data_dir)), mode=mode, seed=3, rank=0, world_size=1,
                    micro_batch=micro, accum=1, latent_shape=tuple(m["latent_shape"]),
                    norm=LatentNorm.from_manifest(m, "channel"), caption_dropout=0.1,
                    flip=True, text="on_the_fly", ot=ot, layout=SampleLayout.from_manifest(m))


def test_malformed_samples_are_skipped_counted_and_named_once(bad_data, capfd):
    from lct.data import InMemoryLatents

    spec = _spec(bad_data)
    mem = InMemoryLatents(spec.urls, spec.layout)
    assert mem.skipped == WANT
    keys = [s["key"] for s in mem.samples]
    assert len(keys) == len(set(keys)) == 96 - 7  # 7 bad samples; the repeat of sample 7 is dropped, 7 kept
    assert all(s["mean"].shape == (4, 4, 4) for s in mem.samples)
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("data: ")]
    assert len(lines) == len(WANT)  # once per shard and reason
    assert all("00000.tar" in ln for ln in lines)
    first_shape = next(ln for ln in lines if "(wrong_shape;" in ln)
    assert "mean.npy is float16 [1, 4, 4], the data's latents are float16 [4, 4, 4]" in first_shape
    assert re.search(r"sample '\w+': no tokens\.npy", err) and "flip_std.npy holds NaN or Inf" not in err
    InMemoryLatents(spec.urls, spec.layout)
    assert not [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("data: ")]  # named once


def test_a_nan_latent_never_reaches_the_ot_coupling(bad_data):
    """POT raised "matrix contains invalid numeric entries" and killed an ilct run; without OT the
    whole batch was skipped and no sample named. The bad samples are dropped at reading."""
    from lct.data import InMemoryLatents, TrainBatches

    for mode in ("indexed", "stream"):
        spec = _spec(bad_data, mode=mode, ot=True)
        mem = InMemoryLatents(spec.urls, spec.layout) if mode == "indexed" else None
        batches = list(TrainBatches(spec, 0, 14, mem))  # > one epoch of 89 samples in indexed mode
        assert all(torch.isfinite(b["x"]).all() and torch.isfinite(b["z"]).all() for b in batches)
        if mode == "indexed":
            assert batches[-1]["skipped"] == WANT
        else:  # cumulative counts of this worker's reads so far
            assert batches[-1]["skipped"] and set(batches[-1]["skipped"]) <= set(WANT)


@pytest.mark.timeout(120)
def test_stream_mode_without_latent_samples_fails_like_indexed(latent_data):
    """data.shards at the image shards: indexed mode said so; stream mode looped forever."""
    from lct.data import InMemoryLatents, TrainBatches, expand_urls, make_loader
    from lct.stop import end_workers

    images = expand_urls(str(latent_data["root"] / "shapes" / "{00000..00001}.tar"))
    spec = _spec(latent_data["train"], mode="stream", urls=images)
    with pytest.raises(UserError) as indexed:
        InMemoryLatents(images, spec.layout)
    with pytest.raises(UserError) as stream:
        next(iter(TrainBatches(spec, 0, 4)))
    def same(a, b):  # the same message; stream mode read the shards more often (other counts)
        return re.sub(r"\d+\)", "N)", str(a)) == re.sub(r"\d+\)", "N)", str(b))

    assert same(stream.value, indexed.value)
    assert "no usable latent samples in 2 shard(s)" in str(stream.value) and "missing_member" in str(stream.value)
    # From a DataLoader worker it arrives as the same one-line UserError, not a worker traceback.
    result = {}

    def run():
        batches = iter(make_loader(spec, 0, 4, num_workers=1, prefetch_factor=2, pin_memory=False))
        try:
            next(batches)
        except BaseException as err:  # noqa: BLE001 - the test inspects it
            result["err"] = err
        finally:
            # Joined and unregistered here: the worker's PR_SET_PDEATHSIG follows this thread, and a
            # worker killed with its pid still registered fails torch's SIGCHLD check in later tests
            # (CI, 2026-12-07: `batches` is lct's CheckedBatches, which had no _shutdown_workers).
            end_workers(batches)
            result["ended"] = not batches.source._workers[0].is_alive() and not batches.source._worker_pids_set

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(90)
    assert not t.is_alive(), "stream mode hangs"
    assert result["ended"]
    assert isinstance(result.get("err"), UserError) and same(result["err"], indexed.value)
    assert "Traceback" not in str(result["err"])


def test_data_shards_are_checked_against_the_manifest(latent_data, tmp_path):
    import shutil

    from lct.data import train_shard_urls
    from lct.latents import load_manifest

    d = tmp_path / "train"
    shutil.copytree(latent_data["train"], d)
    m = load_manifest(d)
    urls, note = train_shard_urls(str(d), m)
    assert [os.path.basename(u) for u in urls] == ["00000.tar", "00001.tar"] and note is None
    shutil.copy(d / "00000.tar", d / "unrelated.tar")  # extra tars: left out, in one line
    urls, note = train_shard_urls(str(d), m)
    assert [os.path.basename(u) for u in urls] == ["00000.tar", "00001.tar"]
    assert note.startswith("warning: data.shards: 1 tar(s) not listed in") and "unrelated.tar" in note
    (d / "00001.tar").rename(tmp_path / "away.tar")  # a listed shard missing: refused
    with pytest.raises(UserError, match=r"data.shards: 1 of the 2 shards listed in .* \(e.g. 00001.tar\)"):
        train_shard_urls(str(d), m)
    (tmp_path / "away.tar").rename(d / "00001.tar")
    data = (d / "00001.tar").read_bytes()
    (d / "00001.tar").write_bytes(data[: len(data) // 2])  # truncated after encoding: refused
    with pytest.raises(UserError, match=r"00001.tar has \d+ bytes, .* records \d+: it was truncated"):
        train_shard_urls(str(d), m)
    with pytest.raises(UserError, match="are not in"):  # a pattern reaching only part of the data
        train_shard_urls(str(d / "00000.tar"), m)


@pytest.mark.proc
@pytest.mark.slow
def test_skip_counts_reach_stats_jsonl_and_the_progress_bar(tmp_path, latent_data, bad_data):
    """~30 s: an ilct run (OT on) in indexed mode on the bad data trains and reports every skip."""
    cfg = tiny_train_config(tmp_path, latent_data, data={"shards": str(bad_data)},
                            run={"dir": str(tmp_path / "run"), "total_steps": 4, "save_every": 4, "log_every": 2,
                                 "seed": 0})
    proc = run_cmd([sys.executable, TRAIN, "--config", str(cfg)], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert train and all(r["data_skipped"] == sum(WANT.values()) for r in train)
    assert all(r[f"data_skipped_{k}"] == v for r in train for k, v in WANT.items())
    assert train[0]["data_skipped_unreadable_shard"] == 0
    assert "skipped=8" in proc.stdout  # the progress bar
    assert proc.stderr.count("data: ") == len(WANT)  # each shard and reason named once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    tb.Reload()
    assert [e.value for e in tb.Scalars("train/data_skipped_non_finite")] == [2.0] * len(train)


# ----------------------------------------------------------------------------------------------
# data.posterior (SPEC 7): sample (default), mean, fixed
# ----------------------------------------------------------------------------------------------


def _uses(spec, sample, n=24):
    """x of `n` uses of one image at different (data step, slot), and the z of each use."""
    from lct.data import draw_sample

    draws = [draw_sample(spec, sample, step, slot) for step in range(n // 4) for slot in range(4)]
    return [d["x"] for d in draws], [d["z"] for d in draws]


def _distinct(arrays):
    return len({a.tobytes() for a in arrays})


def test_posterior_modes(latent_data):
    import dataclasses

    from lct.data import InMemoryLatents

    spec = _spec(latent_data["train"])
    assert spec.posterior == "sample"  # the default: unchanged draws (the bitwise resume test pins them)
    a, b = InMemoryLatents(spec.urls, spec.layout).samples[:2]
    assert "flip_mean" in a
    norm = spec.norm.normalize
    xs, zs = _uses(spec, a)
    assert _distinct(xs) == len(xs)  # sample: a fresh eps at every use

    mean = dataclasses.replace(spec, posterior="mean")
    xm, zm = _uses(mean, a)
    assert {x.tobytes() for x in xm} == {norm(a[k].astype(np.float32)).tobytes() for k in ("mean", "flip_mean")}

    fixed = dataclasses.replace(spec, posterior="fixed")
    xf, zf = _uses(fixed, a)
    assert _distinct(xf) == 2  # one draw per image and flip, the same at every use
    assert not {x.tobytes() for x in xf} & {x.tobytes() for x in xm}  # a sample, not the mean
    assert all(np.array_equal(p, q) for p, q in zip(zs, zm)) and all(np.array_equal(p, q) for p, q in zip(zs, zf))
    # The draw is the image's, not the slot's: on another rank layout and in another run it is the same
    # for the same seed, and it moves with the seed and the image.
    other_rank = dataclasses.replace(fixed, rank=1, world_size=2, micro_batch=4)
    assert {x.tobytes() for x in _uses(other_rank, a, 8)[0]} == {x.tobytes() for x in xf}
    assert not {x.tobytes() for x in _uses(dataclasses.replace(fixed, seed=4), a, 8)[0]} & {x.tobytes() for x in xf}
    xb = _uses(fixed, {**b, "mean": a["mean"], "std": a["std"], "flip_mean": a["flip_mean"],
                       "flip_std": a["flip_std"]}, 8)[0]
    assert not {x.tobytes() for x in xb} & {x.tobytes() for x in xf}  # same latents, another key


def test_posterior_key_and_repro_config():
    from lct.config import DataConfig, load_config

    assert DataConfig().posterior == "sample"
    cfg = load_config(ROOT / "configs/repro/ilct_celebahq_dit_b2.yaml")
    assert cfg.data.posterior == "fixed" and cfg.data.flip is False and cfg.data.mode == "indexed"
