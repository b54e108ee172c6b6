"""The trainer on one process: DeepSpeed config per preset, data path determinism and OT, EMA,
checkpoints, bitwise resume, grids and validation, the run record."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cmd, tiny_train_config
from lct.config import METHOD_PRESETS, OptimConfig, load_config
from lct.consistency import ot_couple
from lct.ema import PartitionedEMA, ema_beta
from lct.engine import build_optimizer, deepspeed_config, learning_rate

TRAIN = str(ROOT / "lct" / "train.py")


# ---------------------------------------------------------------------------------------------
# Engine configuration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(METHOD_PRESETS))
@pytest.mark.parametrize("precision", ["tf32", "bf16_trunk", "fp32"])
def test_resolved_deepspeed_config_of_every_preset(preset, precision):
    cfg = load_config(None, [f"method.preset={preset}", f"precision={precision}"])
    ds = deepspeed_config(cfg, world_size=2)
    batch = cfg.optim.batch_size
    assert ds["train_batch_size"] == batch
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == batch
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed would clip at 1.0; no method clips (SPEC 12)
    assert ds["zero_allow_untested_optimizer"] is True  # RAdam is a client optimizer
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}  # never cast the module
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["communication_data_type"] == "fp32"
    if precision == "bf16_trunk":
        assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    else:
        assert "torch_autocast" not in ds
    assert ds["zero_optimization"]["stage"] == 2
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))])
    g = opt.param_groups[0]
    expected = {**OptimConfig().model_dump(), **{k.split(".", 1)[1]: v for k, v in METHOD_PRESETS[preset].items()
                                                 if k.startswith("optim.")}}
    assert type(opt).__name__ == {"radam": "RAdam", "adam": "Adam"}[expected["name"]]
    assert g["lr"] == expected["lr"] and g["weight_decay"] == expected["weight_decay"]
    assert tuple(g["betas"]) == tuple(expected["betas"]) and g["foreach"] is True
    if expected["name"] == "radam":
        assert g["decoupled_weight_decay"] is False  # coupled weight decay, torch default (SPEC 12)


def test_grad_clip_and_bf16_reduction_when_asked():
    cfg = load_config(None, ["optim.grad_clip=1.0", "precision=bf16_trunk", "distributed.fp32_reduce=false",
                             "optim.batch_size=64", "optim.micro_batch_size=8"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["gradient_clipping"] == 1.0 and "communication_data_type" not in ds
    assert ds["torch_autocast"]["lower_precision_safe_modules"] == ["torch.nn.Linear", "torch.nn.Conv2d"]
    assert ds["gradient_accumulation_steps"] == 2


def test_inv_sqrt_schedule():
    cfg = load_config(None, ["method.preset=ect_imagenet"])
    assert learning_rate(cfg, 0) == 1e-3 and learning_rate(cfg, 2000) == 1e-3
    assert math.isclose(learning_rate(cfg, 8000), 1e-3 / 2)


def test_cosine_schedule_ends_at_final_ratio():
    cfg = load_config(None, ["optim.schedule=cosine", "optim.lr=2e-3", "optim.final_lr_ratio=0.05",
                             "run.total_steps=1000"])
    assert learning_rate(cfg, 0) == 2e-3
    assert math.isclose(learning_rate(cfg, 500), 2e-3 * (0.05 + 0.95 * 0.5))
    assert math.isclose(learning_rate(cfg, 1000), 2e-3 * 0.05)
    assert math.isclose(learning_rate(cfg, 5000), 2e-3 * 0.05)  # past the end (a raised total_steps) it stays


# ---------------------------------------------------------------------------------------------
def _radam_pair(fused_cls, compiled):
    """torch's RAdam and FusedRAdam on identical copies of flat fp32 buffers (ZeRO-1/2's layout)."""
    g = torch.Generator().manual_seed(1)
    a = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (1000, 37)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    return a, b, torch.optim.RAdam(a, foreach=True, **kw), lambda: fused_cls(b, compiled=compiled, **kw)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fused_radam_equals_torch_radam_over_100_steps_with_resume(compiled):
    """FusedRAdam (`optim.fused`) against torch.optim.RAdam, coupled weight decay (SPEC 12), 100
    steps (the unrectified first steps and the rectified rest), its state saved and loaded into a
    fresh optimizer at step 50: eagerly bitwise, compiled (~15 s, one CPU compile) to 1e-6."""
    from lct.engine import FusedRAdam

    a, b, ref, make = _radam_pair(FusedRAdam, compiled)
    fused = make()
    gen = torch.Generator().manual_seed(2)
    for k in range(100):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn(pa.shape, generator=gen)
            pb.grad = pa.grad.clone()
        ref.step()
        fused.step()
        if k == 49:
            saved = fused.state_dict()
            fused = make()
            fused.load_state_dict(saved)
    assert float(fused.state[b[0]]["step"]) == 100
    pairs = [(pa, pb) for pa, pb in zip(a, b)]
    pairs += [(ref.state[pa][k], fused.state[pb][k]) for pa, pb in zip(a, b) for k in ("exp_avg", "exp_avg_sq")]
    for x, y in pairs:
        if compiled:
            assert float((x - y).norm() / x.norm()) < 1e-6
        else:
            assert torch.equal(x, y)


def test_fused_optimizers_are_chosen_by_optim_fused():
    from lct.engine import FusedRAdam

    p = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer(load_config(None, ["method.preset=ilct", "optim.fused=true"]), p), FusedRAdam)
    adam = build_optimizer(load_config(None, ["method.preset=ect_imagenet", "optim.fused=true"]), p)
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["fused"] is True


# EMA
# ---------------------------------------------------------------------------------------------


def test_partitioned_ema_slices_equal_full_ema_bitwise():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    full = PartitionedEMA(module, {"a": 100.0, "b": 7.0})
    parts = [PartitionedEMA(module, {"a": 100.0, "b": 7.0}, rank=r, world_size=3) for r in range(3)]
    for _ in range(5):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        for e in [full, *parts]:
            e.update(module, batch_images=8)
    for name in ("a", "b"):
        joined = torch.cat([p.buffers[name] for p in parts])
        assert torch.equal(joined, full.buffers[name])
    assert ema_beta(8, 8) == 0.5


def _reference_ema(emas: dict, module, batch_images: int, halflives: dict) -> None:
    """The EMA formula written plainly (per parameter, full tensors): ema <- lerp(ema, w, 1 - beta)."""
    for name, hl in halflives.items():
        for n, p in module.named_parameters():
            emas[name][n].lerp_(p.detach(), 1.0 - ema_beta(batch_images, hl))


@pytest.mark.parametrize("flat", [False, True])
def test_partitioned_ema_update_equals_the_formula_bitwise(flat):
    """The cached, coalesced update (one lerp per EMA when the weights lie in one buffer, as under
    DeepSpeed ZeRO-1/2) gives the per-parameter formula bitwise, on 1 and 3 ranks, and follows the
    weights when their storage moves (a checkpoint load replacing p.data)."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    if flat:  # DeepSpeed's layout: every parameter a view of one flat fp32 buffer, in order
        storage = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        pos = 0
        for p in module.parameters():
            p.data = storage[pos:pos + p.numel()].view(p.shape)
            pos += p.numel()
    hls = {"a": 100.0, "b": 7.0}
    ref = {name: {n: p.detach().clone() for n, p in module.named_parameters()} for name in hls}
    emas = [PartitionedEMA(module, hls), *[PartitionedEMA(module, hls, rank=r, world_size=3) for r in range(3)]]
    for step in range(6):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        if step == 3:  # the storage moves: the cached operands must follow
            for p in module.parameters():
                p.data = p.data.clone()
        for e in emas:
            e.update(module, batch_images=8)
        _reference_ema(ref, module, 8, hls)
        if flat and step < 3:
            assert len(emas[0]._run_cache[0]) == 1  # one run: one lerp kernel per EMA
    for name in hls:
        want = torch.cat([ref[name][n].reshape(-1) for n, _ in module.named_parameters()])
        assert torch.equal(emas[0].buffers[name], want)
        assert torch.equal(torch.cat([e.buffers[name] for e in emas[1:]]), want)


def test_ema_half_life_in_images_matches_decay():
    """0.99993 at batch 128 is a half-life of ~1.27 M images (SPEC 12)."""
    cfg = load_config(None, ["method.preset=ilct"])
    hl = cfg.ema.models[0].resolved_halflife()
    assert abs(hl - 1.267e6) < 1e3 and math.isclose(ema_beta(128, hl), 0.99993, rel_tol=1e-12)


# ---------------------------------------------------------------------------------------------
# Data path
# ---------------------------------------------------------------------------------------------


def _spec(latent_data, rank=0, world=1, micro=4, accum=1, ot=False, mode="indexed"):
    from lct.data import DataSpec, expand_urls
    from lct.latents import load_manifest
    from lct.vae import LatentNorm

    m = load_manifest(latent_data["train"])
    return DataSpec(urls=expand_urls(str(latent_data["train"])), mode=mode, seed=3, rank=rank,
                    world_size=world, micro_batch=micro, accum=accum, latent_shape=tuple(m["latent_shape"]),
                    norm=LatentNorm.from_manifest(m, "channel"), caption_dropout=0.25,
                    flip=True, text="on_the_fly", ot=ot)


def _batches(spec, steps, start=0):
    from lct.data import InMemoryLatents, TrainBatches

    return list(TrainBatches(spec, start, steps, InMemoryLatents(spec.urls)))


def test_indexed_data_independent_of_world_size_and_accumulation(latent_data):
    """The same global slots get the same samples and the same random draws on 1 or 2 ranks."""
    one = _batches(_spec(latent_data, micro=8, accum=1), 3)
    two = [_batches(_spec(latent_data, rank=r, world=2, micro=2, accum=2), 3) for r in range(2)]
    for step in range(3):
        ref = one[step]
        pieces = [two[r][step * 2 + m] for r in range(2) for m in range(2)]
        for key in ("x", "z", "u", "n", "cond_drop", "tokens"):
            assert torch.equal(torch.cat([p[key] for p in pieces]), ref[key]), key
        assert sum((p["keys"] for p in pieces), []) == ref["keys"]
    # Deterministic, and resuming at a data step reproduces it.
    again = _batches(_spec(latent_data, micro=8), 3)
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(one, again))
    resumed = _batches(_spec(latent_data, micro=8), 1, start=2)
    assert torch.equal(resumed[0]["z"], one[2]["z"])
    # The draws are not degenerate.
    x = torch.cat([b["x"] for b in one])
    assert 0.2 < x.std() < 1.0 and one[0]["cond_drop"].dtype == torch.bool


def _pair_cost(x, z):
    return (x.double() - z.double()).flatten(1).square().sum(1).sum().item()


def test_ot_coupling_per_rank_equals_ot_couple_on_its_slice(latent_data):
    gains = []
    for rank in range(2):
        plain = _batches(_spec(latent_data, rank=rank, world=2, micro=6, ot=False), 2)
        coupled = _batches(_spec(latent_data, rank=rank, world=2, micro=6, ot=True), 2)
        for p, c in zip(plain, coupled):
            assert torch.equal(c["x"], p["x"])
            assert torch.equal(c["z"], ot_couple(p["x"], p["z"]))
            assert torch.equal(torch.sort(c["z"].flatten(1), 0)[0], torch.sort(p["z"].flatten(1), 0)[0])
            # The data path's pairing is optimal for its micro-batch: never costlier than the
            # draw order (the identity permutation), and cheaper on some micro-batch.
            gains.append(_pair_cost(p["x"], p["z"]) - _pair_cost(c["x"], c["z"]))
    assert min(gains) >= -1e-9 and max(gains) > 0, gains


def test_stream_mode_reads_every_shard_and_is_seeded(latent_data):
    spec = _spec(latent_data, micro=8, mode="stream")
    from lct.data import TrainBatches

    a = list(TrainBatches(spec, 0, 6))
    b = list(TrainBatches(spec, 0, 6))
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    keys = {k for x in a for k in x["keys"]}
    assert len(keys) > 24  # draws from both shards through the shuffle buffer


# ---------------------------------------------------------------------------------------------
# The trainer, one process
# ---------------------------------------------------------------------------------------------


def read_stats(run_dir: Path, kind="train"):
    return [r for r in map(json.loads, (run_dir / "stats.jsonl").read_text().splitlines()) if r["kind"] == kind]




def documented_log_fields(kind: str) -> set[str]:
    """The field names of README's "Reading your logs" table for `kind` ("train", "val" or "eval")."""
    import re

    from lct.data import SKIP_REASONS

    text = (ROOT / "README.md").read_text().split("### Reading your logs", 1)[1].split("\n### ", 1)[0]
    table = text.split({"train": "Train records", "val": "Validation records", "eval": "Eval records"}[kind],
                       1)[1].split("\n\n", 1)[0]
    names = {"kind"}
    for line in table.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    if "data_skipped_<reason>" in names:
        names = (names - {"data_skipped_<reason>"}) | {f"data_skipped_{r}" for r in SKIP_REASONS}
    return names


def test_train_log_fields_are_the_documented_ones():
    """Every field LossMeter writes is in README's table and every documented one is written (the
    optional ones where they apply); frac_m_gt_2c2 is left out at c = 0 (NaN is not JSON)."""
    from lct.config import TrainConfig
    from lct.data import SkipTally
    from lct.monitor import LossMeter
    from lct.objectives import Curriculum, Diagnostics
    from lct.run import TrainState

    cfg = TrainConfig()
    records = []
    for c, cur in ((0.01, Curriculum(5, num_points=21, c=0.01)), (0.0, Curriculum(5, stage=1, c=0.0))):
        meter = LossMeter(cfg, torch.device("cpu"), 1, 0)
        sigma = torch.tensor([0.003, 0.5, 3.0, 70.0])
        meter.add([Diagnostics(sigma=sigma, loss=torch.ones(4), m=torch.full((4,), 1e-3), curriculum=cur,
                               early_local=1, diffusion=torch.tensor(0.2))])
        records.append({"kind": "train", **meter.record(TrainState(applied_steps=5, data_steps=6), 1e-4, cur,
                                                        None, SkipTally())})
        json.loads(json.dumps(records[-1], allow_nan=False))
    documented = documented_log_fields("train")
    optional = {"grad_norm", "max_memory_gb", "N", "stage"}
    for rec in records:
        assert set(rec) <= documented, set(rec) - documented
    assert documented - optional <= set(records[0]), documented - optional - set(records[0])
    assert "frac_m_gt_2c2" not in records[1] and records[0]["frac_m_gt_2c2"] == 1.0
    assert records[0]["loss_bucket"][0] == 1.0 and records[0]["loss_bucket"][1] is None  # 0.003 in [0.002, 0.0075)


def checkpoint_tensors(ckpt_dir: Path):
    from safetensors.torch import load_file

    model = torch.load(ckpt_dir / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")["module"]
    ema = load_file(str(ckpt_dir / "ema.safetensors"))
    return model, ema


@pytest.mark.proc
def test_single_process_run_writes_everything(tmp_path, latent_data, finished_run, capsys):
    """conftest's `finished_run` (a full small run as a process: train, grids, validation, export)
    wrote everything; the same command on it (here in this process, on a copy) finds it complete,
    and a changed total of steps is refused unless asked (it moves the curriculum)."""
    from conftest import copy_finished_run, run_cli
    from lct.train import main as train_main

    run = finished_run / "run"
    # The quality eval (lct/quality.py, on in `finished_run`): 1- and 2-step rows at steps 3 and 6
    # (the end does not repeat 6), shapes and the user metric with precision/recall beside them;
    # fid named once as skipped.
    ev = read_stats(run, "eval")
    assert [(r["step"], r["setting"], r["steps"], r["n"]) for r in ev] == [
        (3, "1step", 1, 8), (3, "2step", 2, 8), (6, "1step", 1, 8), (6, "2step", 2, 8)]
    for r in ev:
        assert set(r) <= documented_log_fields("eval") | {k for k in r if k.split("_")[0] in ("shapes", "prdc", "bright")}
        assert {"shapes", "shapes_colour_acc", "shapes_position_acc", "bright", "prdc", "prdc_precision",
                "prdc_recall", "prdc_density", "prdc_coverage", "prdc_spread"} <= set(r), r
        assert 0 <= r["shapes_colour_acc"] <= 1 and 0 <= r["prdc_recall"] <= 1 and 0 < r["bright"] < 255
        assert set(r["skipped"]) == {"fid"} and r["N"] >= 2
    assert ev[0]["bright"] != ev[1]["bright"]  # 1 and 2 steps are different samples
    assert (finished_run / "stderr.txt").read_text().count("[eval] fid: cannot run:") == 1
    for f in ("config.yaml", "deepspeed.json", "environment.json", "stats.jsonl", "checkpoints/latest",
              "export/ema/lct_export.json", "export/slow/lct_export.json",
              "samples/step00000003_1step.png", "samples/step00000006_2step.png"):
        assert (run / f).exists(), f
    env = json.loads((run / "environment.json").read_text())
    assert {"git_sha", "git_dirty", "versions", "gpus", "world_size"} <= set(env)
    stats = read_stats(run)
    assert [r["step"] for r in stats] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in stats) and stats[0]["N"] == 11 and "c" in stats[0]
    assert {"rms_sqrt_m", "frac_m_gt_2c2", "grad_norm", "loss_bucket", "images_per_s"} <= set(stats[-1])
    val = read_stats(run, "val")
    assert [r["step"] for r in val] == [3, 6]  # every 3 steps; the run's end does not repeat step 6
    assert set(val[0]) == documented_log_fields("val") - {"stage", "by_aspect"}  # README's table is what a square run's validation writes
    assert set(stats[-1]) <= documented_log_fields("train")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000006"
    # Re-running the same command finds the run complete.
    cfg = copy_finished_run(finished_run, tmp_path, latent_data)
    code, out, err = run_cli(capsys, train_main, ["--config", str(cfg)])
    assert code == 0 and "is complete" in out, err[-3000:]
    # Changing total steps on resume is refused unless asked (it moves the curriculum).
    code, out, err = run_cli(capsys, train_main, ["--config", str(cfg), "run.total_steps=9"])
    assert code == 2 and "run.total_steps changed" in err


@pytest.mark.proc
@pytest.mark.slow
def test_kill_and_resume_is_bitwise_identical(tmp_path, latent_data):
    """~60 s: indexed mode, fp32 CPU, dropout on: a run killed after step 3 and resumed ends at step
    6 with the same weights, optimizer state and EMAs as an uninterrupted run, bit for bit; the
    killed run also has the quality eval on (every 2 steps) and the other not, so the eval moves
    no training draw (dropout masks come from torch's generator)."""
    env = {"OMP_NUM_THREADS": "1"}
    common = dict(model={"arch": "DiT-S/2", "hidden_size": 32, "depth": 2, "num_heads": 2, "dropout": 0.2},
                  sample={"every": 1000}, val={"every": 1000})
    a = tiny_train_config(tmp_path / "a", latent_data, run={"dir": str(tmp_path / "a" / "run"), "total_steps": 6,
                                                            "save_every": 3, "log_every": 1, "seed": 0}, **common)
    b = tiny_train_config(tmp_path / "b", latent_data, run={"dir": str(tmp_path / "b" / "run"), "total_steps": 6,
                                                            "save_every": 3, "log_every": 1, "seed": 0},
                          eval={"every": 2, "num": 6, "metrics": ["shapes"]}, **common)
    assert run_cmd([sys.executable, TRAIN, "--config", str(a)], env=env).returncode == 0
    killed = run_cmd([sys.executable, TRAIN, "--config", str(b)], env={**env, "LCT_FAULT_EXIT_AFTER_SAVE": "3"})
    assert killed.returncode == 137
    saved = json.loads((tmp_path / "b/run/checkpoints/step00000003/lct_state.json").read_text())["state"]
    resumed = run_cmd([sys.executable, TRAIN, "--config", str(b)], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    restored = json.loads(resumed.stdout.split("restored state ", 1)[1].splitlines()[0])
    assert restored == saved  # field by field
    ma, ea = checkpoint_tensors(tmp_path / "a/run/checkpoints/step00000006")
    mb, eb = checkpoint_tensors(tmp_path / "b/run/checkpoints/step00000006")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    oa = torch.load(tmp_path / "a/run/checkpoints/step00000006/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                    weights_only=False)["optimizer_state_dict"]
    ob = torch.load(tmp_path / "b/run/checkpoints/step00000006/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                    weights_only=False)["optimizer_state_dict"]
    for t1, t2 in zip(oa["single_partition_of_fp32_groups"], ob["single_partition_of_fp32_groups"]):
        assert torch.equal(t1, t2)
    assert [(r["step"], r["setting"]) for r in read_stats(tmp_path / "b/run", "eval")] == [
        (2, "1step"), (2, "2step"), (4, "1step"), (4, "2step"), (6, "1step"), (6, "2step")]
    sa, sb = read_stats(tmp_path / "a/run"), read_stats(tmp_path / "b/run")
    assert [r["loss"] for r in sa] == [r["loss"] for r in sb if r["step"] in (1, 2, 3, 4, 5, 6)][-6:]


def test_sampling_cli_is_deterministic(tmp_path, latent_data):
    """lct.sample with the same seed writes identical images; another seed differs (its main in
    this process; test_sample starts it as a process)."""
    from lct.config import load_config
    from lct.sample import main as sample_main
    from lct.export import export_network
    from lct.latents import load_manifest
    from lct.models import Precond, build_dit

    cfg = load_config(tiny_train_config(tmp_path, latent_data))
    manifest = load_manifest(latent_data["train"])
    torch.manual_seed(0)
    net = build_dit(cfg.model, tuple(manifest["latent_shape"]), text_dim=128, text_len=77, pooled_dim=128)
    model = Precond(net)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    export_network(model, dict(model.named_parameters()), tmp_path / "export", cfg=cfg, manifest=manifest,
                   ema_name="ema", step=0)
    outs = []
    for seed, out in ((1, "s1"), (1, "s2"), (2, "s3")):
        assert sample_main(["--checkpoint", str(tmp_path / "export"), "--prompt",
                            "a large red circle in the top left corner", "--prompt", "small blue square at the bottom",
                            "--steps", "2", "--seed", str(seed), "--out", str(tmp_path / out), "--device", "cpu"]) == 0
        outs.append([(tmp_path / out / f"00000{i}.png").read_bytes() for i in range(2)])
    assert outs[0] == outs[1] and outs[0] != outs[2]
    recs = [json.loads(l) for l in (tmp_path / "s1" / "captions.jsonl").read_text().splitlines()]
    assert recs[0]["steps"] == 2 and recs[0]["nfe"] == 2 and recs[0]["tau"] == [0.36931547704]
    assert (tmp_path / "s1" / "grid.png").is_file()


def test_init_from_copies_the_ema_into_weights_and_emas(tmp_path, latent_data):
    """ECT starts from an EDM run: its EMA becomes both the weights and every EMA (SPEC 2.4)."""
    from safetensors.torch import load_file

    from lct.data import describe_data
    from lct.dist import DistInfo
    from lct.export import export_network
    from lct.latents import load_manifest
    from lct.run import init_from
    from lct.models.build import build_network

    cfg = load_config(tiny_train_config(tmp_path, latent_data))
    manifest = load_manifest(latent_data["train"])
    desc = describe_data(manifest)
    torch.manual_seed(1)
    edm = build_network(cfg, desc)
    ema_state = {k: v + 0.01 * torch.randn_like(v) for k, v in edm.named_parameters()}
    export_network(edm, ema_state, tmp_path / "edm" / "export" / "ema", cfg=cfg, manifest=manifest,
                   ema_name="ema", step=10)
    torch.manual_seed(2)
    student = build_network(cfg, desc)
    init_from(student, str(tmp_path / "edm"), "ema", DistInfo())
    saved = load_file(str(tmp_path / "edm/export/ema/transformer/diffusion_pytorch_model.safetensors"))
    got = dict(student.net.state_dict())
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    ema = PartitionedEMA(student, {"ema": 100.0})
    full = ema.state_dict_of("ema")
    assert all(torch.equal(full["net." + k], saved[k]) for k in saved if "net." + k in full)


def test_trainer_refuses_a_different_tokenizer(tmp_path, latent_data):
    from lct.errors import UserError
    from lct.latents import load_manifest
    from lct.preflight import check_text_compatibility
    from lct.text import load_tower

    cfg = load_config(tiny_train_config(tmp_path, latent_data))
    manifest = load_manifest(latent_data["train"])
    manifest["text"]["tokenizer"] = dict(manifest["text"]["tokenizer"], probe_sha256="0" * 64)
    with pytest.raises(UserError, match="tokenizer differs"):
        load_tower(manifest, cfg.text, torch.device("cpu"))
    cfg2 = load_config(tiny_train_config(tmp_path, latent_data), ["text.model=ViT-B-32"])
    with pytest.raises(UserError, match="text.model='ViT-B-32' differs"):
        check_text_compatibility(cfg2, load_manifest(latent_data["train"]))


# ---------------------------------------------------------------------------------------------
# The step: collectives and host syncs, the fused optimizer under DeepSpeed, the non-finite guard
# ---------------------------------------------------------------------------------------------

STEP_PROBE = '''
import json, os, sys
import torch
from lct import dist
from lct.config import load_config
from lct.dist import DistInfo
from lct.preflight import preflight
from lct.train import build, train_step

calls = []
for name in ("all_reduce", "all_reduce_values", "gather_objects", "gather_rows", "barrier"):
    f = getattr(dist, name)
    setattr(dist, name, lambda *a, _f=f, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])

def make(*overrides):
    cfg = load_config(sys.argv[1], list(overrides))
    info = DistInfo.from_env()
    return build(cfg, info, preflight(cfg, info), monitor=False)

def flat(run):
    return torch.cat([p.detach().reshape(-1).clone() for p in run.engine.module.parameters()])

def steps(run, batches, state=None):
    state, out = state or run.state, []
    for bs in batches:
        del calls[:]
        r = train_step(run, bs, state)
        state = state.after_step(r.applied, run.cfg.optim.batch_size, 0.0)
        out.append({"applied": r.applied, "collectives": list(calls)})
    return out, state

ref = make()
it = iter(ref.loader)
batches = [[next(it) for _ in range(ref.accum)] for _ in range(8)]
w0 = flat(ref)
res = {"accum": ref.accum, "steps": steps(ref, batches)[0]}
fused = make("optim.fused=true")
assert torch.equal(flat(fused), w0)
res["fused_type"] = type(fused.engine.optimizer.optimizer).__name__
steps(fused, batches)
res["fused_rel"] = float((flat(fused) - flat(ref)).norm() / flat(ref).norm())
os.environ["LCT_FAULT_NAN_LOSS"] = "1:0"
bad = make()
before = flat(bad)
ema_before = bad.ema.buffers["ema"].clone()
res["fault"], state = steps(bad, batches[:1])
w1, ema1 = flat(bad), bad.ema.buffers["ema"].clone()
res["fault"] += steps(bad, batches[1:2], state)[0]  # data step 1: a NaN loss in every micro-batch
res["fault_unchanged"] = bool(torch.equal(flat(bad), w1) and torch.equal(bad.ema.buffers["ema"], ema1))
res["fault_moved_before"] = not torch.equal(w1, before) and not torch.equal(ema1, ema_before)
print("RESULT " + json.dumps(res))
'''


@pytest.mark.proc
@pytest.mark.slow
def test_train_step_collectives_fused_optimizer_and_nonfinite_guard(tmp_path, latent_data):
    """~40 s, one process, ZeRO-2, iLCT, 4 micro-batches per step:
    - train_step makes exactly one collective per step (the early-set count), however many
      micro-batches: a per-micro-batch vote (the old code: 1 + 4) flips it;
    - `optim.fused` (FusedRAdam, compiled, on DeepSpeed's flat fp32 partition) trains the same
      8 steps as torch's RAdam (rectified and unrectified steps) to 1e-6 relative;
    - a NaN loss skips the step: weights and EMA unchanged, without any vote collective."""
    cfg = tiny_train_config(tmp_path, latent_data, optim={"batch_size": 8, "micro_batch_size": 2},
                            sample={"every": 1000}, val={"every": 1000})
    script = tmp_path / "probe.py"
    script.write_text(STEP_PROBE)
    proc = run_cmd([sys.executable, str(script), str(cfg)], env={"OMP_NUM_THREADS": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert res["accum"] == 4
    assert all(s["applied"] for s in res["steps"])
    assert [s["collectives"] for s in res["steps"]] == [["all_reduce"]] * 8
    assert res["fused_type"] == "FusedRAdam" and res["fused_rel"] < 1e-6, res["fused_rel"]
    assert [s["applied"] for s in res["fault"]] == [True, False]
    assert res["fault"][1]["collectives"] == ["all_reduce"]
    assert res["fault_unchanged"] and res["fault_moved_before"]
