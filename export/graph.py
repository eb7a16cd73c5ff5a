"""Build the GPT-2 decoder graph with past key values straight from the checkpoint's weights.

Why emit the graph instead of tracing it: the fused graph we want (GroupQueryAttention that writes
the KV cache in place, SkipLayerNormalization, FastGelu) is known exactly, so we write it directly,
map every weight explicitly and assert its shape (the CTranslate2 converter approach). Tracing
transformers' GPT-2 produces a graph whose shape changes with every transformers release and which
the optimizer then has to pattern-match back into the same operators. The parity check against the
PyTorch model (export/parity.py) is what proves the graph right.

One graph serves the prompt pass and every decode step:

  inputs   input_ids            int64 [batch, seq]
           attention_mask       int64 [batch, past + seq]   1 = real token, 0 = padding
           position_ids         int64 [batch, seq]          padding repeats a row's last real position (or 0)
           num_logits_to_keep   int64 []                    0 = every position, 1 = each row's last real token
           past_key_values.{i}.key|value  [batch, heads, past, head_dim]
  outputs  logits               float32 [batch, kept, vocab]
           present.{i}.key|value          [batch, heads, past + seq, head_dim]

Fused graphs use GroupQueryAttention (kv heads = heads): when the runtime binds past and present to
the same buffer of capacity `max_len`, the op appends the new keys/values in place and `past` is
that capacity; without binding it concatenates like the plain graph. A fused graph's rows are
right-padded: row b's tokens sit in columns 0 .. len_b - 1 and its mask is 1 there and 0 after (it
may be [batch, capacity] wide), so each row's length alone says what it attends to and the op needs
no attention_bias (with one, onnxruntime's CUDA kernel leaves flash attention for its unfused path:
captured steps 1.07x / 1.35x / 1.59x slower at batch 1 / 16 / 64 on an H200, reports/gpu/attention-bias).
The plain graph takes left padding too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gpt2onnx.runtime.artifact import CONFIG_KEYS, CONFIG_PROP
from gpt2onnx.runtime.errors import Gpt2OnnxError
from gpt2onnx.runtime.spec import IONames

NAMES = IONames()  # the graph's input and output names, written into the manifest and read back by the runtime

OPSET = 17
MS_DOMAIN = "com.microsoft"
# node names export/quantize.py looks for: the token-embedding Gather (on initializer "wte") and the
# LM head MatMul (on "lm_head.w" = wte transposed when the checkpoint ties them, as GPT-2 does)
TOKEN_EMBEDDING, LM_HEAD = "tok_emb", "lm_head"
MASK_VALUE = -10000.0  # exp(-1e4) == 0 in fp32 and fp16, and finite, so a fully masked row stays NaN-free


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_positions: int
    layer_norm_epsilon: float
    eos_token_id: int
    bos_token_id: int
    pad_token_id: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# generation_config fields that change what transformers' generate returns when the caller passes none
GENERATE_DEFAULTS = ("do_sample", "num_beams", "temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size",
                     "min_new_tokens", "length_penalty", "max_new_tokens")
# GELU's tanh approximation under both of transformers' names for it (NewGELUActivation, PytorchGELUTanh)
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


def model_config(hf_config, generation_config=None, fused: bool = True, notes: list[str] | None = None) -> ModelConfig:
    """Read and check a transformers GPT2Config; refuse variants the graph does not implement.

    The stop token is the one transformers' `generate` stops on: `generation_config`'s (the checkpoint's
    generation_config.json, else derived from the config) when given, else the config's. Where it lists
    several, the first is the artifact's and `notes` says to pass the others as stop_token_ids."""
    if hf_config.activation_function not in GELU_TANH:
        raise Gpt2OnnxError(f"checkpoint has activation_function={hf_config.activation_function!r}; gpt2onnx supports "
                            "GELU's tanh approximation only (gelu_new, gelu_pytorch_tanh)")
    unsupported = {
        "scale_attn_weights": (hf_config.scale_attn_weights, True),
        "scale_attn_by_inverse_layer_idx": (hf_config.scale_attn_by_inverse_layer_idx, False),
        "reorder_and_upcast_attn": (hf_config.reorder_and_upcast_attn, False),
    }
    for key, (got, want) in unsupported.items():
        if got != want:
            raise Gpt2OnnxError(f"checkpoint has {key}={got!r}; gpt2onnx supports {key}={want!r} only")
    H, heads = hf_config.n_embd, hf_config.n_head
    if hf_config.n_inner not in (None, 4 * H):
        raise Gpt2OnnxError(f"checkpoint has n_inner={hf_config.n_inner}; gpt2onnx supports GPT-2's MLP width 4 x n_embd "
                            f"only (n_inner None or {4 * H})")
    if H % heads:
        raise Gpt2OnnxError(f"checkpoint's n_embd {H} is not a multiple of n_head {heads}")
    if fused and (H // heads) % 8:
        raise Gpt2OnnxError(f"checkpoint's head size n_embd / n_head = {H // heads} is not a multiple of 8, which "
                            "onnxruntime's GroupQueryAttention needs; --no-fuse exports a plain graph for other runtimes")
    V = hf_config.vocab_size
    eos = generation_config.eos_token_id if generation_config is not None and generation_config.eos_token_id is not None \
        else hf_config.eos_token_id
    if isinstance(eos, (list, tuple)):
        if len(eos) > 1 and notes is not None:
            notes.append(f"note: the checkpoint stops on {len(eos)} ids ({', '.join(map(str, eos))}); the artifact's "
                         f"eos_token_id is {eos[0]}: pass the others as stop_token_ids")
        eos = eos[0] if eos else None
    if generation_config is not None and notes is not None:  # what transformers' generate applies unasked, gpt2onnx per request
        default = type(generation_config)()
        set_ = [f"{k}={getattr(generation_config, k)!r}" for k in GENERATE_DEFAULTS
                if getattr(generation_config, k, None) != getattr(default, k, None)]
        if set_:
            notes.append(f"note: the checkpoint's generation_config.json sets {', '.join(set_)}, which transformers' generate "
                         "applies by default; gpt2onnx takes generation options per request")
    if eos is None:  # transformers' generate would then never stop early; the runtime needs a stop token
        raise Gpt2OnnxError("checkpoint sets no eos_token_id (config.json or generation_config.json); set the token its "
                            "replies end with (GPT-2's <|endoftext|> is 50256)")
    ids = {"eos_token_id": int(eos)}
    ids["bos_token_id"] = int(hf_config.bos_token_id) if hf_config.bos_token_id is not None else ids["eos_token_id"]
    ids["pad_token_id"] = int(hf_config.pad_token_id) if hf_config.pad_token_id is not None else ids["eos_token_id"]
    for name, i in ids.items():
        if not 0 <= i < V:
            raise Gpt2OnnxError(f"checkpoint's {name} {i} is outside its vocabulary 0..{V - 1}; fix config.json")
    return ModelConfig(n_layer=hf_config.n_layer, n_head=heads, n_embd=H, vocab_size=V, n_positions=hf_config.n_positions,
                       layer_norm_epsilon=float(hf_config.layer_norm_epsilon), **ids)


def weights(model, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Map the transformers GPT2LMHeadModel state dict to our names, asserting every shape."""
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    H, V, P = cfg.n_embd, cfg.vocab_size, cfg.n_positions
    out: dict[str, np.ndarray] = {}

    def take(ours: str, theirs: str, shape: tuple[int, ...]) -> None:
        arr = sd.get(theirs)
        if arr is None:
            raise Gpt2OnnxError(f"checkpoint lacks weight {theirs}; is it a GPT-2 model?")
        if arr.shape != shape:
            raise Gpt2OnnxError(f"weight {theirs} has shape {arr.shape}, expected {shape}")
        out[ours] = np.ascontiguousarray(arr)

    take("wte", "transformer.wte.weight", (V, H))
    take("wpe", "transformer.wpe.weight", (P, H))
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        take(f"h{i}.ln_1.g", p + "ln_1.weight", (H,))
        take(f"h{i}.ln_1.b", p + "ln_1.bias", (H,))
        # transformers' Conv1D stores weights as [in, out]: x @ W, no transpose needed.
        take(f"h{i}.qkv.w", p + "attn.c_attn.weight", (H, 3 * H))
        take(f"h{i}.qkv.b", p + "attn.c_attn.bias", (3 * H,))
        take(f"h{i}.attn_out.w", p + "attn.c_proj.weight", (H, H))
        take(f"h{i}.attn_out.b", p + "attn.c_proj.bias", (H,))
        take(f"h{i}.ln_2.g", p + "ln_2.weight", (H,))
        take(f"h{i}.ln_2.b", p + "ln_2.bias", (H,))
        take(f"h{i}.fc.w", p + "mlp.c_fc.weight", (H, 4 * H))
        take(f"h{i}.fc.b", p + "mlp.c_fc.bias", (4 * H,))
        take(f"h{i}.proj.w", p + "mlp.c_proj.weight", (4 * H, H))
        take(f"h{i}.proj.b", p + "mlp.c_proj.bias", (H,))
    take("ln_f.g", "transformer.ln_f.weight", (H,))
    take("ln_f.b", "transformer.ln_f.bias", (H,))
    head = sd.get("lm_head.weight", sd["transformer.wte.weight"])
    if head.shape != (V, H):
        raise Gpt2OnnxError(f"weight lm_head.weight has shape {head.shape}, expected {(V, H)}")
    # [H, V] so the head is a plain MatMul that the quantizers recognise.
    out["lm_head.w"] = np.ascontiguousarray(head.T)
    return out


class _Builder:
    """Accumulates nodes and initializers; names are unique by construction."""

    def __init__(self, dtype: np.dtype):
        import onnx

        self.onnx = onnx
        self.dtype = np.dtype(dtype)
        self.nodes: list = []
        # name -> (weights, whether `into` casts them to `dtype`), kept as numpy until `into` writes them: the
        # checkpoint's own arrays (views), cast there one tensor at a time, so an fp16 build holds no half-size
        # copy of them all; constants not cast (ids, shapes, scales) are written in their own dtype
        self.inits: dict[str, tuple[np.ndarray, bool]] = {}
        self._n = 0

    def const(self, name: str, arr: np.ndarray, cast: bool = True) -> str:
        if name in self.inits:  # shared constants (shapes, scales) are added once
            return name
        cast = cast and arr.dtype.kind == "f"
        self.inits[name] = (arr if cast else np.ascontiguousarray(arr), cast)  # cast (and made contiguous) in `into`
        return name

    def into(self, model, external: Callable | None = None) -> None:
        """Write the initializers into `model`'s graph, one tensor at a time, in its own message.

        `external(name, array, tensor)` may take a tensor's bytes instead: it writes them to a data file,
        points the TensorProto at them and returns where they went (not None); the model then holds
        none of the weight's bytes. None from it keeps the bytes in the model.

        Built apart and then passed to make_graph, every tensor would be copied into the graph and
        the copy kept beside the original (protobuf's upb backend merges the memory of messages
        copied into one another), so the export held the weights three times over: 6.7 GB at peak
        for DialoGPT-medium's 1.5 GB, 13.8 GB for DialoGPT-large's 3.3 GB."""
        helper = self.onnx.helper
        for name, (arr, cast) in self.inits.items():
            if cast:  # a view of the checkpoint's tensor where the dtype is already right
                arr = np.ascontiguousarray(arr, dtype=self.dtype)
            t = model.graph.initializer.add()
            t.name = name
            t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
            t.dims.extend(arr.shape)
            if external is None or external(name, arr, t) is None:
                t.raw_data = arr.tobytes()  # a bytes copy for that tensor alone, freed at once

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None,
           outputs: list[str] | None = None, **attrs) -> list[str]:
        self._n += 1
        base = name or f"{op_type}_{self._n}"
        outs = outputs or [f"{base}_out{j}" for j in range(n_out)]
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, outs, name=base, domain=domain, **attrs))
        return outs

    def one(self, *args, **kw) -> str:
        return self.op(*args, **kw)[0]


def build(cfg: ModelConfig, w: dict[str, np.ndarray], *, fused: bool = True, dtype: str = "float32",
          kv_dtype: str | None = None, kv_scales: list[tuple[float, float]] | None = None, mixed: bool = False,
          external: Callable | None = None):
    """Return the onnx.ModelProto of the decoder.

    `external`: where each weight's bytes go instead of the model (`_Builder.into`; the export writes
    them straight into the artifact's data file, so the model never holds a copy of the weights).

    `mixed` builds the artifact's mixed step graph (mixed.onnx, fused only): a decode step over b rows
    and one row's next prompt chunk in one pass. Inputs: the step's (input_ids / position_ids [b, 1],
    attention_mask [b, capacity], past [b, ...]; no num_logits_to_keep) plus chunk_input_ids /
    chunk_position_ids [1, W], chunk_attention_mask [1, capacity] and chunk_past [1, ...] (the chunk
    row's slot of the same cache); outputs logits [b, 1, vocab] and chunk_logits [1, 1, vocab] (the
    chunk's last real token). The b + W tokens run as one sequence through every matmul and layer norm
    and split only for attention: GroupQueryAttention takes a multi-token pass over a past for one row
    only, so each layer has a decode node [b, 1] and a chunk node [1, W].

    `dtype` is the weight and activation dtype; `kv_dtype` (default `dtype`) the KV cache's. A float16
    cache under float32 activations (fused graphs only) halves the bytes attention reads per token:
    the packed QKV is cast down before GroupQueryAttention and its output cast back up. An int8
    cache (fused graphs only) stores keys and values quantized with one calibrated scale per layer
    and tensor (`kv_scales[i] = (key_scale, value_scale)`); the op quantizes on write and
    dequantizes on read, so attention reads a quarter of the fp32 bytes."""
    return _Decoder(cfg, w, fused, dtype, kv_dtype, kv_scales, mixed).model(external)


class _Decoder:
    """One build of the decoder graph, a method per part as onnxruntime-genai's builder has: the inputs'
    shapes and lengths with the embeddings, a layer (fused or plain), the LM head, the graph's IO."""

    def __init__(self, cfg: ModelConfig, w: dict[str, np.ndarray], fused: bool, dtype: str, kv_dtype: str | None,
                 kv_scales: list[tuple[float, float]] | None, mixed: bool):
        from onnx import helper

        self.np_dtype = np.dtype(dtype)
        self.elem = helper.np_dtype_to_tensor_dtype(self.np_dtype)
        kv_np = np.dtype(kv_dtype or dtype)
        self.kv_elem = helper.np_dtype_to_tensor_dtype(kv_np)
        if kv_np != self.np_dtype and not fused:
            raise Gpt2OnnxError("a KV cache dtype other than the activations' needs the fused graph")
        self.kv_int8 = kv_np == np.int8
        if self.kv_int8 and (kv_scales is None or len(kv_scales) != cfg.n_layer):
            raise Gpt2OnnxError("an int8 KV cache needs one (key, value) scale per layer")
        self.cast_kv = kv_np != self.np_dtype and not self.kv_int8  # a float16 cache under float32 activations
        if mixed and not fused:
            raise Gpt2OnnxError("the mixed step graph needs the fused graph")
        self.cfg, self.w, self.fused, self.mixed, self.kv_scales = cfg, w, fused, mixed, kv_scales
        self.eps = cfg.layer_norm_epsilon
        self.b = _Builder(self.np_dtype)

    def i64(self, name: str, vals) -> str:
        return self.b.const(name, np.array(vals, dtype=np.int64), cast=False)

    def model(self, external: Callable | None):
        ln, residual = self._inputs()
        for i in range(self.cfg.n_layer):
            ln, residual = (self._fused_layer if self.fused else self._plain_layer)(i, self._qkv(i, ln), residual)
        self._head(ln)
        return self._io(external)

    def _inputs(self) -> tuple[str, str]:
        """The shapes (S, T = past + S), the lengths attention needs, the embeddings and layer 0's layer
        norm: (ln, residual), [B, S, H] each (the mixed graph: [1, b + W, H])."""
        b, n, i64, w = self.b, NAMES, self.i64, self.w
        ids_shape = b.one("Shape", [n.input_ids], name="ids_shape")
        mask_shape = b.one("Shape", [n.attention_mask], name="mask_shape")
        self.seq = None if self.mixed else b.one("Slice", [ids_shape, i64("c_1", [1]), i64("c_2", [2])], name="seq")
        total = b.one("Slice", [mask_shape, i64("c_1", [1]), i64("c_2", [2])], name="total")

        ids, positions = n.input_ids, n.position_ids
        if self.mixed:
            # the step's b tokens then the chunk's W as one sequence [1, b + W]: every weight is read once
            # for both, and only attention tells them apart (split_bw = [b, W], on the host from shapes)
            chunk_shape = b.one("Shape", [n.chunk_ids], name="chunk_shape")
            self.rows_b = b.one("Slice", [ids_shape, i64("c_0", [0]), "c_1"], name="step_rows")
            self.split_bw = b.one("Concat", [self.rows_b, b.one("Slice", [chunk_shape, "c_1", "c_2"], name="chunk_cols")],
                                  axis=0, name="split_bw")
            flat = i64("flat_1", [1, -1])
            ids = b.one("Concat", [b.one("Reshape", [ids, flat], name="step_ids_row"), n.chunk_ids], axis=1, name="mixed_ids")
            positions = b.one("Concat", [b.one("Reshape", [positions, flat], name="step_pos_row"), n.chunk_position_ids],
                              axis=1, name="mixed_positions")

        # Embeddings. The fused graph folds the add into layer 0's SkipLayerNormalization.
        tok = b.one("Gather", [b.const("wte", w["wte"]), ids], name=TOKEN_EMBEDDING)
        pos = b.one("Gather", [b.const("wpe", w["wpe"]), positions], name="pos_emb")
        if self.fused:
            self.lens = self._lengths(n.attention_mask, total)
            if self.mixed:
                chunk_total = b.one("Slice", [b.one("Shape", [n.chunk_mask], name="chunk_mask_shape"), "c_1", "c_2"], name="chunk_total")
                self.chunk_lens = self._lengths(n.chunk_mask, chunk_total, "chunk_")
            return b.op("SkipLayerNormalization", [tok, pos, b.const("h0.ln_1.g", w["h0.ln_1.g"]), b.const("h0.ln_1.b", w["h0.ln_1.b"])],
                        domain=MS_DOMAIN, epsilon=self.eps, name="h0.ln_1", outputs=["h0.ln_1_out", "", "", "h0.resid_in"])[::3]
        # Padding bias [B, 1, 1, T]: 0 for real tokens, MASK_VALUE for padding; plus the causal bias.
        mask_f = b.one("Cast", [n.attention_mask], to=self.elem, name="mask_f")
        inv = b.one("Sub", [b.const("one", np.array(1.0)), mask_f], name="mask_inv")
        pad_bias = b.one("Mul", [inv, b.const("mask_value", np.array(MASK_VALUE))], name="pad_bias_2d")
        pad_bias = b.one("Unsqueeze", [pad_bias, i64("axes_1_2", [1, 2])], name="pad_bias")
        causal = _causal_bias(b, self.seq, total, i64)
        self.attn_bias = b.one("Add", [pad_bias, causal], name="attn_bias")  # [B, 1, S, T]
        residual = b.one("Add", [tok, pos], name="emb")
        ln = b.one("LayerNormalization", [residual, b.const("h0.ln_1.g", w["h0.ln_1.g"]), b.const("h0.ln_1.b", w["h0.ln_1.b"])],
                   axis=-1, epsilon=self.eps, name="h0.ln_1")
        return ln, residual

    def _lengths(self, mask: str, total: str, tag: str = "") -> tuple[str, str]:
        """GroupQueryAttention's length inputs: (seqlens_k [B] int32, total_sequence_length [] int32).

        The mask may be wider than past + seq: a runtime that binds one [B, capacity] mask for the whole
        generation leaves future columns 0, so every step has the same input shapes (CUDA graphs need
        that). Each row's length is 1 + the last column that holds a real token in that row: seqlens_k =
        that - 1, and the op writes the row's new keys and values at seqlens_k - seq + 1 (a first prompt,
        mask width = seq, at 0: right-padded rows write their padding after their tokens, where their next
        token will overwrite it). total_sequence_length = the mask's width, an upper bound of every row's."""
        from onnx import TensorProto

        b, i64 = self.b, self.i64
        total32 = b.one("Cast", [total], to=TensorProto.INT32, name=tag + "total_i32")
        total_scalar = b.one("Squeeze", [total32, b.const("c0_axes", np.array([0], np.int64), cast=False)], name=tag + "total_seq_len")
        cols = b.one("Range", [i64("one_s64", 1), b.one("Add", [b.one("Squeeze", [total], name=tag + "width"), "one_s64"]),
                               "one_s64"], name=tag + "col_numbers")  # [T_max] = 1..width
        real_cols = b.one("Mul", [mask, cols], name=tag + "real_cols")
        last = b.one("Sub", [b.one("ReduceMax", [real_cols], axes=[1], keepdims=0, name=tag + "row_total"), "one_s64"],
                     name=tag + "last_pos")
        return b.one("Cast", [last], to=TensorProto.INT32, name=tag + "seqlens_k"), total_scalar

    def _gqa(self, p: str, tag: str, q: str, kv: list[tuple[str, str]], lens: tuple[str, str], quant: tuple[list, dict]) -> str:
        """Layer `p`'s GroupQueryAttention over q [B, S, 3H] and its cache (`kv`: (past, present) of key and
        value); `tag` names a second node of the layer (the mixed graph's chunk)."""
        b, N = self.b, self.cfg.n_head
        (past_k, pres_k), (past_v, pres_v) = kv
        quant_in, quant_attrs = quant
        if self.cast_kv:
            q = b.one("Cast", [q], to=self.kv_elem, name=p + tag + "qkv_kv")
        out = b.op("GroupQueryAttention", [q, "", "", past_k, past_v, *lens, *([""] * 4 if quant_in else []), *quant_in],
                   domain=MS_DOMAIN, num_heads=N, kv_num_heads=N, name=p + tag + "attn", **quant_attrs,
                   outputs=[p + tag + "attn_out", pres_k, pres_v])[0]
        return b.one("Cast", [out], to=self.elem, name=p + tag + "attn_out_act") if self.cast_kv else out

    def _qkv(self, i: int, ln: str) -> str:
        """Layer i's packed query, key and value projection of its layer norm's output: [B, S, 3H]."""
        b, w, p = self.b, self.w, f"h{i}."
        return b.one("Add", [b.one("MatMul", [ln, b.const(p + "qkv.w", w[p + "qkv.w"])], name=p + "qkv"),
                             b.const(p + "qkv.b", w[p + "qkv.b"])], name=p + "qkv_bias")

    def _fused_layer(self, i: int, qkv: str, residual: str) -> tuple[str, str]:
        """Layer i with the contrib ops, from its projection `qkv`; returns the next layer's (or ln_f's)
        (ln, residual)."""
        b, n, w, H, p = self.b, NAMES, self.w, self.cfg.n_embd, f"h{i}."
        c = lambda k: b.const(p + k, w[p + k])  # noqa: E731
        layer_kv = n.kv(self.cfg.n_layer)[2 * i: 2 * i + 2]  # (past, present) of key and value
        quant_in, quant_attrs = [], {}
        if self.kv_int8:
            quant_in = ["", b.const(p + "k_scale", np.array([self.kv_scales[i][0]], np.float32), cast=False),
                        b.const(p + "v_scale", np.array([self.kv_scales[i][1]], np.float32), cast=False)]
            quant_attrs = {"kv_cache_bit_width": 8, "k_quant_type": "PER_TENSOR", "v_quant_type": "PER_TENSOR"}
        quant = (quant_in, quant_attrs)
        if self.mixed:
            # GroupQueryAttention takes a multi-token pass over a past for one row only, so the step's rows
            # [b, 1, 3H] and the chunk [1, W, 3H] attend in two nodes, each over its own rows of the cache
            step_q, chunk_q = b.op("Split", [qkv, self.split_bw], n_out=2, axis=1, name=p + "split_bw")
            step_q = b.one("Reshape", [step_q, self.i64("rows_1_3h", [-1, 1, 3 * H])], name=p + "step_q")
            step_a = self._gqa(p, "", step_q, layer_kv, self.lens, quant)  # [b, 1, H]
            chunk_a = self._gqa(p, "chunk_", chunk_q, n.chunk_kv(self.cfg.n_layer)[2 * i: 2 * i + 2], self.chunk_lens, quant)  # [1, W, H]
            attn = b.one("Concat", [b.one("Reshape", [step_a, self.i64("one_rows_h", [1, -1, H])], name=p + "step_a_row"), chunk_a],
                         axis=1, name=p + "mixed_attn")  # [1, b + W, H]
        else:
            attn = self._gqa(p, "", qkv, layer_kv, self.lens, quant)
        proj = b.one("MatMul", [attn, c("attn_out.w")], name=p + "attn_proj")
        ln, residual = b.op("SkipLayerNormalization", [proj, residual, c("ln_2.g"), c("ln_2.b"), c("attn_out.b")],
                            domain=MS_DOMAIN, epsilon=self.eps, name=p + "ln_2", outputs=[p + "ln_2_out", "", "", p + "resid_mid"])[::3]
        fc = b.one("FastGelu", [b.one("MatMul", [ln, c("fc.w")], name=p + "fc"), c("fc.b")], domain=MS_DOMAIN, name=p + "gelu")
        mlp = b.one("MatMul", [fc, c("proj.w")], name=p + "mlp_proj")
        nxt = f"h{i + 1}.ln_1" if i + 1 < self.cfg.n_layer else "ln_f"
        return b.op("SkipLayerNormalization", [mlp, residual, b.const(nxt + ".g", w[nxt + ".g"]), b.const(nxt + ".b", w[nxt + ".b"]),
                                               c("proj.b")],
                    domain=MS_DOMAIN, epsilon=self.eps, name=nxt, outputs=[nxt + "_out", "", "", f"h{i + 1}.resid_in"])[::3]

    def _plain_layer(self, i: int, qkv: str, residual: str) -> tuple[str, str]:
        """Layer i in standard ONNX ops (the unfused graph), from its projection `qkv`; returns the next
        layer's (ln, residual)."""
        b, w, cfg, p = self.b, self.w, self.cfg, f"h{i}."
        c = lambda k: b.const(p + k, w[p + k])  # noqa: E731
        (past_k, pres_k), (past_v, pres_v) = NAMES.kv(cfg.n_layer)[2 * i: 2 * i + 2]
        attn = _plain_attention(b, p, qkv, past_k, past_v, pres_k, pres_v, self.attn_bias, cfg.n_head, cfg.head_dim, cfg.n_embd, self.i64)
        proj = b.one("Add", [b.one("MatMul", [attn, c("attn_out.w")], name=p + "attn_proj"), c("attn_out.b")])
        residual = b.one("Add", [proj, residual], name=p + "resid_mid")
        ln = b.one("LayerNormalization", [residual, c("ln_2.g"), c("ln_2.b")], axis=-1, epsilon=self.eps, name=p + "ln_2")
        fc = b.one("Add", [b.one("MatMul", [ln, c("fc.w")], name=p + "fc"), c("fc.b")])
        mlp = b.one("Add", [b.one("MatMul", [_gelu_tanh(b, fc), c("proj.w")], name=p + "mlp_proj"), c("proj.b")])
        residual = b.one("Add", [mlp, residual], name=f"h{i + 1}.resid_in")
        nxt = f"h{i + 1}.ln_1" if i + 1 < cfg.n_layer else "ln_f"
        ln = b.one("LayerNormalization", [residual, b.const(nxt + ".g", w[nxt + ".g"]), b.const(nxt + ".b", w[nxt + ".b"])],
                   axis=-1, epsilon=self.eps, name=nxt)
        return ln, residual

    def _head(self, ln: str) -> None:
        """The LM head over the kept positions of ln_f's output ln, into the logits output(s).

        Only the kept positions reach the LM head: decoding needs one row, and the prompt pass would
        otherwise spend seq x vocab x width multiply-adds on logits nobody reads. A row's last real token
        is where its position ids first reach their largest value (right padding repeats the last real
        position, left padding ends on it): ArgMax over them, on the device, picks that row of the
        hidden states, appended after the S others; the Slice then keeps [0, S) for keep = 0 or [S, S+1)
        for keep = 1. Slice reads its starts and ends on the host, so they are computed there from the
        shape and the input (onnxruntime's CUDA provider places such shape arithmetic on the CPU,
        fallback_cpu_capability.cc): any device value on that path would need a device-to-host copy,
        and a graph with a copy cannot be captured."""
        from onnx import TensorProto

        b, n, i64, H = self.b, NAMES, self.i64, self.cfg.n_embd
        if self.mixed:  # the step's rows and the chunk's last real token: [b + 1, H] through the head, split after
            step_h, chunk_h = b.op("Split", [ln, self.split_bw], n_out=2, axis=1, name="split_hidden")
            chunk_pos_f = b.one("Cast", [n.chunk_position_ids], to=TensorProto.FLOAT, name="chunk_pos_f")
            chunk_last = b.one("GatherND", [chunk_h, b.one("ArgMax", [chunk_pos_f], axis=1, keepdims=1, name="chunk_last_token")],
                               batch_dims=1, name="chunk_last_hidden")  # [1, H]
            rows = b.one("Concat", [b.one("Reshape", [step_h, i64("rows_h", [-1, H])], name="step_hidden"), chunk_last],
                         axis=0, name="mixed_hidden")  # [b + 1, H]
            logits = b.one("MatMul", [rows, b.const("lm_head.w", self.w["lm_head.w"])], name=LM_HEAD)
            if self.np_dtype != np.float32:
                logits = b.one("Cast", [logits], to=TensorProto.FLOAT, name="logits_f32")
            split_b1 = b.one("Concat", [self.rows_b, i64("c_1", [1])], axis=0, name="split_b1")
            step_l, chunk_l = b.op("Split", [logits, split_b1], n_out=2, axis=0, name="split_logits")
            rows_1_v = i64("rows_1_v", [-1, 1, self.cfg.vocab_size])
            b.op("Reshape", [step_l, rows_1_v], name="step_logits", outputs=[n.logits])  # [b, 1, vocab]
            b.op("Reshape", [chunk_l, rows_1_v], name="chunk_logits", outputs=[n.chunk_logits])  # [1, 1, vocab]
            return
        pos_f = b.one("Cast", [n.position_ids], to=TensorProto.FLOAT, name="pos_f")  # [B, S], exact below 2^24
        last_tok = b.one("ArgMax", [pos_f], axis=1, keepdims=1, name="last_token")  # [B, 1]
        last_h = b.one("Unsqueeze", [b.one("GatherND", [ln, last_tok], batch_dims=1, name="last_hidden_2d"), "c_1"],
                       name="last_hidden")  # [B, 1, H]
        both = b.one("Concat", [ln, last_h], axis=1, name="hidden_and_last")  # [B, S + 1, H]
        start = b.one("Mul", [self.seq, n.logits_to_keep], name="keep_start")  # [1] = S * keep
        end = b.one("Add", [self.seq, n.logits_to_keep], name="keep_end")  # [1] = S + keep
        kept = b.one("Slice", [both, start, end, "c_1"], name="keep_last")
        logits = b.one("MatMul", [kept, b.const("lm_head.w", self.w["lm_head.w"])], name=LM_HEAD)
        if self.np_dtype != np.float32:
            b.one("Cast", [logits], to=TensorProto.FLOAT, name="logits_f32", outputs=[n.logits])
        else:
            b.nodes[-1].output[0] = n.logits

    def _io(self, external: Callable | None):
        """The graph's inputs and outputs around the nodes built, as a ModelProto; the weights written by
        `_Builder.into` (through `external` where given)."""
        from onnx import TensorProto, helper

        b, n, cfg = self.b, NAMES, self.cfg
        N, D = cfg.n_head, cfg.head_dim
        kv = lambda name, past: helper.make_tensor_value_info(name, self.kv_elem, ["batch", N, past, D])  # noqa: E731
        i64_in = lambda name, dims: helper.make_tensor_value_info(name, TensorProto.INT64, dims)  # noqa: E731
        inputs = [i64_in(n.input_ids, ["batch", "seq"]), i64_in(n.attention_mask, ["batch", "total"]),
                  i64_in(n.position_ids, ["batch", "seq"])]
        if not self.mixed:  # a mixed pass keeps the step's and the chunk's last logits, always
            inputs.append(i64_in(n.logits_to_keep, []))
        outputs = [helper.make_tensor_value_info(n.logits, TensorProto.FLOAT, ["batch", "kept", cfg.vocab_size])]
        for past, present in n.kv(cfg.n_layer):
            inputs.append(kv(past, "past"))
            outputs.append(kv(present, "present"))
        if self.mixed:
            inputs += [i64_in(n.chunk_ids, [1, "chunk"]), i64_in(n.chunk_mask, [1, "chunk_total"]),
                       i64_in(n.chunk_position_ids, [1, "chunk"])]
            outputs.append(helper.make_tensor_value_info(n.chunk_logits, TensorProto.FLOAT, [1, 1, cfg.vocab_size]))
            ckv = lambda name, past: helper.make_tensor_value_info(name, self.kv_elem, [1, N, past, D])  # noqa: E731
            for past, present in n.chunk_kv(cfg.n_layer):
                inputs.append(ckv(past, "chunk_past"))
                outputs.append(ckv(present, "chunk_present"))
        graph = helper.make_graph(b.nodes, "gpt2onnx_mixed_step" if self.mixed else "gpt2onnx_decoder", inputs, outputs)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="gpt2onnx")
        b.into(model, external)
        # the dims the weights were built with, in the graph itself: a manifest edited afterwards is caught at load
        helper.set_model_props(model, {CONFIG_PROP: json.dumps({k: getattr(cfg, k) for k in CONFIG_KEYS})})
        model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime releases of the last two years
        return model


def build_pick():
    """Greedy's pick as a graph of its own (the artifact's pick.onnx): ArgMax over logits [batch, kept,
    vocab] -> next_token int64 [batch, kept], the first index of the largest logit, as numpy's argmax.

    Its own graph, not a second output of the decoder: onnxruntime runs every node of a graph whatever
    outputs are bound (checked: 1.32 on the CPU), and the ArgMax kernel costs ~0.1 ms on CUDA, which
    batch 1 would pay on every step. The runtime runs it after a decode step on the logits where they
    lie (runtime/decoder.py, Pick): on CUDA a greedy step then copies one id per row to the host
    instead of vocab floats per row."""
    from onnx import TensorProto, helper

    n = NAMES
    node = helper.make_node("ArgMax", [n.logits], [n.next_token], name="greedy_pick", axis=-1, keepdims=0)
    graph = helper.make_graph([node], "gpt2onnx_pick",
                              [helper.make_tensor_value_info(n.logits, TensorProto.FLOAT, ["batch", "kept", "vocab"])],
                              [helper.make_tensor_value_info(n.next_token, TensorProto.INT64, ["batch", "kept"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="gpt2onnx")
    model.ir_version = min(model.ir_version, 10)
    return model


def _causal_bias(b: _Builder, seq: str, total: str, i64) -> str:
    """[1, 1, S, T] additive bias: query i (absolute position T - S + i) may see keys 0..T-S+i."""
    seq_s = b.one("Squeeze", [seq], name="seq_scalar")
    total_s = b.one("Squeeze", [total], name="total_scalar")
    past = b.one("Sub", [total_s, seq_s], name="past_len")
    q_pos = b.one("Add", [b.one("Range", [i64("zero_s", 0), seq_s, i64("one_s", 1)], name="q_range"), past], name="q_pos")
    k_pos = b.one("Range", ["zero_s", total_s, "one_s"], name="k_pos")
    q_col = b.one("Unsqueeze", [q_pos, i64("axes_1", [1])], name="q_col")  # [S, 1]
    future = b.one("Greater", [k_pos, q_col], name="future")  # [S, T]
    bias = b.one("Where", [future, "mask_value", b.const("zero_f", np.array(0.0))], name="causal_2d")
    return b.one("Unsqueeze", [bias, i64("axes_0_1", [0, 1])], name="causal_bias")


def _plain_attention(b: _Builder, p: str, qkv: str, past_k: str, past_v: str, pres_k: str, pres_v: str,
                     bias: str, N: int, D: int, H: int, i64) -> str:
    """Multi-head attention in standard ONNX ops; present = concat(past, new)."""
    q, k, v = b.op("Split", [qkv, i64("split_3h", [H, H, H])], n_out=3, axis=2, name=p + "split")
    heads = i64("bsnd", [0, 0, N, D])

    def to_heads(x: str, tag: str) -> str:  # [B, S, H] -> [B, N, S, D]
        return b.one("Transpose", [b.one("Reshape", [x, heads], name=p + tag + "_rs")], perm=[0, 2, 1, 3], name=p + tag + "_t")

    b.op("Concat", [past_k, to_heads(k, "k")], axis=2, name=p + "cat_k", outputs=[pres_k])
    b.op("Concat", [past_v, to_heads(v, "v")], axis=2, name=p + "cat_v", outputs=[pres_v])
    kt = b.one("Transpose", [pres_k], perm=[0, 1, 3, 2], name=p + "kt")
    scores = b.one("MatMul", [to_heads(q, "q"), kt], name=p + "qk")  # [B, N, S, T]
    scores = b.one("Add", [b.one("Mul", [scores, b.const("attn_scale", np.array(1.0 / np.sqrt(D)))]), bias])
    ctx = b.one("MatMul", [b.one("Softmax", [scores], axis=-1, name=p + "softmax"), pres_v], name=p + "pv")
    ctx = b.one("Transpose", [ctx], perm=[0, 2, 1, 3], name=p + "ctx_t")
    return b.one("Reshape", [ctx, i64("bsh", [0, 0, H])], name=p + "ctx")


def _gelu_tanh(b: _Builder, x: str) -> str:
    """GPT-2's gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    cube = b.one("Mul", [b.one("Mul", [x, x]), x])
    inner = b.one("Add", [x, b.one("Mul", [cube, b.const("gelu_c", np.array(0.044715))])])
    t = b.one("Tanh", [b.one("Mul", [inner, b.const("gelu_k", np.array(np.sqrt(2.0 / np.pi)))])])
    return b.one("Mul", [b.one("Mul", [x, b.const("half", np.array(0.5))]), b.one("Add", [t, "one"])])


def fused_counts(model) -> dict[str, int]:
    """Count the operators that matter for speed, read from the graph itself."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in FUSED_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


FUSED_OPS = {
    "GroupQueryAttention", "MultiHeadAttention", "Attention", "SkipLayerNormalization", "LayerNormalization",
    "FastGelu", "BiasGelu", "Gelu", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulInteger", "MatMul",
    "GatherBlockQuantized",
}


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every initializer except tables only gathered from
    (token and position embeddings: one row each per token)."""
    import onnx

    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for t in model.graph.initializer:
        ops = consumers.get(t.name, set())
        if ops and ops <= {"Gather", "GatherBlockQuantized"}:
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next(e.value for e in t.external_data if e.key == "length"))
        else:
            total += len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
    return total


def runtime_counts(model_path: str) -> dict[str, int]:
    """Operator counts of the graph onnxruntime actually runs on CPU, after its own fusions."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = os.path.join(d, "optimized.onnx")
        so.log_severity_level = 3
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
        return fused_counts(onnx.load(so.optimized_model_filepath, load_external_data=False))
