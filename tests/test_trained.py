"""The trained reference model (export/train.py) through the normal export path: the checkpoint it
writes, golden greedy replies, the precision table (benchmarks/accuracy.py) and the scripted chat.

The tests use `trained:chat-tiny` (2 layers x 64, the same data and code as `trained:chat`), whose
weights ship with the package (export/data/chat-tiny/, fp16), so every machine tests the same weights
and the golden replies in tests/data/ hold everywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re

import numpy as np
import pytest

from gpt2onnx.export import checkpoints, parity, train
from gpt2onnx.export.convert import ExportOptions, export
from gpt2onnx.runtime import Engine

from .conftest import QUIET, run_cli

MODEL = "trained:chat-tiny"
GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_chat_tiny.json")


def weights_sha256(model) -> str:
    """A hash of the weights' values (not of a file's layout)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + t.detach().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def chat_tiny():
    return checkpoints.load(MODEL)


@pytest.fixture(scope="session")
def chat_tiny_artifact(tmp_path_factory, chat_tiny):
    return export(ExportOptions(MODEL, str(tmp_path_factory.mktemp("trained") / "chat-tiny")), log=QUIET)


def test_checkpoint_is_an_ordinary_gpt2_directory(chat_tiny):
    path = train.cached("chat-tiny", log=QUIET)
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["model_type"] == "gpt2" and cfg["vocab_size"] == checkpoints.VOCAB_SIZE
    assert cfg["n_ctx"] == cfg["n_positions"] == train.PRESETS["chat-tiny"].n_positions
    assert cfg.get("tie_word_embeddings", True) and cfg["eos_token_id"] == checkpoints.EOS_ID
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "training.json", "heldout.json"):
        assert os.path.isfile(os.path.join(path, name)), name
    assert chat_tiny.source == MODEL and not chat_tiny.synthetic
    assert chat_tiny.tokenizer.token_to_id("<|endoftext|>") == checkpoints.EOS_ID
    assert chat_tiny.tokenizer.get_vocab_size() == checkpoints.VOCAB_SIZE
    record = json.load(open(os.path.join(path, "training.json")))
    assert record["settings"] == dataclasses.asdict(train.PRESETS["chat-tiny"]), \
        "the chat-tiny preset changed since its weights shipped: python -m gpt2onnx.export.train chat-tiny --ship"
    # far below the 50257 of a model that learned nothing (tiny: ~1260; trained:chat: README)
    assert record["heldout_perplexity"] < checkpoints.VOCAB_SIZE / 20 and record["heldout_perplexity_by_epoch"][-1] == pytest.approx(
        record["heldout_perplexity"], rel=1e-3)
    # the shipped fp16 weights score what was recorded when they were shipped, and what training measured
    rows = [train.encode_conversation(chat_tiny.tokenizer, c, checkpoints.EOS_ID)[: cfg["n_positions"]] for c in train.heldout(path)]
    assert len(rows) == record["data"]["heldout_conversations"]
    assert train.perplexity(chat_tiny.model, rows) == pytest.approx(record["shipped"]["heldout_perplexity"], rel=1e-6)
    assert record["shipped"]["heldout_perplexity"] == pytest.approx(record["heldout_perplexity"], rel=1e-3)


def test_shipped_checkpoint_is_small_and_unpacked_once(tmp_path):
    """fp16 weights and an xz tokenizer: the repository carries ~6.8 MB for the test model."""
    src = train._shipped("chat-tiny")
    size = sum(f.stat().st_size for f in pathlib.Path(str(src)).iterdir())
    assert 6e6 < size < 7.5e6, size
    a = train.cached("chat-tiny", str(tmp_path), log=pytest.fail)  # never trains: no log line
    assert train.cached("chat-tiny", str(tmp_path), log=pytest.fail) == a
    assert os.listdir(tmp_path) == [os.path.basename(a)]  # no temporary directories left behind
    assert sorted(os.listdir(a)) == sorted((*train.SHIPPED_FILES, "tokenizer.json", "training.json"))


def test_split_keeps_heldout_openings_out_of_training():
    convs = train.conversations()
    tr, held = train.split(convs, 10)
    assert len(tr) + len(held) == len(convs) and 0.05 < len(held) / len(convs) < 0.2
    key = lambda c: c[0].lower().strip(" ?!.")  # noqa: E731
    assert not {key(c) for c in tr} & {key(c) for c in held}
    assert train.split(convs, 10) == (tr, held)  # deterministic
    assert train.data_key(train.PRESETS["chat"]) != train.data_key(train.PRESETS["chat-tiny"])


def test_export_holds_the_trained_tolerances(chat_tiny_artifact):
    m = Engine.load(chat_tiny_artifact, provider="cpu").manifest.raw
    assert m["source"]["checkpoint"] == MODEL
    assert m["accuracy"]["tolerances"] == parity.TOLERANCES["fp32"]
    chat = parity.TRAINED_TOLERANCES["trained:chat"]
    assert parity.tolerances("fp32", "int8", "trained:chat") is chat["fp32+int8kv"]
    assert parity.tolerances("int4", "int8", "trained:chat")["top1_agreement"] > parity.TOLERANCES["int4"]["top1_agreement"]
    assert parity.tolerances("int4", "int8", MODEL) is parity.TOLERANCES["int4"]  # the tiny variant: the general ones
    for precision, tol in chat.items():  # tighter or equal everywhere but |Δlogit| (trained logits are larger)
        assert tol["top1_agreement"] >= parity.TOLERANCES[precision]["top1_agreement"]


def test_golden_replies(chat_tiny, chat_tiny_artifact):
    """The fp32 artifact's greedy replies to a few prompts: equal to PyTorch greedy here, and to the
    token ids recorded for the shipped weights (catches drift in export, graph or runtime). The
    weights ship (export/train.py: SHIPPED), so this asserts on every machine; after shipping new
    weights, re-record with `python -m tests.test_trained`."""
    from gpt2onnx.benchmarks.accuracy import reference_replies

    golden = json.load(open(GOLDEN))
    assert golden["weights_sha256"] == weights_sha256(chat_tiny.model), \
        "the shipped chat-tiny weights are not the ones the goldens were recorded for; re-record: python -m tests.test_trained"
    engine = Engine.load(chat_tiny_artifact, provider="cpu")
    prompts = [g["prompt_ids"] for g in golden["prompts"]]
    assert prompts == [engine.encode(g["prompt"]) + [engine.eos_token_id] for g in golden["prompts"]]
    ours = [engine.generate([p], max_new_tokens=golden["max_new_tokens"])[0] for p in prompts]
    assert ours == golden["reply_ids"]
    assert ours == reference_replies(chat_tiny.model, prompts, golden["max_new_tokens"])
    assert len({tuple(r) for r in ours}) > 1 and all(len(r) >= 4 for r in ours)  # the goldens say something


def test_precision_table(tmp_path, chat_tiny):
    """Every precision through the normal export path, on a few held-out conversations."""
    from gpt2onnx.benchmarks import accuracy

    doc = accuracy.measure(MODEL, str(tmp_path / "rep"), str(tmp_path / "art"), log=QUIET, limit=12, llamacpp=False)
    rows = {r["variant"]: r for r in doc["rows"]}
    assert list(rows) == [v[0] for v in accuracy.VARIANTS]
    assert rows["fp32"]["greedy_agreement"] == 1.0 and rows["fp32"]["mean_kl"] < 1e-8
    assert rows["fp32"]["first_divergence_median"] is None
    assert rows["int8"]["kv_dtype"] == rows["int4"]["kv_dtype"] == rows["fp32 + int8 KV"]["kv_dtype"] == "int8"
    assert rows["int4 + fp16 KV"]["kv_dtype"] == "float16" and rows["int8 nbits"]["kv_dtype"] == "int8"
    # activations quantized per row and 32-block, not one scale per call: the nearer int8
    assert rows["int8 nbits"]["mean_kl"] < rows["int8"]["mean_kl"]
    for r in rows.values():
        assert r["prompts"] == doc["heldout"]["prompts"] <= 12 and r["tokens"] > 100
        assert 0 <= r["greedy_agreement"] <= 1 and 0.5 < r["top1_agreement"] <= 1
        assert r["perplexity_pytorch"] == pytest.approx(rows["fp32"]["perplexity_pytorch"])
    assert rows["int4"]["mean_kl"] > rows["int8"]["mean_kl"] > rows["fp32"]["mean_kl"]
    assert rows["int4 + 4-bit head"]["mean_kl"] > rows["int4"]["mean_kl"]  # the default's 8-bit head is the nearer
    saved = json.loads((tmp_path / "rep" / "accuracy.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(doc["rows"]))
    md = (tmp_path / "rep" / "accuracy.md").read_text()
    assert "| trained:chat-tiny | int4 | int8 |" in md
    assert (tmp_path / "rep" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"

    from gpt2onnx.benchmarks.report import _accuracy_section

    section = "\n".join(_accuracy_section([], saved))
    assert "**Trained weights** (trained:chat-tiny" in section and "| trained:chat-tiny | fp16 |" in section


def test_precision_table_llamacpp_rows(tmp_path, chat_tiny):
    """llama.cpp's conversions of the trained checkpoint, measured the way ours are: F32 follows PyTorch
    (KL near 0, greedy replies equal), the quantized ones drift more the fewer bits they keep."""
    from gpt2onnx.benchmarks import accuracy
    from gpt2onnx.benchmarks.engines import llamacpp
    from gpt2onnx.export import train

    why = llamacpp.missing()
    if why:
        pytest.skip(f"llama.cpp is not built here: {why}")
    path = train.cached(MODEL.split(":", 1)[1], log=QUIET)
    rows = accuracy.heldout_rows(chat_tiny, train.heldout(path)[:4])
    prompts = [ids[:p] for p, ids in rows]
    ref = accuracy.reference_replies(chat_tiny.model, prompts)
    got = {r["variant"]: r for r in accuracy.llamacpp_rows(MODEL, path, str(tmp_path), rows, prompts, ref,
                                                                 accuracy.reference_logits(chat_tiny.model, rows),
                                                                 chat_tiny.model.config.eos_token_id, log=QUIET)}
    assert list(got) == ["llama.cpp F32", "llama.cpp Q8_0", "llama.cpp Q4_0"]
    assert got["llama.cpp F32"]["mean_kl"] < 1e-4 and got["llama.cpp F32"]["top1_agreement"] > 0.99
    assert got["llama.cpp Q4_0"]["mean_kl"] > got["llama.cpp Q8_0"]["mean_kl"] > got["llama.cpp F32"]["mean_kl"]
    for r in got.values():
        assert r["tokens"] == sum(len(ids) - 1 for _, ids in rows) and r["kv_dtype"] == "float16"
        assert r["prompts"] == len(prompts) and 0 <= r["greedy_agreement"] <= 1


def test_reply_agreement_counts_first_divergence():
    from gpt2onnx.benchmarks.accuracy import reply_agreement

    r = reply_agreement([[1, 2, 3], [1, 2, 9], [5], [1, 2]], [[1, 2, 3], [1, 2, 3], [4], [1, 2, 3]])
    assert r["greedy_agreement"] == 0.25 and r["diverged"] == 3
    assert r["first_divergence_median"] == 2 and r["first_divergence_mean"] == pytest.approx(4 / 3)


def test_scripted_chat_prints_turns_and_timings(chat_tiny_artifact):
    r = run_cli("chat", chat_tiny_artifact, "--say", "Hello", "--say", "What is your name?", "--max-new-tokens", "8",
                "--timing")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "> Hello" and "> What is your name?" in lines and len(lines) == 4
    assert r.stderr.count("timing:") == 2 and "synthetic" not in r.stderr
    # the second turn ran only its own tokens: the first turn's are reused from the cache
    reused = [int(n) for n in re.findall(r"\((\d+) reused from the cache\)", r.stderr)]
    engine = Engine.load(chat_tiny_artifact, provider="cpu")
    chat = engine.chat(max_new_tokens=8)
    assert lines[1::2] == [chat.send("Hello"), chat.send("What is your name?")]
    assert reused == [0, engine.stats.cached_tokens] and reused[1] >= 2  # at least "Hello" + EOS


def record_golden(prompts=("Hello", "How are you?", "Tell me a joke.", "What is AI?", "Do you like music?"),
                  max_new_tokens: int = 16) -> None:
    """Write the goldens for the shipped chat-tiny (run: python -m tests.test_trained): PyTorch greedy
    replies, which test_golden_replies also requires of the exported model."""
    import tempfile

    from gpt2onnx.benchmarks.accuracy import reference_replies

    ckpt = checkpoints.load(MODEL)
    ids = [ckpt.tokenizer.encode(p).ids + [checkpoints.EOS_ID] for p in prompts]
    replies = reference_replies(ckpt.model, ids, max_new_tokens)
    doc = {"model": MODEL, "weights_sha256": weights_sha256(ckpt.model), "max_new_tokens": max_new_tokens,
           "prompts": [{"prompt": p, "prompt_ids": i} for p, i in zip(prompts, ids)],
           "reply_ids": replies, "replies": [ckpt.tokenizer.decode(r) for r in replies]}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(GOLDEN), suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, GOLDEN)  # never a half-written golden file
    print(json.dumps(doc["replies"], ensure_ascii=False))


if __name__ == "__main__":
    np.set_printoptions(linewidth=200)
    record_golden()
