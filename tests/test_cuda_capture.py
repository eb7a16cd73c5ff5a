"""The decode graph must be capturable as a CUDA graph: no host<->device copy once onnxruntime's CUDA
provider has placed it. Checked on the CPU with onnxruntime's placement rules (export/placement.py);
the GPU check (benchmarks/gpu.sh) confirms it on a device."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import helper

from gpt2onnx.export.convert import ExportOptions, export
from gpt2onnx.export.placement import predict

from .conftest import QUIET


@pytest.fixture(scope="module")
def cuda_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    return {p: export(ExportOptions("synthetic:tiny", str(root / p), precision=p, provider="cuda"), log=QUIET)
            for p in ("fp16", "fp32", "int4")}


def graph(art: str):
    return onnx.load(os.path.join(art, "model.onnx"), load_external_data=False)


@pytest.mark.parametrize("precision", ["fp16", "fp32", "int4"])
def test_cuda_exports_need_no_copies(cuda_artifacts, precision):
    art = cuda_artifacts[precision]
    p = predict(graph(art))
    assert p.copies == [], [str(c) for c in p.copies]
    # only shape arithmetic stays on the host: what GroupQueryAttention's total_sequence_length and the
    # logits Slice read there, computed from Shape outputs and the host input num_logits_to_keep
    assert {"total_seq_len", "keep_start", "keep_end"} <= set(p.on_cpu)
    assert not {"last_token", "last_hidden_2d", "hidden_and_last"} & set(p.on_cpu)  # the per-row pick stays on the device
    # no attention bias: with one, onnxruntime's CUDA GroupQueryAttention leaves flash attention
    attn = [n for n in graph(art).graph.node if n.op_type == "GroupQueryAttention"]
    assert attn and all(len(n.input) < 11 or not n.input[10] for n in attn)
    assert not {n.name for n in graph(art).graph.node if n.op_type in ("GroupQueryAttention", "MatMul", "MatMulNBits")} & set(p.on_cpu)
    with open(os.path.join(art, "gpt2onnx.json")) as f:
        manifest = json.load(f)
    assert manifest["cuda_graph"] == {"capturable": True, "host_device_copies": [], "nodes_on_cpu": len(p.on_cpu)}
    assert manifest["io"]["kv"]["dtype"] == "float16"  # CUDA's GroupQueryAttention takes float16 only


def test_the_old_logits_slice_is_caught(cuda_artifacts):
    """The graph before this check: Slice starts = Neg(Reshape(num_logits_to_keep)). The graph input is
    not a host tensor to the fallback rule, so Reshape and Neg run on the device and the Slice, which
    reads its starts on the host, needs a copy: onnxruntime refused capture (reports/gpu, 2026-11-25)."""
    m = graph(cuda_artifacts["fp16"])
    nodes = m.graph.node
    at = next(i for i, n in enumerate(nodes) if n.name == "keep_start")
    nodes.remove(nodes[at])
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "shape_1"))
    nodes.insert(at, helper.make_node("Reshape", ["num_logits_to_keep", "shape_1"], ["keep_1d"], name="keep_1d"))
    nodes.insert(at + 1, helper.make_node("Neg", ["keep_1d"], ["keep_start_out0"], name="keep_start"))
    p = predict(m)
    # the input, read on the host by keep_end, now also reaches the device Reshape; the Slice's starts come back
    assert sorted((c.kind, c.tensor, tuple(c.consumers)) for c in p.copies) == [
        ("MemcpyFromHost", "num_logits_to_keep", ("keep_1d",)), ("MemcpyToHost", "keep_start_out0", ("keep_last",))]


def test_a_float32_attention_would_run_on_the_cpu(tmp_path):
    """Why CUDA exports keep a float16 cache under float32 weights: CUDA has no float32
    GroupQueryAttention, so with a float32 cache every layer's attention crosses to the host and back."""
    from gpt2onnx.runtime.artifact import describe, load_manifest

    said: list[str] = []
    art = export(ExportOptions("synthetic:tiny", str(tmp_path / "a"), provider="cuda", kv_dtype="float32"), log=said.append)
    p = predict(graph(art))
    assert {"h0.attn", "h1.attn"} <= set(p.on_cpu)
    assert {c.tensor for c in p.copies} >= {"seqlens_k_out0", "h0.qkv_bias_out0"}
    with open(os.path.join(art, "gpt2onnx.json")) as f:
        assert json.load(f)["cuda_graph"]["capturable"] is False
    # the export says what the float32 cache costs, and info what to export instead
    assert any("cannot be captured as a CUDA graph" in line for line in said), said
    assert "takes a float16 cache, not float32: export without --kv-dtype" in describe(load_manifest(art))


def test_cpu_int8_artifacts_are_not_capturable(tmp_path):
    """onnxruntime has no CUDA kernel for the dynamic int8 ops: the rules must see their copies (a
    predictor that always says yes would pass the tests above)."""
    art = export(ExportOptions("synthetic:tiny", str(tmp_path / "a"), precision="int8"), log=QUIET)
    p = predict(graph(art))
    assert any(c.kind == "MemcpyToHost" for c in p.copies) and any(c.kind == "MemcpyFromHost" for c in p.copies)
