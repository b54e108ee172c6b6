"""lct.rng's keys (SPEC 1.2): purpose-tagged and length-prefixed, so two purposes or two lengths
never share a stream; every stream lct draws from is a `Stream` (a source scan), listed in SPEC; a
checkpoint of the older key scheme is refused on resume in one line."""

import ast
import itertools
import json
import re

import numpy as np
import pytest

from conftest import ROOT
from lct import rng
from lct.errors import UserError
from lct.rng import FIELDS, KEY_SCHEME, Stream, decode_key, key, philox

EDGE = (0, 1, 2, 2**32 - 1, 2**32, 2**32 + 1, 2**63, 2**64 - 1)


def state(stream, *fields):
    """The 128-bit Philox key the stream's SeedSequence produces."""
    return tuple(np.random.SeedSequence(key(stream, *fields)).generate_state(4))


def test_the_old_problem_is_real_and_gone():
    """SeedSequence pads short entropy with zeros: [0, 2, 0] and [0, 2, 0, 0] were one stream."""
    old = [tuple(np.random.SeedSequence(k).generate_state(4)) for k in ([0, 2, 0], [0, 2, 0, 0])]
    assert old[0] == old[1]
    # The same integers as fields of keys of different lengths (and purposes) now differ.
    assert state(Stream.VALIDATION, 0, 2) != state(Stream.SAMPLE_CHOICES, 0, 2, 0)
    assert state(Stream.SAMPLE_CHOICES, 0, 2, 0) != state(Stream.SHARD_CHOICE, 0, 2, 0, 0)


def test_keys_decode_to_their_stream_and_fields():
    """The word list is an injective encoding: decoding gives back (scheme, stream, fields)."""
    for stream, names in FIELDS.items():
        for fields in itertools.product(EDGE, repeat=len(names)) if len(names) <= 2 else [
                tuple(EDGE[(i * 3 + j) % len(EDGE)] for j in range(len(names))) for i in range(len(EDGE))]:
            words = key(stream, *fields)
            assert words.dtype == np.uint32 and len(words) == 3 + 2 * len(fields)
            assert decode_key(words) == (KEY_SCHEME, stream, fields)


def test_different_purposes_or_lengths_never_share_a_key():
    """Every (stream, fields) of a grid of small and boundary values (zeros, 32-bit carries, where
    the old keys' padding and word splitting collided) has its own key words and its own Philox key."""
    values = (0, 1, 2, 2**32, 2**32 + 1)
    keys = []
    for stream, names in FIELDS.items():
        for fields in itertools.product(values, repeat=len(names)):
            keys.append((stream, fields))
    words = {tuple(key(s, *f)) for s, f in keys}
    assert len(words) == len(keys)
    states = {state(s, *f) for s, f in keys}
    assert len(states) == len(keys)


def test_the_stream_mode_seeds_are_not_the_first_training_sample():
    """Issue 29: the stream-mode shuffle seed was philox(seed, rank 0, worker 0, resume 0), the key
    of training sample (seed, TRAIN_SAMPLE = 0, step 0, slot 0) padded; now separate streams."""
    seed = 0
    firsts = {s: philox(s, *((seed, 0, 0, 0) if len(FIELDS[s]) == 4 else (seed, 0, 0))).random()
              for s in (Stream.SHARD_CHOICE, Stream.SHUFFLE_BUFFER, Stream.SAMPLE_CHOICES, Stream.SIGMA_PAIR,
                        Stream.POSTERIOR_EPS, Stream.TRAIN_NOISE)}
    assert len(set(firsts.values())) == len(firsts)
    assert rng.seed_int(Stream.SHARD_CHOICE, seed, 0, 0, 0) != rng.seed_int(Stream.SHUFFLE_BUFFER, seed, 0, 0, 0)


def test_a_key_needs_a_stream_and_its_fields():
    with pytest.raises(TypeError, match="lct.rng.Stream"):
        philox(0, 2, 0)  # the old call form: refused, not silently another stream
    with pytest.raises(TypeError, match=r"SHAPES_CANVAS is keyed by \(seed, split, index\)"):
        philox(Stream.SHAPES_CANVAS, 0, 1)
    with pytest.raises(ValueError, match="outside"):
        philox(Stream.VALIDATION, -1, 0)
    with pytest.raises(ValueError, match="outside"):
        philox(Stream.VALIDATION, 2**64, 0)
    # Same key, same numbers; seed_int is a 63-bit integer.
    assert philox(Stream.DATA_ORDER, 3, 1).random() == philox(Stream.DATA_ORDER, 3, 1).random()
    assert 0 <= rng.seed_int(Stream.TORCH_GLOBAL, 2**64 - 1, 7) < 2**63


def test_training_draws_are_separate_streams():
    """z does not depend on whether (or at which shape) eps is drawn: data.posterior mean, fixed
    and sample see the same noise, flips, captions and pair draws for a (step, slot)."""
    from lct.data import DataSpec, draw_sample
    from lct.vae import LatentNorm

    shape = (2, 3, 3)
    sample = {"key": "k", "mean": np.zeros(shape, np.float16), "std": np.ones(shape, np.float16),
              "tokens": np.arange(3 * 5).reshape(3, 5).astype(np.int32), "captions": ["a", "b", "c"]}
    out = {}
    for posterior in ("sample", "mean", "fixed"):
        spec = DataSpec(urls=[], mode="indexed", seed=5, rank=0, world_size=1, micro_batch=1, accum=1,
                        latent_shape=shape, norm=LatentNorm(np.zeros((2, 1, 1)), np.ones((2, 1, 1)) * 0.5),
                        caption_dropout=0.3, flip=False, text="on_the_fly", ot=False, posterior=posterior)
        out[posterior] = draw_sample(spec, sample, 4, 1)
    for p in ("mean", "fixed"):
        for k in ("z", "u", "n", "cond_drop", "tokens"):
            np.testing.assert_array_equal(out[p][k], out["sample"][k])
    eps = philox(Stream.POSTERIOR_EPS, 5, 4, 1).standard_normal(shape, dtype=np.float32)
    np.testing.assert_allclose(out["sample"]["x"], eps, rtol=1e-6)  # mean 0, std 1, norm (x - 0) / 0.5 * 0.5
    assert np.abs(out["mean"]["x"]).max() == 0
    np.testing.assert_array_equal(out["sample"]["z"], philox(Stream.TRAIN_NOISE, 5, 4, 1).standard_normal(
        shape, dtype=np.float32))


# ----------------------------------------------------------------------------------------------
# Every stream goes through lct.rng (a source scan), and SPEC lists them all
# ----------------------------------------------------------------------------------------------


SCANNED = ("lct", "data_prep", "eval", "bench")
# Seeds outside the scheme on purpose (SPEC 1.2 says why), as (file, call). bench/ scripts other
# than their lct.rng draws fix torch.manual_seed(0) for random weights: not scanned for raw seeds.
OUTSIDE = {("lct/text.py", "manual_seed"), ("lct/shapes.py", "SeedSequence"), ("lct/shapes.py", "default_rng"),
           ("lct/protocols.py", "default_rng"), ("lct/pipeline.py", "manual_seed"),
           ("eval/digits_metric.py", "manual_seed")}
RAW = ("manual_seed", "SeedSequence", "default_rng", "Random", "RandomState")


def calls(path):
    """(called name, whether it is an lct.rng function, argument sources, line) of every call."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute):
                name, of_rng = f.attr, isinstance(f.value, ast.Name) and f.value.id in ("rng", "lct_rng")
            elif isinstance(f, ast.Name):
                name, of_rng = f.id, f.id in ("philox", "seed_int")
            else:
                continue
            yield name, of_rng, [ast.unparse(a) for a in node.args], node.lineno


def test_every_seed_in_the_source_goes_through_a_stream():
    bad = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "lct/rng.py":
                continue
            for name, of_rng, args, line in calls(path):
                if of_rng and name in ("philox", "seed_int", "normal"):
                    stream_arg = args[1] if name == "normal" else args[0]
                    if not stream_arg.startswith(("Stream.", "rng.Stream.", "lct_rng.Stream.")):
                        bad.append(f"{rel}:{line}: {name}({', '.join(args)}) without a Stream")
                elif name in RAW and folder != "bench" and (rel, name) not in OUTSIDE:
                    if not (args and "seed_int(" in args[0]):
                        bad.append(f"{rel}:{line}: {name}({', '.join(args)})")
    assert not bad, "random streams outside lct.rng's keys (SPEC 1.2):\n" + "\n".join(bad)


def test_spec_lists_every_stream_and_every_stream_is_used():
    spec = (ROOT / "docs" / "SPEC.md").read_text()
    section = spec.split("### 1.2 Random streams", 1)[1].split("\n## 2.", 1)[0]
    listed = set(re.findall(r"`([A-Z_]+)`", section))
    assert {s.name for s in Stream} <= listed
    source = "\n".join(p.read_text() for folder in SCANNED for p in (ROOT / folder).rglob("*.py")
                       if p.relative_to(ROOT).as_posix() != "lct/rng.py")
    source += "\n".join(line for line in (ROOT / "lct" / "rng.py").read_text().splitlines()
                        if not re.match(r"\s+Stream\.\w+: \(", line))  # its helpers, not the FIELDS table
    unused = [s.name for s in Stream if f"Stream.{s.name}" not in source]
    assert not unused, f"streams no code draws from: {unused}"


def test_a_checkpoint_of_the_older_key_scheme_is_refused_in_one_line(tmp_path):
    from lct.config import TrainConfig
    from lct.dist import DistInfo
    from lct.run import check_resume

    cfg = TrainConfig()
    ckpt_dir = tmp_path / "step00000004"
    ckpt_dir.mkdir()
    record = {"state": {"applied_steps": 4}, "world_size": 1, "config": cfg.model_dump(mode="json")}
    (ckpt_dir / "lct_state.json").write_text(json.dumps(record))
    with pytest.raises(UserError) as err:
        check_resume(cfg, DistInfo(), ckpt_dir)
    msg = str(err.value)
    assert "\n" not in msg and "key scheme 1" in msg and f"scheme {KEY_SCHEME}" in msg and "run.resume=never" in msg
    record["rng_keys"] = KEY_SCHEME
    (ckpt_dir / "lct_state.json").write_text(json.dumps(record))
    assert check_resume(cfg, DistInfo(), ckpt_dir)["rng_keys"] == KEY_SCHEME
