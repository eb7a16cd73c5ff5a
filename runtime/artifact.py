"""The artifact directory contract: `gpt2onnx.json` (the manifest), `model.onnx`, `tokenizer.json`.

The export stage writes manifests with `MANIFEST_NAME` and `FORMAT_VERSION` from here; the runtime
reads them with `load_manifest`, which refuses a damaged or mismatched artifact with one line that
says what is wrong and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from .errors import Gpt2OnnxError

MANIFEST_NAME = "gpt2onnx.json"
FORMAT_VERSION = 3  # 2: fused graphs take a [batch, capacity] mask during decode; 3: seqlens_k per row
PRECISIONS = ("fp32", "fp16", "int8", "int4")
REQUIRED_KEYS = ("format_version", "source", "config", "precision", "provider", "opset", "io", "files")
CONFIG_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class Manifest:
    """What the runtime needs from the manifest; `raw` keeps the whole document for `info`."""

    path: str  # the artifact directory
    raw: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.raw["config"]

    @property
    def precision(self) -> str:
        return self.raw["precision"]

    @property
    def kv(self) -> dict[str, Any]:
        return self.raw["io"]["kv"]

    @property
    def synthetic(self) -> bool:
        return bool(self.raw["source"].get("synthetic"))

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)


def sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(path: str, verify: str = "sha256") -> Manifest:
    """Read and validate an artifact directory.

    Args:
        path: the artifact directory.
        verify: "sha256" checks sizes and hashes of every file (about a second per GB),
            "size" checks sizes only, "none" skips file checks.

    Raises:
        Gpt2OnnxError: missing directory or manifest, bad JSON, wrong format version, missing keys,
            missing, truncated or modified files.
    """
    if not os.path.isdir(path):
        raise Gpt2OnnxError(f"artifact directory {path} does not exist; create it with `gpt2onnx export MODEL -o {path}`")
    mpath = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(mpath):
        raise Gpt2OnnxError(f"{path} has no {MANIFEST_NAME}; it is not a gpt2onnx artifact (re-export it)")
    try:
        with open(mpath, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Gpt2OnnxError(f"{mpath} is not valid JSON ({e}); the artifact is damaged, re-export it") from None
    if not isinstance(raw, dict):
        raise Gpt2OnnxError(f"{mpath} is not a JSON object; the artifact is damaged, re-export it")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise Gpt2OnnxError(f"{mpath} lacks {', '.join(missing)}; the artifact is damaged, re-export it")
    if raw["format_version"] != FORMAT_VERSION:
        raise Gpt2OnnxError(
            f"{path} has format version {raw['format_version']}, this gpt2onnx reads {FORMAT_VERSION}; re-export it"
        )
    missing = [k for k in CONFIG_KEYS if k not in raw["config"]]
    if missing:
        raise Gpt2OnnxError(f"{mpath} config lacks {', '.join(missing)}; the artifact is damaged, re-export it")
    if raw["precision"] not in PRECISIONS:
        raise Gpt2OnnxError(f"{mpath} names unknown precision {raw['precision']!r}; re-export it")
    for name, meta in raw["files"].items():
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise Gpt2OnnxError(f"{path} is missing {name}; the artifact is incomplete, re-export it")
        if verify == "none":
            continue
        size = os.path.getsize(fpath)
        if size != meta["bytes"]:
            raise Gpt2OnnxError(
                f"{name} in {path} is {size} bytes, the manifest says {meta['bytes']}; the file is truncated or replaced, re-export it"
            )
        if verify == "sha256" and sha256(fpath) != meta["sha256"]:
            raise Gpt2OnnxError(f"{name} in {path} does not match its sha256 in the manifest; the file is damaged, re-export it")
    return Manifest(path=os.path.abspath(path), raw=raw)


def describe(m: Manifest) -> str:
    """The manifest in a readable form, for `gpt2onnx info`."""
    r = m.raw
    c = r["config"]
    src = r["source"]
    lines = [
        f"artifact     {m.path}",
        f"source       {src.get('checkpoint')}" + (f" (seed {src.get('seed')})" if src.get("synthetic") else ""),
        f"architecture {c['n_layer']} layers, {c['n_head']} heads, width {c['n_embd']}, vocabulary {c['vocab_size']}, "
        f"{c['n_positions']} positions, eos {c['eos_token_id']}",
        f"precision    {r['precision']} for {r['provider']}, opset {r['opset']}, fused: {r.get('fused')}",
    ]
    if r.get("quantization"):
        q = ", ".join(f"{k}={v}" for k, v in r["quantization"].items())
        lines.append(f"quantization {q}")
    kv = r["io"]["kv"]
    lines.append(f"kv cache     {kv['layout']} {kv['dtype']}, shared past/present buffer: {kv['shared_buffer']}")
    if r.get("fused_ops"):
        lines.append("operators    " + ", ".join(f"{k} {v}" for k, v in r["fused_ops"].items()))
    if r.get("runtime_ops"):
        lines.append("as run (CPU) " + ", ".join(f"{k} {v}" for k, v in r["runtime_ops"].items()))
    if r.get("weights"):
        lines.append(f"weights      {r['weights']['bytes_per_token'] / 1e6:.1f} MB read per decode step")
    for name, figs in r.get("parity", {}).items():
        if isinstance(figs, dict):
            lines.append(f"parity       {name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in figs.items()))
    for name, figs in r.get("accuracy", {}).items():
        if isinstance(figs, dict) and name != "tolerances":
            lines.append(f"accuracy     {name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in figs.items()))
    if r.get("accuracy", {}).get("tolerances"):
        lines.append("tolerances   " + ", ".join(f"{k} {_fmt(v)}" for k, v in r["accuracy"]["tolerances"].items()))
    if r.get("accuracy") and src.get("synthetic"):
        lines.append("             (seeded random weights give flat logits: top-1 agreement understates a trained model's)")
    for name, meta in r["files"].items():
        lines.append(f"file         {name}: {meta['bytes'] / 1e6:.1f} MB sha256 {meta['sha256'][:16]}…")
    lines.append("versions     " + ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items()))
    if src.get("synthetic"):
        lines.append("note         synthetic weights: speed figures are real, generated text is noise")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
