"""Package layout rules: no module shadows a stdlib or dependency module when scripts run as
files, `import lct` stays light, and the scripts run as plain files and entry points."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cmd

DEPENDENCY_MODULES = {"torch", "torchvision", "diffusers", "open_clip", "webdataset", "deepspeed",
                      "einops", "ot", "scipy", "numpy", "yaml", "pydantic", "safetensors", "tqdm",
                      "tensorboard", "PIL", "braceexpand", "xformers", "torch_fidelity", "torchmetrics",
                      "transformers", "huggingface_hub", "wandb", "pytest"}


def module_names(folder: Path) -> set[str]:
    return {p.stem for p in folder.rglob("*.py")} | {p.name for p in folder.rglob("*") if p.is_dir()}


@pytest.mark.parametrize("folder", ["lct", "data_prep", "eval", "bench"])
def test_no_module_shadows_stdlib_or_dependency(folder):
    names = module_names(ROOT / folder) - {"__init__", "__pycache__"}
    clash = sorted(n for n in names if n in sys.stdlib_module_names or n in DEPENDENCY_MODULES)
    assert not clash, f"{folder}/ has modules named like stdlib/dependency modules: {clash}"


@pytest.mark.proc
def test_import_lct_is_light():
    code = ("import sys, lct, lct.config, lct.errors; "
            "heavy = [m for m in ('deepspeed', 'open_clip', 'diffusers') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.proc
def test_import_trainer_defers_diffusers_and_transformers():
    """`import lct.train` (its --help, config refusals) loads no diffusers or transformers: they come
    with the first network or text tower (lct.models loads its names on first use)."""
    code = ("import sys, lct.train, lct.models; from lct.models import Precond; "
            "heavy = [m for m in ('diffusers', 'transformers', 'open_clip', 'deepspeed') if m in sys.modules]; "
            "print(heavy); from lct.models import TextDiT; sys.exit(1 if heavy or 'diffusers' not in sys.modules else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


SCRIPTS = sorted(str(p.relative_to(ROOT)) for p in
                 [*(ROOT / "data_prep").glob("*.py"), *(ROOT / "eval").glob("*.py"), ROOT / "lct" / "train.py"]
                 if p.name != "__init__.py")


@pytest.mark.proc
@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_run_as_plain_files(script):
    """`python data_prep/x.py --help` works from any directory, with the repo root on sys.path."""
    proc = run_cmd([sys.executable, str(ROOT / script), "--help"], cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()


def test_scripts_put_repo_root_first_on_sys_path():
    """The docstring comes first (so the script has a `__doc__`), then, before any import, the
    block that puts the repository root first on sys.path (docs/ARCHITECTURE.md)."""
    for script in SCRIPTS:
        text = (ROOT / script).read_text()
        body = ast.parse(text).body
        assert ast.get_docstring(ast.Module(body=body, type_ignores=[])), f"{script}: no module docstring"
        first = body[1]
        assert isinstance(first, ast.If) and "__main__" in ast.unparse(first.test), \
            f"{script}: the first statement after the docstring must put the repo root on sys.path"
        assert "sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])" in ast.unparse(first), script


@pytest.mark.parametrize("script", ["lct-train", "lct-sample", "lct-make-shapes", "lct-coco-to-wds",
                                    "lct-encode-latents", "lct-train-vae", "lct-eval"])
def test_console_entry_points(script, monkeypatch, capsys):
    """The installed console scripts (pip install -e .) reach the same mains as the plain files:
    each entry point loads and its `--help` prints the usage (in this process, as the generated
    wrapper calls it; test_console_entry_point_as_a_process starts one wrapper)."""
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group="console_scripts")}
    if script not in eps:
        pytest.skip(f"{script} is not installed (run pip install -e .)")
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exc:
        eps[script].load()()
    assert exc.value.code == 0, capsys.readouterr().err[-2000:]
    assert "usage" in capsys.readouterr().out.lower()


@pytest.mark.proc
def test_console_entry_point_as_a_process():
    """One generated wrapper run as users run it (the others: test_console_entry_points)."""
    exe = Path(sys.executable).parent / "lct-sample"
    if not exe.exists():
        pytest.skip(f"lct-sample is not installed next to {sys.executable} (run pip install -e .)")
    proc = run_cmd([str(exe), "--help"], cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()
