"""What the third fault probe found (issue 31): config names that become paths, config files that
are not UTF-8, run.resume=never and eval/, the fused optimizer's compiled kernels, the mechanism
behind the NaN skip, the diffusion term's weight in a sigma_data = 1 latent space. The checkpoint
tests that need a trained run are at the end of test_runs.py (they share its finished run)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cmd
from lct.config import load_config
from lct.tool_config import EvalConfig
from lct.errors import ConfigError

TRAIN = str(ROOT / "lct" / "train.py")


# ---------------------------------------------------------------------------------------------
# Names from configs that become paths; config files that are not UTF-8
# ---------------------------------------------------------------------------------------------

BAD_NAMES = ["../escape", "../../x", "/tmp/abs", "", "a/b", ".hidden", "a b", "stale", "x" * 65]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_ema_names_are_plain_identifiers(name):
    """An EMA name is the folder export/<name>/ (and the key prefix of ema.safetensors, split at the
    first '/'): anything but a plain identifier is refused in one line naming the key."""
    models = json.dumps([{"name": name, "halflife_images": 100}])
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"ema.models={models}", f"ema.sample={json.dumps(name)}"])
    msg = str(err.value)
    assert "ema.models.0.name" in msg and ("plain identifier" in msg or "reserved" in msg) and "\n" not in msg
    for good in ("ema", "ema_fast", "slow-2", "_x"):
        models = json.dumps([{"name": good, "halflife_images": 100}])
        assert load_config(None, [f"ema.models={models}", f"ema.sample={good}"]).ema.sample == good


def test_other_ema_names_read_as_paths_are_checked_too():
    with pytest.raises(ConfigError, match="model.init_ema.*plain identifier"):
        load_config(None, ["model.init_from=/some/run", "model.init_ema=../ema"])
    with pytest.raises(Exception, match="plain identifier"):
        EvalConfig(checkpoint="r", out="o", ema="../../ema")


def test_trainer_refuses_an_escaping_ema_name_before_writing_anything(tmp_path, capsys):
    """The probe's reproduction: `../escape` as an EMA name with a pre-filled target folder beside
    run.dir. The start is refused in one line (exit 2) and the folder keeps its file; a config
    file that is not UTF-8 is one line too, not a UnicodeDecodeError traceback. (The trainer's
    main in this process, as `python lct/train.py` runs it: test_config starts that process.)"""
    from conftest import run_cli
    from lct.train import main as train_main

    target = tmp_path / "escape"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{dir: {tmp_path}/run}}\nema:\n  models: [{{name: ../../escape, halflife_images: 100}}]\n"
                   "  sample: ../../escape\n")
    code, _, err = run_cli(capsys, train_main, ["--config", str(cfg)])
    assert code == 2, err[-2000:]
    lines = [l for l in err.splitlines() if "ema.models.0.name" in l]
    assert len(lines) == 1 and "plain identifier" in lines[0] and "Traceback" not in err
    assert (target / "keep.txt").read_text() == "mine" and not (tmp_path / "run").exists()

    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("# réglages\nrun: {dir: x}\n".encode("latin-1"))
    code, _, err = run_cli(capsys, train_main, ["--config", str(latin1), "--dry-run"])
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert f"{latin1}: not UTF-8 text (byte 0xe9 on line 1); save the file as UTF-8" in err


def test_a_base_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "base.yaml").write_bytes("optim: {lr: 1.0e-4}  # \xb5\n".encode("latin-1"))
    (tmp_path / "child.yaml").write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match="base.yaml: not UTF-8 text \\(byte 0xb5 on line 1\\)"):
        load_config(tmp_path / "child.yaml")


def test_inside_run_dir_is_the_guard_of_every_checkpoint_and_export_path(tmp_path):
    from lct.run import inside_run_dir

    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}"])
    run = tmp_path / "run"
    assert inside_run_dir(cfg, run / "export" / "ema") == run / "export" / "ema"
    for bad in (run / "export" / ".." / ".." / "x", Path("/tmp/abs"), run, run / "export" / "/etc"):
        with pytest.raises(RuntimeError, match="not inside run.dir"):
            inside_run_dir(cfg, bad)


# ---------------------------------------------------------------------------------------------
# run.resume=never moves eval/ with the rest
# ---------------------------------------------------------------------------------------------


def test_resume_never_moves_eval_with_the_rest_of_the_old_run(tmp_path):
    """The model card shows the newest RUN_DIR/eval/ results: left behind, the new run's card would
    show the old run's evaluation under the same step number."""
    from lct.dist import DistInfo
    from lct.run import prepare_run_dir

    run = tmp_path / "run"
    for name in ("eval/ckpt6/results.json", "checkpoints/step00000006/COMPLETE", "stats.jsonl", "locks/rank0.lock"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("{}")
    prepare_run_dir(load_config(None, [f"run.dir={run}", "run.resume=never"]), DistInfo())
    (prev,) = list((run / "previous").iterdir())
    assert (prev / "eval/ckpt6/results.json").is_file() and (prev / "checkpoints").is_dir()
    assert not (run / "eval").exists() and not (run / "checkpoints").exists() and (run / "locks").is_dir()


# ---------------------------------------------------------------------------------------------
# optim.fused: no compiled kernel serves another setting; ZeRO-0
# ---------------------------------------------------------------------------------------------

RADAM_RUN = '''
import json, sys
import torch
from lct.engine import FusedRAdam
beta2 = float(sys.argv[1])
g = torch.Generator().manual_seed(1)
a = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (1000, 37)]
b = [torch.nn.Parameter(p.detach().clone()) for p in a]
kw = dict(lr=1e-3, betas=(0.9, beta2), eps=1e-8, weight_decay=1e-4)
ref, fused = torch.optim.RAdam(a, foreach=True, **kw), FusedRAdam(b, **kw)
gen = torch.Generator().manual_seed(2)
for k in range(12):  # rectification starts at step 6 (beta2 0.999) / 5 (0.99)
    for pa, pb in zip(a, b):
        pa.grad = torch.randn(pa.shape, generator=gen)
        pb.grad = pa.grad.clone()
    ref.step()
    fused.step()
rel = lambda x, y: float((x - y).norm() / x.norm())
print("RESULT " + json.dumps({"weights": max(rel(x.detach(), y.detach()) for x, y in zip(a, b)),
      "exp_avg_sq": max(rel(ref.state[x]["exp_avg_sq"], fused.state[y]["exp_avg_sq"]) for x, y in zip(a, b))}))
'''


@pytest.mark.proc
@pytest.mark.slow
def test_fused_radam_kernels_hold_no_hyperparameter_across_runs_on_one_cache(tmp_path):
    """The probe's reproduction (~35 s: two CPU compiles): a beta2 = 0.99 run, then a 0.999 run,
    each a fresh process on one inductor cache folder; each equals torch's RAdam with its own beta2
    (the kernel compiled with 0.99 baked in gave a second moment 10x too large)."""
    script = tmp_path / "radam_run.py"
    script.write_text(RADAM_RUN)
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "1"}
    for beta2 in ("0.99", "0.999"):
        proc = run_cmd([sys.executable, str(script), beta2], env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
        assert res["exp_avg_sq"] < 1e-6 and res["weights"] < 1e-6, (beta2, res)


ZERO0_PROBE = '''
import json, sys
import torch
from lct.config import load_config
from lct.dist import DistInfo
from lct.preflight import preflight
from lct.train import build, train_step

def make(*overrides):
    cfg = load_config(sys.argv[1], list(overrides))
    info = DistInfo.from_env()
    return build(cfg, info, preflight(cfg, info), monitor=False)

def flat(run):
    return torch.cat([p.detach().reshape(-1).clone() for p in run.engine.module.parameters()])

def train(run, batches):
    state = run.state
    for bs in batches:
        r = train_step(run, bs, state)
        assert r.applied
        state = state.after_step(r.applied, run.cfg.optim.batch_size, 0.0)

ref = make()
it = iter(ref.loader)
batches = [[next(it) for _ in range(ref.accum)] for _ in range(8)]
train(ref, batches)
fused = make("optim.fused=true")
train(fused, batches)
print("RESULT " + json.dumps({"type": type(fused.engine.optimizer).__name__,
                              "rel": float((flat(fused) - flat(ref)).norm() / flat(ref).norm())}))
'''


@pytest.mark.proc
@pytest.mark.slow
def test_fused_radam_under_zero0_equals_torch_radam(tmp_path, latent_data):
    """`optim.fused` with distributed.zero_stage 0 (DeepSpeed hands the client optimizer the
    parameters themselves, one kernel each) trains 8 steps (unrectified and rectified) as torch's
    RAdam does, to fp32 rounding; it crashed at step 1."""
    from conftest import tiny_train_config

    cfg = tiny_train_config(tmp_path, latent_data, distributed={"zero_stage": 0},
                            sample={"every": 1000}, val={"every": 1000})
    script = tmp_path / "probe.py"
    script.write_text(ZERO0_PROBE)
    proc = run_cmd([sys.executable, str(script), str(cfg)], env={"OMP_NUM_THREADS": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert res["type"] == "FusedRAdam" and res["rel"] < 1e-6, res


# ---------------------------------------------------------------------------------------------
# The NaN skip: DeepSpeed's global-gradient-norm check
# ---------------------------------------------------------------------------------------------

NAN_PROBE = '''
import json, os, sys
import torch
import lct.engine
from lct.config import load_config
from lct.dist import DistInfo
from lct.preflight import preflight
from lct.train import build, train_step

os.environ["LCT_FAULT_NAN_LOSS"] = "1:0"  # data step 1: a NaN loss

def run_two_steps(stage, grad_norm_check=True):
    cfg = load_config(sys.argv[1], [f"distributed.zero_stage={stage}"])
    info = DistInfo.from_env()
    resolve = lct.engine.deepspeed_config

    def check_off(*a):
        ds = resolve(*a)
        ds["zero_optimization"]["compute_grad_norm"] = False
        return ds

    if not grad_norm_check:  # the control: DeepSpeed's check off, nothing else changed
        lct.engine.deepspeed_config = check_off
    try:
        run = build(cfg, info, preflight(cfg, info), monitor=False)
    finally:
        lct.engine.deepspeed_config = resolve
    it = iter(run.loader)
    flat = lambda: torch.cat([p.detach().reshape(-1).clone() for p in run.engine.module.parameters()])
    state, out = run.state, {"config_says": run.engine._config.zero_config.compute_grad_norm}
    for k in range(2):
        before = flat()
        r = train_step(run, [next(it) for _ in range(run.accum)], state)
        state = state.after_step(r.applied, cfg.optim.batch_size, 0.0)
        out[f"applied{k}"] = r.applied
        out[f"unchanged{k}"] = bool(torch.equal(flat(), before))
    out["finite"] = bool(torch.isfinite(flat()).all())
    return out

res = {"zero1": run_two_steps(1), "zero2": run_two_steps(2), "zero2_check_off": run_two_steps(2, False)}
print("RESULT " + json.dumps(res))
'''


def test_deepspeed_config_pins_the_grad_norm_check():
    from lct.engine import deepspeed_config

    for stage in (1, 2):
        ds = deepspeed_config(load_config(None, [f"distributed.zero_stage={stage}"]), world_size=1)
        assert ds["zero_optimization"]["compute_grad_norm"] is True


@pytest.mark.proc
@pytest.mark.slow
def test_nan_skip_is_deepspeeds_global_grad_norm_check(tmp_path, latent_data):
    """~40 s: a NaN loss at data step 1 skips that update under ZeRO-1 and ZeRO-2 (weights
    unchanged, the step reported not applied) because DeepSpeed drops a step whose all-reduced
    global gradient norm is not finite: with `compute_grad_norm` off and nothing else changed the
    same step is applied and the weights turn NaN, so this test fails if the check is ever off."""
    from conftest import tiny_train_config

    cfg = tiny_train_config(tmp_path, latent_data, optim={"batch_size": 8}, sample={"every": 1000},
                            val={"every": 1000})
    script = tmp_path / "nan_probe.py"
    script.write_text(NAN_PROBE)
    proc = run_cmd([sys.executable, str(script), str(cfg)], env={"OMP_NUM_THREADS": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    for stage in ("zero1", "zero2"):
        r = res[stage]
        assert r["config_says"] is True and r["applied0"] and not r["unchanged0"], (stage, r)
        assert not r["applied1"] and r["unchanged1"] and r["finite"], (stage, r)
    off = res["zero2_check_off"]
    assert off["config_says"] is False and off["applied1"] and not off["finite"], off


# ---------------------------------------------------------------------------------------------
# The diffusion term's weight in a sigma_data = 1 latent space (SPEC 14.4)
# ---------------------------------------------------------------------------------------------

PIXART_CONFIGS = ["configs/ect_pixart_sigma_512.yaml", "configs/ect_pixart_alpha_256.yaml"]


def _edm_net(sigma_data: float, w: torch.Tensor):
    """SPEC 1's scalings around a fixed map F(u) = tanh(u W): f(2x, 2 sigma) at sigma_data 1 is
    exactly 2 f(x, sigma) at 0.5, so the two spaces hold the same model."""

    def net(x, sigma, **cond):
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        c_skip, c_out = sigma_data**2 / (s**2 + sigma_data**2), sigma_data * s / (s**2 + sigma_data**2).sqrt()
        u = (x / (s**2 + sigma_data**2).sqrt()).flatten(1)
        return c_skip * x + c_out * torch.tanh(u @ w).reshape(x.shape)

    return net


@pytest.mark.parametrize("config", PIXART_CONFIGS)
def test_pixart_diffusion_weight_keeps_ilcts_balance(config):
    """lct's own ECT objective on the same images, noise and model in both spaces: the PixArt
    config (sigma_data 1, every constant through x -> 2x) and iLCT's setting it was derived from
    (sigma_data 0.5, diffusion weight 5, SPEC 5). Each term scales by a constant (SPEC 14.4: the
    Cauchy term halves, the early-step diffusion term does not), so the config's diffusion_weight
    must halve for the diffusion term's share of the loss to be iLCT's, at every stage."""
    from lct.objectives import make_objective

    one = load_config(ROOT / config).method
    half = one.model_copy(update=dict(sigma_data=0.5, p_mean=one.p_mean - float(torch.log(torch.tensor(2.0))),
                                      ect_b=2 * one.ect_b, c_first=one.c_first / 2, c_scale=one.c_scale / 2,
                                      diff_sigma_max=one.diff_sigma_max / 2, sigma_max=one.sigma_max / 2,
                                      tau=[t / 2 for t in one.tau], diffusion_weight=5.0))
    assert (one.objective, one.distance, one.ect_weight) == ("ect", "cauchy", "inv_dt")
    assert half.p_mean == pytest.approx(-1.1)
    g = torch.Generator().manual_seed(0)
    b, shape = 256, (4, 8, 8)
    x = 0.5 * torch.randn(b, *shape, generator=g, dtype=torch.float64)
    batch = {"x": x, "z": torch.randn(b, *shape, generator=g, dtype=torch.float64),
             "n": torch.randn(b, generator=g, dtype=torch.float64)}
    w = torch.randn(256, 256, generator=g, dtype=torch.float64) / 16
    shares = []
    for step in (0, 25_000):  # mapping stage 0 (c_first) and stage 2 (the adaptive fit)
        out = {}
        for name, method, scale in (("ilct", half, 1.0), ("config", one, 2.0)):
            obj = make_objective(method, shape, 80_000)
            bb = dict(batch, x=scale * batch["x"])
            plan = obj.plan(bb, step)
            early = int(plan.early.sum())
            loss, diag = obj.loss(_edm_net(method.sigma_data, w), bb, plan, early)
            ct = float(diag.loss.mean())
            out[name] = (float(loss) - ct) / float(loss)  # the diffusion term's share of the loss
            assert 0 < early < b
        shares.append(out)
        assert out["config"] == pytest.approx(out["ilct"], rel=1e-9), out
    assert shares[0]["ilct"] != pytest.approx(shares[1]["ilct"], rel=1e-3)  # two different stages


# ---------------------------------------------------------------------------------------------
# DeepSpeed's CPU op: a build folder per environment, one line before a build
# ---------------------------------------------------------------------------------------------


def test_op_build_folder_is_per_environment_and_a_user_setting_wins(monkeypatch, tmp_path):
    from lct import deepspeed_ops

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    here = deepspeed_ops.extensions_dir()
    assert os.access(sys.prefix, os.W_OK) and here.is_relative_to(sys.prefix) and torch.__version__ in here.name
    # A read-only environment: the user's cache, keyed by the environment's path.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(deepspeed_ops.os, "access", lambda *a: False)
    a = deepspeed_ops.extensions_dir()
    monkeypatch.setattr(deepspeed_ops.sys, "prefix", str(tmp_path / "other-env"))
    b = deepspeed_ops.extensions_dir()
    assert a != b and a.is_relative_to(tmp_path / "cache") and b.is_relative_to(tmp_path / "cache")
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert deepspeed_ops.prepare(local_rank=1) == tmp_path / "mine"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")


def test_one_line_before_the_cpu_op_build_and_none_once_built(monkeypatch, tmp_path, capsys):
    """On a CPU machine (this one) DeepSpeed JIT-builds its shared-memory op at the first process
    group: an empty build folder gets one line naming it first; a built op newer than its sources
    gets none; sources newer than the built op (a DeepSpeed upgrade) get the line again."""
    from lct import deepspeed_ops

    builder = deepspeed_ops.cpu_op()
    assert builder is not None and builder.name == "deepspeed_shm_comm"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    deepspeed_ops.prepare(local_rank=0)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("building DeepSpeed's CPU communication op (deepspeed_shm_comm) in "
                                               f"{tmp_path / 'ext'}: one time for this environment, about "), err
    deepspeed_ops.prepare(local_rank=1)  # the other ranks of the node wait on torch's build lock quietly
    assert capsys.readouterr().err == ""
    lib = tmp_path / "ext" / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"built")
    newest = max(Path(builder.deepspeed_src_path(p)).stat().st_mtime for p in builder.sources())
    os.utime(lib, (newest + 10, newest + 10))
    deepspeed_ops.prepare(local_rank=0)
    assert capsys.readouterr().err == ""
    os.utime(lib, (newest - 10, newest - 10))
    deepspeed_ops.prepare(local_rank=0)
    assert "building DeepSpeed's CPU communication op" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Hashing while writing: DeepSpeed's checkpoint engine
# ---------------------------------------------------------------------------------------------


def test_deepspeeds_checkpoint_engine_writes_are_hashed_as_written(tmp_path):
    """Inside `hashed_writes`, DeepSpeed's TorchCheckpointEngine.save (what its engine calls for
    the model and ZeRO files) streams through the hash: the record is the file's sha256, the file
    loads as DeepSpeed's own would, and the engine is itself again after the block."""
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from lct.checkpoint import hashed_writes
    from lct.files import file_sha256

    ce = TorchCheckpointEngine()
    state = {"module": {"w": torch.randn(300, 7)}, "step": 3}
    with hashed_writes(SimpleNamespace(checkpoint_engine=ce)) as written:
        ce.save(state, str(tmp_path / "mp_rank_00_model_states.pt"))
    rec = written["mp_rank_00_model_states.pt"]
    assert rec == {"bytes": (tmp_path / "mp_rank_00_model_states.pt").stat().st_size,
                   "sha256": file_sha256(tmp_path / "mp_rank_00_model_states.pt")}
    assert torch.equal(ce.load(str(tmp_path / "mp_rank_00_model_states.pt"))["module"]["w"], state["module"]["w"])
    assert "save" not in vars(ce)
    ce.save(state, str(tmp_path / "again.pt"))
    assert "again.pt" not in written
