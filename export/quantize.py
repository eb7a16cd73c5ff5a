"""int8 and int4 weight quantization with onnxruntime's own quantizers.

int8: dynamic quantization of every MatMul weight (activations quantized per call at run time);
onnxruntime fuses each into DynamicQuantizeMatMul on load. int4: weight-only MatMulNBits with
blocked scales, the activations kept in float (or int8 with accuracy_level 4).

The defaults below were chosen by measured accuracy and speed on synthetic:dialogpt-small on the
2-core AVX2 development machine (benchmarks/quant_sweep.py; figures in the issue notes), int4's head
width by the trained model's held-out accuracy beside llama.cpp's (benchmarks/accuracy.py).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass

import numpy as np

from gpt2onnx.export.graph import LM_HEAD, MS_DOMAIN, TOKEN_EMBEDDING
from gpt2onnx.runtime.errors import Gpt2OnnxError

INT8_METHODS = ("dynamic", "nbits")
# MatMulNBits' accuracy_level (the contrib op's schema in onnxruntime): the least precise type the
# activations may be converted to: 0 unset (fp32), 1 fp32, 2 fp16, 3 bf16, 4 int8
INT4_ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# what onnxruntime's quantize_dynamic logs through the root logger on every model not run through its
# shape-inference pre-processing (ours has every shape it needs: MatMulConstBOnly, fp32 activations)
_PREPROCESS_HINT = "Please consider to run pre-processing before quantization"


INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)  # onnxruntime's blockwise quantizer refuses others (MLAS q4_dq.cpp)


@dataclass(frozen=True)
class Int8Config:
    # dynamic: DynamicQuantizeMatMul, fastest, but its activations share one scale per call, so a
    # row's logits move slightly with its batch-mates. nbits: 8-bit MatMulNBits with activations
    # quantized per row and block, so every request's tokens are independent of its batch (for a
    # server that must give each request what it gets alone); measured on synthetic:dialogpt-small,
    # 2-core AVX2 box: batch-1 decode +15%, batch-16 step +35%, 136-token prompt 2x slower.
    method: str = "dynamic"
    block_size: int = 32  # nbits, and the head shared with the embedding: weights per scale along the input
    per_channel: bool = True  # one scale per output column: the weights' ranges differ a lot by column
    # AVX2 without VNNI multiplies u8 x s8 with VPMADDUBSW, whose 16-bit sums saturate on 8-bit
    # weights; 7-bit weights (reduce_range) avoid that.
    reduce_range: bool = True
    exclude: tuple[str, ...] = ()  # node names kept in fp32 (e.g. "lm_head")
    # the token embedding as 8-bit blocks (GatherBlockQuantized); tied to the head, one table serves both
    embedding: bool = True
    # dynamic method, tied embedding: the head's 8-bit MatMulNBits block (128 measured faster than 32
    # at batch 1 on the 2-core AVX2 box: the whole-model nbits sweep 3.47 vs 4.07 ms/token)
    head_block_size: int = 128


@dataclass(frozen=True)
class Int4Config:
    # one scale per 64 weights along the input dimension: with fp32 scales that is 4.5 bits per weight,
    # what llama.cpp's Q4_0 stores (32 weights + an fp16 scale). Quant sweep, DialoGPT-small, 2-core
    # AVX2 box: block 32 / 64 / 128 = 2.70 / 2.36 / 2.18 ms/token, peak RSS 227 / 199 / 188 MB,
    # teacher-forced KL 1.07e-2 / 1.21e-2 / 1.41e-2 (reports/quant-sweep.txt)
    block_size: int = 64
    symmetric: bool = True  # no zero points: less to read per block
    # 4 = int8 activations: MLAS's fastest MatMulNBits path on AVX2; 0 keeps fp32 activations
    accuracy_level: int = 4
    exclude: tuple[str, ...] = ()
    embedding: bool = True  # the token embedding as blocks of head_bits, shared with the head when tied
    # the LM head (and the embedding tied to it): 8 bits in blocks of 128, as int8 keeps it and as
    # llama.cpp's Q4_0 keeps its head wider (Q6_K / Q8_0), or 4 as every other MatMul. trained:chat,
    # held out: KL 2.2e-3 vs 1.9e-2, 57 vs 41 of 82 greedy replies kept; DialoGPT-small batch 1
    # 1.05-1.19x the time (88 vs 70 MB read a token), medium 1.06x, still 0.89x Q4_0's (README,
    # Precisions; reports/quant-sweep.txt)
    head_bits: int = 8

    def check(self) -> None:
        """Raises Gpt2OnnxError for a block size, accuracy level or head width MatMulNBits does not take."""
        if self.head_bits not in (4, 8):
            raise Gpt2OnnxError(f"int4 head bits must be 4 or 8, got {self.head_bits}")
        if self.block_size not in INT4_BLOCK_SIZES:
            raise Gpt2OnnxError(f"int4 block size must be one of {', '.join(map(str, INT4_BLOCK_SIZES))} (what onnxruntime's "
                                f"MatMulNBits quantizer takes), got {self.block_size}")
        if self.accuracy_level not in INT4_ACCURACY_LEVELS:
            raise Gpt2OnnxError(f"int4 accuracy level must be 0 or 1 (fp32 activations), 2 (fp16), 3 (bf16) or "
                                f"4 (int8 activations), got {self.accuracy_level}")


def quantize_int8(src: str, cfg: Int8Config = Int8Config()):
    """Quantize the MatMul weights of the float model at `src` to int8; returns (ModelProto, manifest entry)."""
    import onnx

    if cfg.method not in INT8_METHODS:
        raise Gpt2OnnxError(f"unknown int8 method {cfg.method!r}; choose {' or '.join(INT8_METHODS)}")
    # the graph with its initializers' names and shapes only: onnxruntime's dynamic quantizer reads the
    # weights from `src` itself, so this process does not hold a float copy beside its own (DialoGPT-medium
    # export peak 8.6 -> 7.0 GB)
    model = onnx.load(src, load_external_data=False)
    _check_exclude(model, cfg.exclude)
    tied = cfg.embedding and _tied(model, os.path.dirname(src))
    if cfg.method == "nbits":
        onnx.load_external_data_for_model(model, os.path.dirname(src))
        model = _nbits(model, 8, cfg.block_size, True, 4, cfg.exclude)
        entry = {"method": "onnxruntime MatMulNBits (RTN), int8 activations per row and block", "weight_type": "int8",
                 "block_size": cfg.block_size, "exclude": list(cfg.exclude)}
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # a shared embedding needs the head in MatMulNBits' row-major [vocab, blocks, block] layout, which
        # GatherBlockQuantized can gather rows from; DynamicQuantizeMatMul keeps [hidden, vocab]
        head = [LM_HEAD] if tied and LM_HEAD not in cfg.exclude else []
        tmp = src + ".dynamic.onnx"
        try:
            with _without_preprocess_hint():
                quantize_dynamic(src, tmp, op_types_to_quantize=["MatMul"], per_channel=cfg.per_channel,
                                 reduce_range=cfg.reduce_range, weight_type=QuantType.QInt8,
                                 nodes_to_exclude=list(cfg.exclude) + head, use_external_data_format=_big(src),
                                 # contrib ops defeat ONNX shape inference; every activation here is fp32
                                 extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
            model = onnx.load(tmp)
        finally:
            for f in (tmp, tmp + ".data"):
                if os.path.exists(f):
                    os.remove(f)
        head_block = _fit_block(model, cfg.head_block_size)
        if head:
            model = _nbits(model, 8, head_block, True, 4, (), include=head)
        entry = {k: v for k, v in asdict(cfg).items() if k not in ("block_size", "embedding", "head_block_size")}
        entry = {**entry, "method": "onnxruntime dynamic quantization", "weight_type": "int8"}
        if head:
            entry["lm_head"] = f"MatMulNBits 8-bit, block {head_block}, int8 activations (shared with the embedding)"
    block = head_block if cfg.method == "dynamic" else cfg.block_size
    entry["embedding"] = _quantize_embedding(model, 8, block, tied) if cfg.embedding else "float32"
    return model, entry


def quantize_int4(src: str, cfg: Int4Config = Int4Config()):
    """Weight-only 4-bit MatMulNBits for every MatMul with a constant weight of the float model at
    `src`; returns (ModelProto, manifest entry)."""
    import onnx

    cfg.check()
    model = onnx.load(src)
    _check_exclude(model, cfg.exclude)
    tied = cfg.embedding and _tied(model)
    wide = cfg.head_bits == 8 and LM_HEAD not in cfg.exclude
    model = _nbits(model, 4, cfg.block_size, cfg.symmetric, cfg.accuracy_level, cfg.exclude + ((LM_HEAD,) if wide else ()))
    entry = {"method": "onnxruntime MatMulNBits (RTN)", "weight_type": "int4", **asdict(cfg)}
    bits, block = 4, cfg.block_size
    if wide:  # symmetric, as the embedding shares its blocks
        bits, block = 8, _fit_block(model, Int8Config().head_block_size)
        model = _nbits(model, 8, block, True, cfg.accuracy_level, (), include=[LM_HEAD])
        entry["lm_head"] = f"MatMulNBits 8-bit, block {block}" + (" (shared with the embedding)" if tied else "")
    entry["embedding"] = _quantize_embedding(model, bits, block, tied) if cfg.embedding else "float32"
    return model, entry


def _check_exclude(model, exclude) -> None:
    """Refuse names to keep in float that are not MatMuls with a weight in `model`: a mistyped name
    would otherwise leave every MatMul quantized while the manifest records it as kept."""
    inits = {t.name for t in model.graph.initializer}
    names = [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits]
    unknown = [x for x in exclude if x not in names]
    if unknown:
        few = sorted(names, key=lambda n: n != LM_HEAD)[:5]  # the head first: the usual one to keep
        raise Gpt2OnnxError(f"cannot keep {', '.join(map(repr, unknown))} in float: no MatMul with a weight has that "
                            f"name; choose among {', '.join(few)}{', ...' if len(names) > len(few) else ''} ({len(names)} in all)")


@contextlib.contextmanager
def _without_preprocess_hint():
    """Drop onnxruntime's pre-processing hint, only that record and only inside the block. It logs
    with `logging.warning`, which also gives an unconfigured root logger a stderr handler: the root's
    handlers are put back as they were."""
    import logging

    root = logging.getLogger()
    handlers = list(root.handlers)

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_PREPROCESS_HINT)

    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
        for h in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(h)


def nbits_quantizer():
    """onnxruntime's MatMulNBitsQuantizer class. Its module calls logging.basicConfig(level=INFO) on import and
    logs a line per MatMul it visits; imported as it is, every later INFO record of any library would print
    (quantize_dynamic logs two per MatMul), so the root logger is put back as it was and the module's own
    logger kept to warnings."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
    root.setLevel(level)
    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


def _nbits(model, bits: int, block_size: int, symmetric: bool, accuracy_level: int, exclude, include=None):
    MatMulNBitsQuantizer = nbits_quantizer()  # noqa: N806
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                             accuracy_level=accuracy_level, nodes_to_exclude=list(exclude), nodes_to_include=include,
                             op_types_to_quantize=("MatMul",))
    q.process()
    return q.model.model


def _fit_block(model, block: int) -> int:
    """The largest block <= `block` (halving, at least 16) that divides the width, so the embedding
    can share the head's blocks (a narrow test model is narrower than the default block)."""
    wte = next((t for t in model.graph.initializer if t.name == "wte"), None)
    width = wte.dims[1] if wte is not None else block
    while block > 16 and width % block:
        block //= 2
    return block


def _tied(model, base_dir: str = "") -> bool:
    """Whether the LM head's weight is the token embedding transposed (GPT-2 and DialoGPT tie them);
    `base_dir` holds the weights of a model loaded without them."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer if t.name in ("wte", "lm_head.w")}
    if len(inits) < 2:
        return False
    wte, head = (numpy_helper.to_array(inits[n], base_dir) for n in ("wte", "lm_head.w"))
    return wte.shape == head.shape[::-1] and bool(np.array_equal(wte, head.T))


def _quantize_embedding(model, bits: int, block_size: int, tied: bool) -> str:
    """Replace the token-embedding Gather on "wte" [V, H] by GatherBlockQuantized on `bits`-bit
    blocks of `block_size` along H, symmetric (implicit zero point 2^(bits-1), MatMulNBits'). When the
    head is tied and quantized, the gather reads the head's own MatMulNBits weight [V, H/block, block
    bytes] and scales [V, H/block] (reshaped to [V, H/block, 1], a 4-byte-per-block copy at load), so
    the artifact holds the table once; otherwise wte is quantized on its own. Returns the manifest note."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    gather = next((n for n in g.node if n.name == TOKEN_EMBEDDING and n.op_type == "Gather"), None)
    if gather is None or gather.input[0] != "wte":
        return "float32 (no token-embedding Gather found)"
    wte_t = next(t for t in g.initializer if t.name == "wte")
    V, H = wte_t.dims
    if H % block_size:
        return f"float32 (width {H} is not a multiple of block {block_size})"
    head = next((n for n in g.node if n.name.startswith(LM_HEAD) and n.op_type == "MatMulNBits"), None)
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute} if head is not None else {}
    shared = (tied and head is not None and len(head.input) == 3  # symmetric: no zero points
              and attrs.get("bits") == bits and attrs.get("block_size") == block_size)
    nb = H // block_size
    if shared:
        data, scales, note = head.input[1], head.input[2], f"int{bits} blocks of {block_size}, shared with the LM head"
    else:
        w = numpy_helper.to_array(wte_t).astype(np.float32).reshape(V, nb, block_size)
        zp = 1 << (bits - 1)
        scale = np.abs(w).max(-1) / (zp - 1)  # [V, nb]
        scale[scale == 0] = 1.0
        q = (np.clip(np.rint(w / scale[..., None]), 1 - zp, zp - 1) + zp).astype(np.uint8)  # [V, nb, block]
        if bits == 4:
            q = q[..., 0::2] | (q[..., 1::2] << 4)  # two per byte, low nibble first: [V, nb, block/2]
        data, scales, note = "wte_q", "wte_scales", f"int{bits} blocks of {block_size}"
        g.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(q), data),
                              numpy_helper.from_array(scale.astype(np.float32), scales)])
    g.initializer.remove(wte_t)
    g.initializer.append(numpy_helper.from_array(np.array([V, nb, 1], np.int64), "tok_emb_scales_shape"))
    g.initializer.append(numpy_helper.from_array(np.array([0, 0, H], np.int64), "tok_emb_out_shape"))
    out = gather.output[0]
    at = list(g.node).index(gather)
    g.node.remove(gather)
    nodes = [
        helper.make_node("Reshape", [scales, "tok_emb_scales_shape"], ["tok_emb_scales3"], name="tok_emb_scales3"),
        # [B, S] ids -> [B, S, H/block, block]
        helper.make_node("GatherBlockQuantized", [data, gather.input[1], "tok_emb_scales3"], ["tok_emb_blocks"],
                         name=TOKEN_EMBEDDING, domain=MS_DOMAIN, gather_axis=0, quantize_axis=2,
                         block_size=block_size, bits=bits),
        helper.make_node("Reshape", ["tok_emb_blocks", "tok_emb_out_shape"], [out], name="tok_emb_out"),
    ]
    for i, n in enumerate(nodes):
        g.node.insert(at + i, n)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return note


def _big(path: str) -> bool:
    return os.path.exists(path + ".data")
