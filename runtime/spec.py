"""What the decode core needs to know about a model, read back from its manifest (the artifact's
self-description), so no module spells the graph's dims or input and output names again.

`IONames` is the contract between export and runtime: export/graph.py builds the graph with these
names and export/convert.py writes them into the manifest's `io`; `ModelSpec.from_manifest` reads
them back, so an artifact that names its tensors differently still runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import Gpt2OnnxError

PICK_FILE = "pick.onnx"  # greedy's pick as a graph of its own (export/graph.py, build_pick)
MIXED_FILE = "mixed.onnx"  # a decode step and one row's prompt chunk in one pass (export/graph.py, build(mixed=True))


@dataclass(frozen=True)
class IONames:
    """The graph's input and output names; `{i}` in the KV templates is the layer."""

    input_ids: str = "input_ids"  # int64 [batch, seq]
    attention_mask: str = "attention_mask"  # int64 [batch, total]: 1 = real token (a fused graph takes [batch, capacity])
    position_ids: str = "position_ids"  # int64 [batch, seq]
    logits_to_keep: str = "num_logits_to_keep"  # int64 []: 0 = every position, k = the last k (read on the host)
    logits: str = "logits"  # float32 [batch, kept, vocab]
    past_key: str = "past_key_values.{i}.key"  # [batch, heads, past, head_dim]
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"  # [batch, heads, past + seq, head_dim] (the same buffer as past when bound in place)
    present_value: str = "present.{i}.value"
    # the pick graph (pick.onnx): greedy's next token where the logits lie, its input named as `logits`
    next_token: str = "next_token"  # int64 [batch, kept]: argmax over each row's logits
    # the mixed step graph (mixed.onnx): the step's inputs above plus one row's prompt chunk
    chunk_ids: str = "chunk_input_ids"  # int64 [1, W]
    chunk_mask: str = "chunk_attention_mask"  # int64 [1, total]: the chunk row's mask (held + W ones)
    chunk_position_ids: str = "chunk_position_ids"  # int64 [1, W]
    chunk_logits: str = "chunk_logits"  # float32 [1, 1, vocab]: the chunk's last real token
    chunk_past_key: str = "chunk_past.{i}.key"  # [1, heads, past, head_dim]: the chunk row's slot of the cache
    chunk_past_value: str = "chunk_past.{i}.value"
    chunk_present_key: str = "chunk_present.{i}.key"
    chunk_present_value: str = "chunk_present.{i}.value"

    def kv(self, n_layer: int, prefix: str = "") -> list[tuple[str, str]]:
        """(past input, present output) per layer and tensor: key then value of layer 0, then layer 1 ...
        (prefix "chunk_": the mixed graph's chunk row's)."""
        return [(getattr(self, f"{prefix}past_{t}").format(i=i), getattr(self, f"{prefix}present_{t}").format(i=i))
                for i in range(n_layer) for t in ("key", "value")]

    def chunk_kv(self, n_layer: int) -> list[tuple[str, str]]:
        return self.kv(n_layer, "chunk_")

    def manifest(self) -> dict[str, str]:
        """The `io` entries export writes (KV templates under `kv`, the rest at the top level)."""
        return {"names": {k: getattr(self, k) for k in ("input_ids", "attention_mask", "position_ids", "logits")},
                "logits_to_keep": self.logits_to_keep,
                "pick": {"file": PICK_FILE, "input": self.logits, "output": self.next_token},
                "mixed": {"file": MIXED_FILE, **{k: getattr(self, k) for k in (
                    "chunk_ids", "chunk_mask", "chunk_position_ids", "chunk_logits", "chunk_past_key", "chunk_past_value",
                    "chunk_present_key", "chunk_present_value")}},
                "kv": {k: getattr(self, k) for k in ("past_key", "past_value", "present_key", "present_value")}}

    @classmethod
    def from_manifest(cls, io: dict) -> IONames:
        names = {**io.get("names", {}), **{k: io["kv"][k] for k in ("past_key", "past_value", "present_key", "present_value")
                                             if k in io.get("kv", {})}}
        if "logits_to_keep" in io:
            names["logits_to_keep"] = io["logits_to_keep"]
        if "pick" in io:
            names["next_token"] = io["pick"]["output"]
        names.update({k: v for k, v in io.get("mixed", {}).items() if k != "file"})
        return cls(**{k: v for k, v in names.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ModelSpec:
    """Dims, token ids and IO names of one artifact: everything the decode core is handed."""

    n_layer: int
    n_head: int
    head_dim: int
    vocab_size: int
    n_positions: int
    eos_token_id: int
    pad_token_id: int
    kv_dtype: np.dtype  # the KV cache's element type (float32 | float16 | int8)
    in_place_kv: bool  # past and present may be bound to one [slots, heads, capacity, head_dim] buffer
    names: IONames
    has_pick: bool = False  # the artifact carries pick.onnx (exports since 2026-12-06; older ones pick on the host)
    has_mixed: bool = False  # the artifact carries mixed.onnx (exported with --mixed-step)

    @property
    def kv_names(self) -> list[tuple[str, str]]:
        return self.names.kv(self.n_layer)

    @classmethod
    def from_manifest(cls, manifest) -> ModelSpec:
        c, io = manifest.config, manifest.raw["io"]
        try:
            return cls(n_layer=c["n_layer"], n_head=c["n_head"], head_dim=c["n_embd"] // c["n_head"],
                       vocab_size=c["vocab_size"], n_positions=c["n_positions"], eos_token_id=c["eos_token_id"],
                       pad_token_id=c["pad_token_id"], kv_dtype=np.dtype(io["kv"]["dtype"]),
                       in_place_kv=bool(io["kv"]["shared_buffer"]), names=IONames.from_manifest(io),
                       has_pick=io.get("pick", {}).get("file") == PICK_FILE and PICK_FILE in manifest.raw["files"],
                       has_mixed=io.get("mixed", {}).get("file") == MIXED_FILE and MIXED_FILE in manifest.raw["files"])
        except (KeyError, TypeError) as e:
            raise Gpt2OnnxError(f"the manifest of {manifest.path} lacks io entry {e}; the artifact is damaged, re-export it") from None
