"""int8 and int4 weight quantization with onnxruntime's own quantizers.

int8: dynamic quantization of every MatMul weight (activations quantized per call at run time);
onnxruntime fuses each into DynamicQuantizeMatMul on load. int4: weight-only MatMulNBits with
blocked scales, the activations kept in float (or int8 with accuracy_level 4).

The defaults below were chosen by measured accuracy and speed on synthetic:dialogpt-small on the
2-core AVX2 development machine (benchmarks/quant_sweep.py; figures in the issue notes).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from gpt2onnx.runtime.errors import Gpt2OnnxError

INT8_METHODS = ("dynamic", "nbits")


@dataclass(frozen=True)
class Int8Config:
    # dynamic: DynamicQuantizeMatMul, fastest, but its activations share one scale per call, so a
    # row's logits move slightly with its batch-mates. nbits: 8-bit MatMulNBits with activations
    # quantized per row and block, so every request's tokens are independent of its batch (for a
    # server that must give each request what it gets alone); measured on synthetic:dialogpt-small,
    # 2-core AVX2 box: batch-1 decode +15%, batch-16 step +35%, 136-token prompt 2x slower.
    method: str = "dynamic"
    block_size: int = 32  # nbits only: weights per scale along the input dimension
    per_channel: bool = True  # one scale per output column: the weights' ranges differ a lot by column
    # AVX2 without VNNI multiplies u8 x s8 with VPMADDUBSW, whose 16-bit sums saturate on 8-bit
    # weights; 7-bit weights (reduce_range) avoid that.
    reduce_range: bool = True
    exclude: tuple[str, ...] = ()  # node names kept in fp32 (e.g. "lm_head")


@dataclass(frozen=True)
class Int4Config:
    block_size: int = 32  # one scale per 32 weights along the input dimension
    symmetric: bool = True  # no zero points: less to read per block
    # 4 = int8 activations: MLAS's fastest MatMulNBits path on AVX2; 0 keeps fp32 activations
    accuracy_level: int = 4
    exclude: tuple[str, ...] = ()


def quantize_int8(src: str, dst: str, cfg: Int8Config = Int8Config()) -> dict:
    """Quantize the MatMul weights of the model at `src` to int8 into `dst`; returns the manifest entry."""
    import onnx

    if cfg.method not in INT8_METHODS:
        raise Gpt2OnnxError(f"unknown int8 method {cfg.method!r}; choose {' or '.join(INT8_METHODS)}")
    if cfg.method == "nbits":
        _nbits(src, dst, 8, cfg.block_size, True, 4, cfg.exclude)
        return {"method": "onnxruntime MatMulNBits (RTN), int8 activations per row and block", "weight_type": "int8",
                "block_size": cfg.block_size, "exclude": list(cfg.exclude), "batch_invariant": True}
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=cfg.per_channel,
                     reduce_range=cfg.reduce_range, weight_type=QuantType.QInt8,
                     nodes_to_exclude=list(cfg.exclude), use_external_data_format=_big(src),
                     # contrib ops defeat ONNX shape inference; every activation here is fp32
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    entry = {k: v for k, v in asdict(cfg).items() if k != "block_size"}
    return {**entry, "method": "onnxruntime dynamic quantization", "weight_type": "int8", "batch_invariant": False}


def quantize_int4(src: str, dst: str, cfg: Int4Config = Int4Config()) -> dict:
    """Weight-only 4-bit MatMulNBits for every MatMul with a constant weight; returns the manifest entry."""
    if cfg.block_size < 16 or cfg.block_size & (cfg.block_size - 1):
        raise Gpt2OnnxError(f"int4 block size must be a power of two >= 16, got {cfg.block_size}")
    _nbits(src, dst, 4, cfg.block_size, cfg.symmetric, cfg.accuracy_level, cfg.exclude)
    return {"method": "onnxruntime MatMulNBits (RTN)", "weight_type": "int4", **asdict(cfg),
            "batch_invariant": True}  # activations quantized per row and block


def _nbits(src: str, dst: str, bits: int, block_size: int, symmetric: bool, accuracy_level: int, exclude) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(src), bits=bits, block_size=block_size, is_symmetric=symmetric,
                             accuracy_level=accuracy_level, nodes_to_exclude=list(exclude), op_types_to_quantize=("MatMul",))
    q.process()
    q.model.save_model_to_file(dst, use_external_data_format=_big(src))


def _big(path: str) -> bool:
    return os.path.exists(path + ".data")
