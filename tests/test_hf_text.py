"""transformers text towers (lct/hf_text.py): T5 and CLIP behind lct's text-tower interface,
on tiny models and a tokenizer trained offline (tests/helpers_hf.py)."""

import time
from pathlib import Path

import pytest
import torch

from helpers_hf import CAPTIONS, TEXT_DIM, make_tiny_clip_text, make_tiny_t5, make_tiny_tokenizer
from lct.errors import UserError
from lct.hf_text import HFTextEncoder
from lct.text import TextEncoder


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_t5")
    tok = make_tiny_tokenizer(root / "tok")
    return {"tok": tok, "flat": make_tiny_t5(root / "flat", tok),
            "pipe": make_tiny_t5(root / "pipe", tok, layout="pipeline")}


@pytest.fixture(scope="module")
def t5(t5_dirs):
    return HFTextEncoder.load(t5_dirs["pipe"], max_length=20)


def test_tokenizer_round_trip_and_mask_equals_attention_mask(t5_dirs, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(t5_dirs["tok"])
    tok.save_pretrained(str(tmp_path / "again"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "again"))
    captions = CAPTIONS + ["", "zebra quokka xylophone"]  # empty and out-of-vocabulary captions
    ref = tok(captions, padding="max_length", max_length=20, truncation=True, return_tensors="pt")
    assert torch.equal(again(captions, padding="max_length", max_length=20, truncation=True,
                             return_tensors="pt")["input_ids"], ref["input_ids"])
    enc = HFTextEncoder.load(t5_dirs["flat"], max_length=20)
    tokens = enc.tokenize(captions)
    assert tokens.dtype == torch.long and tokens.shape == (len(captions), 20)
    assert torch.equal(tokens, ref["input_ids"])
    assert torch.equal(enc.mask(tokens), ref["attention_mask"].bool())
    assert not enc.mask(tokens).all()  # there is padding to mask
    assert enc.mask(tokens)[len(CAPTIONS)].sum() == 1  # "" is the EOS token alone


def test_t5_states_mask_pooled(t5_dirs, t5):
    from transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(t5_dirs["pipe"], subfolder="text_encoder").eval()
    tokens = t5.tokenize(CAPTIONS[:4])
    states, mask, pooled = t5(tokens)
    with torch.no_grad():
        ref = model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
    assert states.dtype == torch.float32 and states.shape == (4, 20, TEXT_DIM)
    torch.testing.assert_close(states, ref, rtol=0, atol=0)
    assert mask.dtype == torch.bool and pooled.shape == (4, 0)
    assert (t5.kind, t5.state_dim, t5.pooled_dim, t5.context_length) == ("t5", TEXT_DIM, 0, 20)
    assert not any(p.requires_grad for p in t5.parameters()) and not t5.training
    t5.train()
    assert not t5.model.training  # frozen: always eval


def test_padding_does_not_change_real_token_states(t5_dirs, t5):
    """Why trimmed storage is exact: with the mask, T5's real-token states ignore the padding."""
    long = HFTextEncoder.load(t5_dirs["pipe"], max_length=32)
    short = ["a cat", "a red circle", "two dogs"]
    s20, m20, _ = t5.encode(short)
    s32, m32, _ = long.encode(short)
    assert not m20.all()
    for i in range(3):
        torch.testing.assert_close(s20[i][m20[i]], s32[i][m32[i]], rtol=1e-5, atol=1e-6)


def test_null_condition_is_the_empty_caption_eos_state(t5):
    null = t5.null_condition()
    states, mask, _ = t5.encode([""])
    assert null.shape == (1, TEXT_DIM) and mask[0].sum() == 1
    torch.testing.assert_close(null, states[0, :1])


def test_manifest_record_dispatch_and_identity(t5_dirs, t5):
    rec = t5.record()
    assert rec["kind"] == "t5" and rec["pooled_dim"] == 0 and rec["state_dim"] == TEXT_DIM
    assert rec["tokenizer"] == t5.identity() and rec["source"]["id"] == t5_dirs["pipe"]
    manifest = {"text": rec}
    enc = TextEncoder.from_manifest(manifest)  # open_clip's entry point dispatches on "kind"
    assert isinstance(enc, HFTextEncoder) and enc.identity() == t5.identity()
    tokens = t5.tokenize(CAPTIONS[:2])
    torch.testing.assert_close(enc(tokens)[0], t5(tokens)[0], rtol=0, atol=0)
    moved = TextEncoder.from_manifest(manifest, model=t5_dirs["flat"])  # a local copy of the same tower
    assert moved.identity() == t5.identity()
    bad = {"text": dict(rec, tokenizer=dict(rec["tokenizer"], probe_sha256="0" * 64))}
    with pytest.raises(UserError, match="tokenizer differs"):
        HFTextEncoder.from_manifest(bad)


def test_bf16_tower_outputs_fp32(t5_dirs, t5):
    enc = HFTextEncoder.load(t5_dirs["flat"], max_length=20, dtype="bf16")
    states, mask, pooled = enc.encode(CAPTIONS[:2])
    ref = t5.encode(CAPTIONS[:2])[0]
    assert states.dtype == torch.float32 and enc.record()["dtype"] == "bf16"
    real = mask[..., None].expand_as(states)
    torch.testing.assert_close(states[real], ref[real], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("projection", [False, True])
def test_clip_text_tower(tmp_path, projection):
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    folder = make_tiny_clip_text(tmp_path / "clip", projection=projection)
    enc = HFTextEncoder.load(folder)  # max_length from the tokenizer (24)
    captions = ["a cat", CAPTIONS[1], ""]
    tokens = enc.tokenize(captions)
    ref_tok = AutoTokenizer.from_pretrained(folder)(captions, padding="max_length", max_length=24, truncation=True,
                                                   return_tensors="pt")
    assert enc.pad_id == enc.eot_id  # CLIP pads with EOS: the mask is "up to the first EOS"
    assert torch.equal(enc.mask(tokens), ref_tok["attention_mask"].bool())
    states, mask, pooled = enc(tokens)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel).from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(input_ids=tokens)
    torch.testing.assert_close(states, out.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(pooled, out.text_embeds if projection else out.pooler_output, rtol=0, atol=0)
    assert enc.kind == "clip" and enc.pooled_dim == (12 if projection else TEXT_DIM)
    assert enc.record()["architecture"] == type(model).__name__


def test_missing_weights_one_line_and_fast(tmp_path, t5_dirs):
    t0 = time.time()
    with pytest.raises(UserError, match=r"^text.model google/t5-v1_1-xxl: not in the local Hugging Face cache"):
        HFTextEncoder.load("google/t5-v1_1-xxl", max_length=120)  # HF_HUB_OFFLINE=1 (conftest)
    assert time.time() - t0 < 5
    with pytest.raises(UserError, match="text.model .*no 'config.json' or 'text_encoder/config.json'"):
        HFTextEncoder.load(str(tmp_path))
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((Path(t5_dirs["flat"]) / "config.json").read_text())
    with pytest.raises(UserError, match="tokenizer"):  # no tokenizer beside it
        HFTextEncoder.load(str(weightless))
    with pytest.raises(UserError, match="could not load the T5EncoderModel weights"):
        HFTextEncoder.load(str(weightless), tokenizer=t5_dirs["tok"])
    with pytest.raises(UserError, match="text.dtype 'int8'"):
        HFTextEncoder.load(t5_dirs["flat"], dtype="int8")
