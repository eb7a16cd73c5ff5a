"""Fusion counts per layer, and fp16 / int8 / int4 artifacts: tolerances, generation, bad combinations."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2onnx.export import checkpoints, parity
from gpt2onnx.export.convert import ExportOptions, export
from gpt2onnx.runtime import Engine, Gpt2OnnxError, load_manifest

from .conftest import PROMPTS, QUIET, extended_vs_fresh, prefilled


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, tiny_artifact):
    made = {"fp32": tiny_artifact}

    def get(precision: str) -> str:
        if precision not in made:
            out = tmp_path_factory.mktemp("prec") / precision
            made[precision] = export(ExportOptions("synthetic:tiny", str(out), precision=precision), log=QUIET)
        return made[precision]

    return get


def test_fused_operator_counts_per_layer(engine, tiny_plain_artifact):
    L = engine.spec.n_layer
    ops = engine.manifest.raw["fused_ops"]
    assert ops["GroupQueryAttention"] == L
    assert ops["SkipLayerNormalization"] == 2 * L + 1  # ln_1, ln_2 per layer (with their residual adds) and ln_f
    assert ops["FastGelu"] == L
    assert ops["MatMul"] == 4 * L + 1  # qkv, attention out, fc, proj per layer; LM head
    assert "LayerNormalization" not in ops
    plain = load_manifest(tiny_plain_artifact).raw["fused_ops"]
    assert not {"GroupQueryAttention", "SkipLayerNormalization", "FastGelu"} & set(plain)
    assert plain["LayerNormalization"] == 2 * L + 1


@pytest.mark.parametrize("precision, op", [("int8", "DynamicQuantizeMatMul"), ("int4", "MatMulNBits")])
def test_quantized_operator_counts(artifacts, precision, op):
    m = Engine.load(artifacts(precision), provider="cpu").manifest.raw
    L = m["config"]["n_layer"]
    ops = m["runtime_ops"]
    # int8: the layers' matrices dynamic, the head 8-bit MatMulNBits (the layout the embedding shares)
    assert ops.get(op) == 4 * L + (op == "MatMulNBits"), ops
    assert ops.get("MatMulNBits") == (1 if precision == "int8" else 4 * L + 1)
    assert ops["GroupQueryAttention"] == L and ops["GatherBlockQuantized"] == 1
    assert m["quantization"]["weight_type"] == precision


@pytest.mark.parametrize("precision, bits", [("int8", 8), ("int4", 8)])
def test_embedding_is_quantized_and_shared_with_the_tied_head(artifacts, precision, bits):
    """One quantized table serves the token embedding and the LM head: no float wte left (8-bit blocks
    at int4 too: the head's default width)."""
    import os

    import onnx

    m = onnx.load(os.path.join(artifacts(precision), "model.onnx"), load_external_data=False)
    assert "wte" not in {t.name for t in m.graph.initializer}
    gather = next(n for n in m.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in m.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("lm_head"))
    assert gather.input[0] == head.input[1]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gather.attribute}["bits"] == bits
    assert "shared with the LM head" in Engine.load(artifacts(precision), provider="cpu").manifest.raw["quantization"]["embedding"]


@pytest.mark.parametrize("bits", [4, 8])
def test_untied_embedding_is_quantized_on_its_own(tmp_path, tiny_artifact, bits):
    """A head that is not the embedding transposed keeps its own weight; wte becomes its own
    `bits`-bit table, whose gathered rows equal the table dequantized (the nibble order included)."""
    import os

    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from gpt2onnx.export import quantize

    m = onnx.load(os.path.join(tiny_artifact, "model.onnx"))
    head = next(t for t in m.graph.initializer if t.name == "lm_head.w")
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * 0.5, "lm_head.w"))
    wte = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "wte"))
    src = str(tmp_path / "float.onnx")
    onnx.save(m, src)
    q, entry = (quantize.quantize_int4(src, quantize.Int4Config(head_bits=4)) if bits == 4 else quantize.quantize_int8(src))
    block = min(quantize.Int4Config().block_size if bits == 4 else quantize.Int8Config().head_block_size, wte.shape[1])
    assert entry["embedding"] == f"int{bits} blocks of {block}"
    inits = {t.name: t for t in q.graph.initializer}
    assert "wte" not in inits and "wte_q" in inits
    # run the three embedding nodes alone
    nodes = [n for n in q.graph.node if n.name in ("tok_emb_scales3", "tok_emb", "tok_emb_out")]
    need = {i for n in nodes for i in n.input} - {o for n in nodes for o in n.output} - {"input_ids"}
    g = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, None])],
                          [helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.FLOAT, None)],
                          [inits[n] for n in need])
    sess = ort.InferenceSession(helper.make_model(g, opset_imports=q.opset_import).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    ids = np.array([[0, 7, wte.shape[0] - 1]], np.int64)
    got = sess.run(None, {"input_ids": ids})[0][0]  # [3, H]
    scale = numpy_helper.to_array(inits["wte_scales"])[ids[0]]  # [3, H/block]
    err = np.abs(got - wte[ids[0]]).reshape(3, -1, block).max(-1)
    assert (err <= scale / 2 + 1e-6).all()  # round to nearest: within half a step per block
    assert np.abs(got).max() > 0


@pytest.mark.filterwarnings("ignore:fp16 on the CPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int4"])
def test_accuracy_within_written_tolerances(artifacts, tiny, precision):
    """Recompute the teacher-forced figures independently of the export and hold them to the tolerances."""
    engine = Engine.load(artifacts(precision), provider="cpu")
    recorded = engine.manifest.raw["accuracy"]["teacher_forced"]
    text = tiny.tokenizer.encode(checkpoints.sample_text()).ids
    from gpt2onnx.export.graph import model_config

    cfg = model_config(tiny.model.config)
    figs = parity.teacher_forced(parity.ort_session(engine.manifest.file("model.onnx")), parity.teacher_references(tiny.model, cfg, text), cfg)
    tol = parity.TOLERANCES[precision]
    assert figs["tokens"] >= 256
    assert figs["mean_kl"] <= tol["mean_kl"] and figs["top1_agreement"] >= tol["top1_agreement"]
    assert figs["mean_kl"] == pytest.approx(recorded["mean_kl"], rel=1e-3, abs=1e-12)
    for key in ("max_abs_logit_diff", "mean_kl", "top1_agreement", "perplexity_change_pct"):
        assert key in recorded
    # ordering that must hold for honest figures: more bits, closer to PyTorch
    if precision != "fp32":
        fp32 = Engine.load(artifacts("fp32"), provider="cpu").manifest.raw["accuracy"]["teacher_forced"]
        assert figs["mean_kl"] > fp32["mean_kl"]


def test_tolerance_check_fails_out_of_bounds_and_nan():
    """parity.check against the written tolerances: in bounds passes; past a bound, or NaN in any figure (a
    graph giving NaN logits somewhere), names what failed; a NaN compares false both ways, so a check written
    as 'x > tol' would let it through."""
    tol = parity.TOLERANCES["fp32"]
    ok_decode, ok_acc = {"max_abs_logit_diff": 1e-6}, {"mean_kl": 1e-12, "top1_agreement": 1.0}
    assert parity.check("fp32", ok_decode, ok_acc) is None
    nan = float("nan")
    assert "max |Δlogit| nan exceeds" in parity.check("fp32", {"max_abs_logit_diff": nan}, ok_acc)
    past = 10 * tol["max_abs_logit_diff"]
    assert f"max |Δlogit| {past:.3g} exceeds the fp32 tolerance" in parity.check("fp32", {"max_abs_logit_diff": past}, ok_acc)
    assert "mean KL nan exceeds" in parity.check("fp32", ok_decode, {**ok_acc, "mean_kl": nan})
    assert "top-1 agreement nan is below" in parity.check("fp32", ok_decode, {**ok_acc, "top1_agreement": nan})
    assert "top-1 agreement 0.500 is below" in parity.check("fp32", ok_decode, {**ok_acc, "top1_agreement": 0.5})


def test_a_failed_parity_says_where(tiny_artifact):
    """decode_parity names the pass and row of its largest difference, and the failure message carries it:
    a PyTorch model whose embedding of one token moved (only the decode step that feeds that token sees it)
    differs at that step, not at the prompt pass, in the row fed it."""
    import copy

    import torch

    from gpt2onnx.export.convert import _parity_prompts
    from gpt2onnx.export.graph import model_config

    tiny = checkpoints.load("synthetic:tiny")
    cfg = model_config(tiny.model.config)
    rows = _parity_prompts([i for i in tiny.tokenizer.encode(checkpoints.sample_text()).ids if i < cfg.vocab_size], cfg)
    session = parity.ort_session(load_manifest(tiny_artifact).file("model.onnx"))
    good = parity.decode_parity(session, parity.decode_reference(tiny.model, cfg, rows), cfg)
    assert good["max_abs_logit_diff"] <= parity.TOLERANCES["fp32"]["max_abs_logit_diff"] and good["worst_at"].endswith(" of 2")
    moved = copy.deepcopy(tiny.model)
    with torch.no_grad():
        logits = tiny.model(input_ids=torch.tensor([rows[1]])).logits[0, -1]
        token = int(logits.argmax())  # row 1's first greedy token: fed to it at decode step 1 only
        assert token not in rows[0] + rows[1]
        moved.lm_head.weight = torch.nn.Parameter(tiny.model.lm_head.weight.detach().clone())  # untied: logits stay
        moved.transformer.wte.weight[token] += torch.linspace(-1, 1, cfg.n_embd)
    bad = parity.decode_parity(session, parity.decode_reference(moved, cfg, rows), cfg)
    assert bad["max_abs_logit_diff"] > 1e-2 and bad["worst_at"] == "decode step 1, row 1 of 2"
    msg = parity.check("fp32", bad, {"mean_kl": 0.0, "top1_agreement": 1.0})
    assert msg.startswith("max |Δlogit| ") and "(at decode step 1, row 1 of 2) exceeds the fp32 tolerance" in msg


@pytest.mark.filterwarnings("ignore:fp16 on the CPU")
@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_generation_and_batches_work(artifacts, precision):
    engine = Engine.load(artifacts(precision), provider="cpu")
    batched = engine.generate(PROMPTS, max_new_tokens=8)
    assert [len(r) for r in batched] == [8, 8, 8]
    assert batched == [engine.generate([p], max_new_tokens=8)[0] for p in PROMPTS]


def test_int8_batches_within_tolerance(artifacts):
    """Dynamic int8 quantizes activations with one scale per call, so a row's numbers depend on its
    batch mates (padding included): batched logits match one-by-one logits within the int8 tolerance,
    not bit for bit."""
    engine = Engine.load(artifacts("int8"), provider="cpu")
    assert [len(r) for r in engine.generate(PROMPTS, max_new_tokens=8)] == [8, 8, 8]
    batched = prefilled(engine, PROMPTS, 4)[1].copy()
    single = np.concatenate([prefilled(engine, [p], 4)[1] for p in PROMPTS])
    diff = np.abs(batched - single).max()
    assert 0 < diff <= parity.TOLERANCES["int8"]["max_abs_logit_diff"]
    assert (batched.argmax(-1) == single.argmax(-1)).mean() >= 2 / 3


@pytest.mark.filterwarnings("ignore:fp16 on the CPU")
def test_fp16_finite_over_full_context(artifacts):
    engine = Engine.load(artifacts("fp16"), provider="cpu")
    assert engine.spec.kv_dtype == np.float16
    dec, logits = prefilled(engine, [list(range(100, 108)), list(range(200, 204))], engine.n_positions - 8)
    for _ in range(engine.n_positions - 9):  # to the last position of the table
        assert np.isfinite(logits).all()
        logits = dec.decode(logits.argmax(-1))
    assert np.isfinite(logits).all() and dec.held[1] + 4 == dec.held[0] == engine.n_positions - 1  # rows end at their own lengths


def test_int8_on_cuda_is_refused_with_advice(tmp_path):
    with pytest.raises(Gpt2OnnxError, match="use --precision int4 or fp16 for cuda"):
        export(ExportOptions("synthetic:tiny", str(tmp_path / "x"), precision="int8", provider="cuda"), log=QUIET)
    assert not (tmp_path / "x").exists()


def test_fp16_on_cpu_warns(artifacts):
    with pytest.warns(UserWarning, match="fp16 on the CPU provider is no faster"):
        Engine.load(artifacts("fp16"), provider="cpu")


def test_fp16_kv_cache_under_int8_weights(tmp_path, tiny):
    """A float16 cache under fp32 activations: half the cache bytes, same tokens as fp32 cache mostly."""
    art = export(ExportOptions("synthetic:tiny", str(tmp_path / "a"), precision="int8", kv_dtype="float16"), log=QUIET)
    engine = Engine.load(art, provider="cpu")
    assert engine.spec.kv_dtype == np.float16 and engine.manifest.raw["io"]["kv"]["dtype"] == "float16"
    dec, _ = prefilled(engine, PROMPTS, 4)
    assert dec.kv_arrays()[0].dtype == np.float16
    acc = engine.manifest.raw["accuracy"]["teacher_forced"]
    assert acc["mean_kl"] <= parity.TOLERANCES["int8"]["mean_kl"]
    assert [len(r) for r in engine.generate(PROMPTS, max_new_tokens=6)] == [6, 6, 6]


def test_int8_kv_cache_is_the_cpu_default(artifacts):
    """int8 and int4 artifacts keep an int8 KV cache (calibrated per-layer scales), written in place;
    fp32 keeps an exact fp32 cache."""
    for precision in ("int8", "int4"):
        engine = Engine.load(artifacts(precision), provider="cpu")
        kv = engine.manifest.raw["io"]["kv"]
        assert kv["dtype"] == "int8" and "calibrated" in kv["quantization"]
        dec, logits = prefilled(engine, PROMPTS, 4)
        k0 = dec.kv_arrays()[0]
        assert k0.dtype == np.int8 and np.abs(k0[:, :, : max(map(len, PROMPTS))].astype(int)).max() > 10  # real values, not zeros
        assert np.isfinite(dec.decode(logits.argmax(-1))).all()
    assert Engine.load(artifacts("fp32"), provider="cpu").manifest.raw["io"]["kv"]["dtype"] == "float32"


def test_kv_dtype_refused_where_it_cannot_work(tmp_path):
    with pytest.raises(Gpt2OnnxError, match="drop --no-fuse"):
        export(ExportOptions("synthetic:tiny", str(tmp_path / "a"), kv_dtype="int8", fuse=False), log=QUIET)
    with pytest.raises(Gpt2OnnxError, match="choose one of float32, float16, int8"):
        export(ExportOptions("synthetic:tiny", str(tmp_path / "b"), kv_dtype="int4"), log=QUIET)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_prompt_cache_with_an_int8_kv_cache(artifacts, precision):
    """Extending a quantized cache: logits within the precision's tolerance of a fresh prompt pass
    (not equal for int8, whose activation scales depend on which tokens share a call)."""
    engine = Engine.load(artifacts(precision), provider="cpu")
    assert engine.spec.kv_dtype == np.int8
    assert extended_vs_fresh(engine) <= parity.TOLERANCES[precision]["max_abs_logit_diff"]


def _float_model(tmp_path, tiny_artifact) -> str:
    """The tiny fp32 artifact's graph saved on its own under `tmp_path`, for the quantizers to read."""
    import os

    import onnx

    src = str(tmp_path / "float.onnx")
    onnx.save(onnx.load(os.path.join(tiny_artifact, "model.onnx")), src)
    return src


def test_checkpoint_directory_without_tokenizer_files_is_refused(tmp_path, tiny):
    import os

    path = str(tmp_path / "ck")
    checkpoints.save_hf_checkpoint(tiny, path)
    for f in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        if os.path.exists(os.path.join(path, f)):
            os.remove(os.path.join(path, f))
    with pytest.raises(Gpt2OnnxError, match=r"has no tokenizer files \(tokenizer\.json, or vocab\.json and merges\.txt\); "
                                            r"save the checkpoint's tokenizer there"):
        checkpoints.load(path)


def _unreachable_hub(monkeypatch, tmp_path) -> None:
    """HF_ENDPOINT on a closed local port (connections refused, as with no network) and an empty hub
    cache under `tmp_path`, for the CLI processes this test starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


def test_unreachable_hub_fails_at_once_in_one_line(monkeypatch, tmp_path):
    """A name that is neither a local directory nor reachable on the hub: one line, no huggingface_hub
    retries (five per file with backoff, a warning each, before the fix)."""
    from .conftest import assert_one_line_error, run_cli

    _unreachable_hub(monkeypatch, tmp_path)
    r = run_cli("export", "my-gpt2-checkpoint", "-o", str(tmp_path / "x"), timeout=180)
    assert_one_line_error(r, "no such local directory 'my-gpt2-checkpoint', and the hub is unreachable (cannot connect to ")
    assert "Retrying" not in r.stdout + r.stderr
    with pytest.raises(Gpt2OnnxError, match=r"^no such local directory '\./no-such-checkpoint'; pass a checkpoint"):
        checkpoints.load("./no-such-checkpoint")


def test_hub_checkpoint_in_the_cache_exports_quietly_while_the_hub_is_unreachable(monkeypatch, tmp_path, tiny):
    """A hub id already in the local hub cache still exports with the hub unreachable, and an int8
    export of a Hugging Face checkpoint prints no library noise: neither transformers' `torch_dtype`
    deprecation nor onnxruntime's pre-processing hint."""
    from .conftest import run_cli

    _unreachable_hub(monkeypatch, tmp_path)
    repo = tmp_path / "hub" / "models--org--tiny"  # huggingface_hub's cache layout
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    checkpoints.save_hf_checkpoint(tiny, str(repo / "snapshots" / ("0" * 40)))
    r = run_cli("export", "org/tiny", "-o", str(tmp_path / "a"), "--precision", "int8", timeout=300)
    assert r.returncode == 0, r.stderr
    assert load_manifest(str(tmp_path / "a")).raw["source"]["checkpoint"] == "org/tiny"
    out = r.stdout + r.stderr
    for noise in ("torch_dtype", "pre-processing", "Retrying", "WARNING"):
        assert noise not in out, out


def test_int8_quantization_drops_only_the_preprocessing_hint(tmp_path, tiny_artifact, caplog):
    """onnxruntime's hint is dropped inside the quantize call only: the root logger's filters and
    handlers are as they were after it, and other warnings still pass."""
    import logging

    from gpt2onnx.export import quantize

    src = _float_model(tmp_path, tiny_artifact)
    root = logging.getLogger()
    with caplog.at_level(logging.WARNING):
        before = (list(root.filters), list(root.handlers))
        quantize.quantize_int8(src)
        assert (list(root.filters), list(root.handlers)) == before
        logging.getLogger("onnxruntime.quantization").warning("still shown")
    messages = [r.getMessage() for r in caplog.records]
    assert "still shown" in messages
    assert not [m for m in messages if "pre-processing" in m], messages


@pytest.mark.parametrize("bits", [8, 4])
def test_keep_float_names_must_be_weight_matmuls(tmp_path, tiny_artifact, bits):
    """A mistyped --keep-float name is refused with the valid names (the head first), not recorded as kept
    while everything is quantized; a real name stays a float MatMul."""
    from gpt2onnx.export import quantize

    src = _float_model(tmp_path, tiny_artifact)
    q, cfg = (quantize.quantize_int8, quantize.Int8Config) if bits == 8 else (quantize.quantize_int4, quantize.Int4Config)
    with pytest.raises(Gpt2OnnxError, match=r"^cannot keep 'lm_haed' in float: no MatMul with a weight has that name; "
                                            r"choose among lm_head, h0\.qkv, h0\.attn_proj, h0\.fc, h0\.mlp_proj, \.\.\. \(9 in all\)$"):
        q(src, cfg(exclude=("lm_haed",)))
    model, entry = q(src, cfg(exclude=("lm_head",)))
    assert [n.op_type for n in model.graph.node if n.name == "lm_head"] == ["MatMul"]
    assert list(entry["exclude"]) == ["lm_head"]


def test_int4_accuracy_level_outside_matmulnbits_set_is_refused(tmp_path, tiny_artifact):
    from gpt2onnx.export import quantize

    src = _float_model(tmp_path, tiny_artifact)
    with pytest.raises(Gpt2OnnxError, match=r"^int4 accuracy level must be 0 or 1 \(fp32 activations\), .* got 99$"):
        quantize.quantize_int4(src, quantize.Int4Config(accuracy_level=99))
    for level in (0, 1, 2, 3, 4):  # MatMulNBits' schema: unset, fp32, fp16, bf16, int8
        quantize.Int4Config(accuracy_level=level).check()


def test_int4_head_bits_4_narrows_the_head_and_embedding(tmp_path, artifacts):
    """int4's LM head is 8-bit by default (blocks shared with the embedding, as int8 keeps it);
    --int4-head-bits 4 makes every MatMul and the embedding 4-bit, held to its own wider tolerances,
    and the default is the nearer to PyTorch. The manifest says which."""
    import os

    import onnx
    from onnx import helper

    from gpt2onnx.export import quantize
    from gpt2onnx.export.graph import LM_HEAD

    def head_and_rest(art):
        bits = {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute}["bits"]
                for n in onnx.load(os.path.join(art, "model.onnx"), load_external_data=False).graph.node
                if n.op_type == "MatMulNBits"}
        head = [b for n, b in bits.items() if n.startswith(LM_HEAD)]
        return head, {b for n, b in bits.items() if not n.startswith(LM_HEAD)}

    wide = load_manifest(artifacts("int4")).raw
    assert wide["quantization"]["head_bits"] == 8 and wide["quantization"]["lm_head"].startswith("MatMulNBits 8-bit")
    assert wide["quantization"]["embedding"].startswith("int8 blocks of") and head_and_rest(artifacts("int4")) == ([8], {4})
    assert wide["accuracy"]["tolerances"] == parity.TOLERANCES["int4"]
    art = export(ExportOptions("synthetic:tiny", str(tmp_path / "a"), precision="int4", int4=quantize.Int4Config(head_bits=4)),
                 log=QUIET)
    m = load_manifest(art).raw
    q = m["quantization"]
    assert q["head_bits"] == 4 and "lm_head" not in q and q["embedding"].startswith("int4 blocks of")
    assert "shared with the LM head" in q["embedding"] and head_and_rest(art) == ([4], {4})
    assert m["accuracy"]["tolerances"] == parity.TOLERANCES["int4-head4"] != parity.TOLERANCES["int4"]
    assert wide["accuracy"]["teacher_forced"]["mean_kl"] < m["accuracy"]["teacher_forced"]["mean_kl"]
    with pytest.raises(Gpt2OnnxError, match="int4 head bits must be 4 or 8, got 6"):
        quantize.Int4Config(head_bits=6).check()


MEMORY_PROBE = """
import functools, sys
from gpt2onnx.export import checkpoints, convert, graph
def vm(k):
    return next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith(k))
ck = checkpoints.load("synthetic:dialogpt-small")
cfg = graph.model_config(ck.model.config)
w = graph.weights(ck.model, cfg)
size, base = sum(a.nbytes for a in w.values()), vm("VmRSS")
if vm("VmHWM") > base + (64 << 20):  # a high-water mark from before: read nothing into it
    base = vm("VmHWM")
if sys.argv[2] == "model":  # a graph holding its weights, saved (a quantizer's output is written so)
    convert._save_onnx(graph.build(cfg, w, dtype=sys.argv[3]), sys.argv[1])
else:  # the export's way: each weight into the data file as the graph takes it
    convert._write_graph(functools.partial(graph.build, cfg, w, dtype=sys.argv[3]), sys.argv[1])
print((vm("VmHWM") - base) / size)
"""


@pytest.mark.parametrize("how, dtype, bound", [("streamed", "float32", 0.1), ("streamed", "float16", 0.3),
                                               ("model", "float32", 1.7)])
def test_the_float_graph_is_built_and_written_holding_no_copy_of_the_weights(tmp_path, how, dtype, bound):
    """The export writes each weight into the data file as the graph takes it, so building and writing
    the graph costs next to nothing beyond the checkpoint's tensors: measured 0.01x of them at fp32 and
    0.13x at fp16 (its casts, one tensor at a time), against 1.26x when the built model held its
    weights until it was saved (DialoGPT-large fp32's export peaked at 7.6 GB for 3.3 GB of weights)
    and 3.0x before that (tensors built apart and handed to make_graph, and raw bytes assigned back
    before external data, each left a copy protobuf kept until the model was freed). A model that holds
    its weights (a quantizer's output) is still saved without a second copy. A fresh process, so the
    high-water mark is this alone."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "model.onnx"), how, dtype],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ratio = float(r.stdout.split()[-1])
    assert ratio < bound, f"building and writing the {dtype} graph ({how}) peaked at {ratio:.2f}x its weights"


def test_int8_quantizer_reads_the_float_weights_from_the_file(tmp_path, tiny_artifact, monkeypatch):
    """onnxruntime's dynamic quantizer loads its own copy of the float model: handed the path, not a
    loaded ModelProto, so the export does not hold a second float copy beside it (medium 8.6 -> 7.0 GB)."""
    import onnxruntime.quantization as q

    seen = []
    real = q.quantize_dynamic
    monkeypatch.setattr(q, "quantize_dynamic", lambda model, *a, **k: (seen.append(model), real(model, *a, **k))[1])
    export(ExportOptions("synthetic:tiny", str(tmp_path / "q"), precision="int8"), log=QUIET)
    assert len(seen) == 1 and isinstance(seen[0], str), seen


def test_the_fp16_on_cpu_warning_names_the_line_that_loads(artifacts):
    """It named the caller's caller (stacklevel one too many), so a filter by module matched the wrong one."""
    import inspect
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        Engine.load(artifacts("fp16"), provider="cpu")
    hits = [w for w in caught if "fp16 on the CPU" in str(w.message)]
    assert hits and hits[0].filename == __file__ and hits[0].lineno == line, [(w.filename, w.lineno) for w in caught]
