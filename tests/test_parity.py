"""fp32 parity with Hugging Face transformers: logits at every step, greedy tokens, padded batches."""

from __future__ import annotations

import numpy as np
import torch

from gpt2onnx.export import checkpoints
from gpt2onnx.export.convert import ExportOptions, export
from gpt2onnx.export.parity import left_pad
from gpt2onnx.runtime import Engine

from .conftest import PROMPTS, QUIET, prefilled

FP32_ATOL = 1e-4  # max |Δlogit| against PyTorch fp32 (measured ~4e-7 on synthetic:tiny)
def hf_greedy(model, rows: list[list[int]], max_new_tokens: int, eos: int) -> list[list[int]]:
    """transformers generate(do_sample=False) on a left-padded batch; new tokens up to EOS."""
    ids, mask, _ = left_pad(rows, eos)
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=eos, eos_token_id=eos)
    result = []
    for row in out[:, ids.shape[1]:].tolist():
        result.append(row[: row.index(eos) + 1] if eos in row else row)
    return result


def test_export_manifest_records_parity(engine):
    figs = engine.manifest.raw["parity"]["decode_vs_pytorch_fp32"]
    assert figs["max_abs_logit_diff"] <= FP32_ATOL
    assert figs["decode_steps"] >= 3 and figs["batch"] == 2
    assert figs["top1_agreement"] == 1.0


def test_logits_each_step_match_transformers(engine, tiny):
    """The decode core's own IO-bound path (left-padded prompt pass, then steps writing the cache in place) vs transformers."""
    ids, mask, pos = left_pad(PROMPTS, engine.pad_token_id)
    with torch.no_grad():
        ref = tiny.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         position_ids=torch.from_numpy(pos), use_cache=True)
    dec, ours = prefilled(engine, PROMPTS, 5)
    assert np.abs(ours - ref.logits[:, -1].numpy()).max() <= FP32_ATOL
    past = ref.past_key_values
    for _ in range(5):
        tokens = ref.logits[:, -1].argmax(-1).numpy()
        ours = dec.decode(tokens)
        mask = np.concatenate([mask, np.ones((len(PROMPTS), 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        with torch.no_grad():
            ref = tiny.model(input_ids=torch.from_numpy(tokens[:, None]), attention_mask=torch.from_numpy(mask),
                             position_ids=torch.from_numpy(pos), past_key_values=past, use_cache=True)
        past = ref.past_key_values
        assert np.abs(ours - ref.logits[:, -1].numpy()).max() <= FP32_ATOL


def test_greedy_batch_equals_transformers(engine, tiny):
    ours = engine.generate(PROMPTS, max_new_tokens=24)
    theirs = hf_greedy(tiny.model, PROMPTS, 24, engine.eos_token_id)
    assert ours == theirs
    assert len({tuple(r) for r in ours}) == len(PROMPTS)  # rows differ: padding did not leak across rows


def test_batched_equals_one_by_one(engine):
    batched = engine.generate(PROMPTS, max_new_tokens=12)
    assert batched == [engine.generate([p], max_new_tokens=12)[0] for p in PROMPTS]


def test_stops_at_eos(engine, tiny):
    first = engine.generate([PROMPTS[0]], max_new_tokens=6)[0]
    # make the third greedy token the stop token: the row must end right there, EOS included
    out = engine.generate([PROMPTS[0]], max_new_tokens=6, eos_token_id=first[2])[0]
    assert out == first[:3]
    assert len(engine.generate([PROMPTS[0]], max_new_tokens=6, eos_token_id=-1)[0]) == 6


def test_local_hf_checkpoint_directory(tmp_path, tiny):
    """A checkpoint saved by transformers (config.json + safetensors + tokenizer) exports and runs."""
    ckpt = checkpoints.Checkpoint(checkpoints.synthetic_model("tiny", seed=7), checkpoints.synthetic_tokenizer(), "x")
    checkpoints.save_hf_checkpoint(ckpt, str(tmp_path / "hf"))
    art = export(ExportOptions(str(tmp_path / "hf"), str(tmp_path / "art")), log=QUIET)
    engine = Engine.load(art, provider="cpu")
    assert engine.manifest.raw["source"]["checkpoint"] == str(tmp_path / "hf")
    assert not engine.manifest.synthetic
    prompt = engine.encode("Hello, how are you today?")
    assert engine.generate([prompt], max_new_tokens=10) == hf_greedy(ckpt.model, [prompt], 10, engine.eos_token_id)
    # the tokenizer travelled with the artifact and matches transformers' own
    import transformers

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tok("Hello, how are you today?")["input_ids"] == prompt


def test_score_equals_transformers_log_softmax(engine, tiny, monkeypatch):
    """Engine.score (echo with logprobs, evaluation harnesses): each token's log-probability given the ones
    before it, and the likeliest alternatives, equal transformers' log_softmax over its logits, whether the
    prompt runs in one pass or in passes that split it."""
    from gpt2onnx.runtime import engine as engine_mod

    ids = PROMPTS[0] + PROMPTS[2]  # 18 tokens, an EOS among them
    with torch.no_grad():
        ref = torch.log_softmax(tiny.model(input_ids=torch.tensor([ids])).logits[0].double(), -1).numpy()  # [S, vocab]
    for chunk in (engine_mod.SCORE_CHUNK, 5):
        monkeypatch.setattr(engine_mod, "SCORE_CHUNK", chunk)
        toks = engine.score(ids, top_logprobs=3)
        assert [t.id for t in toks] == ids and [t.index for t in toks] == list(range(len(ids)))
        assert toks[0].logprob is None and toks[0].top_logprobs is None
        got = np.array([t.logprob for t in toks[1:]])
        assert np.abs(got - ref[np.arange(len(ids) - 1), ids[1:]]).max() < FP32_ATOL, chunk
        for p, t in enumerate(toks[1:]):  # the alternatives: the 3 largest, likeliest first, each its own value
            assert np.allclose([lp for _, lp in t.top_logprobs], np.sort(ref[p])[::-1][:3], atol=FP32_ATOL)
            assert np.allclose([ref[p, i] for i, _ in t.top_logprobs], [lp for _, lp in t.top_logprobs], atol=FP32_ATOL)
    assert "".join(t.text for t in toks) == engine.decode(ids)
