"""The artifact directory contract: `gpt2onnx.json` (the manifest), `model.onnx`, `tokenizer.json`,
and from fused exports `pick.onnx` (greedy's pick on the device; optional: older artifacts lack it) and,
exported with --mixed-step, `mixed.onnx` (a decode step and a prompt chunk in one pass, reading
model.onnx's weight file).

The export stage writes manifests with `MANIFEST_NAME` and `FORMAT_VERSION` from here; the runtime
reads them with `load_manifest`, which refuses a damaged or mismatched artifact with one line that
says what is wrong and what to do.

Trust: a server loads an artifact once and runs it for weeks, so the load-time check cannot be
skipped. Every file the runtime opens (model.onnx, tokenizer.json, and any external-data file
model.onnx reads its weights from) must be listed in the manifest's `files` with its size and
sha256, by a plain name inside the artifact directory, and is checked on every load (every .onnx
file's external-data locations too).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from dataclasses import dataclass
from typing import Any

from .errors import Gpt2OnnxError

MANIFEST_NAME = "gpt2onnx.json"
FORMAT_VERSION = 4  # 2: fused graphs take a [batch, capacity] mask during decode; 3: seqlens_k per row; 4: fused rows right-padded (no attention bias), logits kept at each row's last real token
PRECISIONS = ("fp32", "fp16", "int8", "int4")
KV_DTYPES = ("float32", "float16", "int8")  # the KV cache's dtype in the graph (manifest io.kv.dtype)
REQUIRED_KEYS = ("format_version", "source", "config", "precision", "provider", "opset", "io", "files")
CONFIG_PROP = "gpt2onnx.config"  # model.onnx's metadata: CONFIG_KEYS as the graph was built (exports since 2026-12-06)
CONFIG_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions", "eos_token_id", "pad_token_id")
VERIFY_MODES = ("sha256", "size")  # there is no "none": an artifact's files are always checked
REQUIRED_FILES = ("model.onnx", "tokenizer.json")  # what the runtime opens, besides external data
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


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
        """The path of a file the manifest lists (and `load_manifest` checked); any other name is refused."""
        if name not in self.raw["files"]:
            raise Gpt2OnnxError(f"the manifest of {self.path} does not list {name}; the artifact is incomplete or "
                                "tampered with, re-export it")
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
        verify: "sha256" checks sizes and hashes of every listed file (about a second per GB);
            "size" checks sizes only, for a quick `gpt2onnx info`. Names, required entries and
            external-data references are checked in both modes; there is no mode that skips checks.

    Raises:
        Gpt2OnnxError: an unknown `verify`; missing directory or manifest, bad JSON, wrong format
            version, missing keys; a `files` list that omits a file the runtime opens, names a path
            outside the directory or has malformed entries; missing, truncated or modified files.
    """
    if verify not in VERIFY_MODES:
        raise Gpt2OnnxError(f"verify must be 'sha256' or 'size', not {verify!r}; an artifact's files are always checked")
    if not isinstance(path, (str, os.PathLike)):  # os.path would take an int as a file descriptor
        raise Gpt2OnnxError(f"the artifact path must be a string or path, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isfile(path):
        raise Gpt2OnnxError(f"{path} is a file; pass the artifact directory that holds it (and {MANIFEST_NAME})")
    if not os.path.isdir(path):
        raise Gpt2OnnxError(f"artifact directory {path} does not exist; create it with `gpt2onnx export MODEL -o {path}`")
    root = os.path.realpath(path)
    mpath = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(mpath):
        raise Gpt2OnnxError(f"{path} has no {MANIFEST_NAME}; it is not a gpt2onnx artifact (re-export it)")
    _check_inside(root, mpath, MANIFEST_NAME, path)
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
    if raw["format_version"] != FORMAT_VERSION or type(raw["format_version"]) is not int:
        raise Gpt2OnnxError(
            f"{path} has format version {raw['format_version']!r}, this gpt2onnx reads {FORMAT_VERSION}; re-export it"
        )
    _check_types(raw, mpath)
    if raw["precision"] not in PRECISIONS:
        raise Gpt2OnnxError(f"{mpath} names unknown precision {raw['precision']!r}; re-export it")
    files = _check_file_list(raw["files"], mpath)
    for name, meta in files.items():
        fpath = os.path.join(path, name)
        _check_inside(root, fpath, name, path)
        if not os.path.isfile(fpath):
            raise Gpt2OnnxError(f"{path} is missing {name}; the artifact is incomplete, re-export it")
        size = os.path.getsize(fpath)
        if size != meta["bytes"]:
            raise Gpt2OnnxError(
                f"{name} in {path} is {size} bytes, the manifest says {meta['bytes']}; the file is truncated or replaced, re-export it"
            )
        if verify == "sha256" and sha256(fpath) != meta["sha256"].lower():
            raise Gpt2OnnxError(f"{name} in {path} does not match its sha256 in the manifest; the file is damaged, re-export it")
    _check_unlisted(path, files)
    _check_external_data(path, files)
    return Manifest(path=os.path.abspath(path), raw=raw)


def _check_types(raw: dict, mpath: str) -> None:
    """The fields the runtime computes with have the types and ranges an export writes (the manifest is
    not hashed: a hand edit must fail here in one line, not inside onnxruntime)."""
    def bad(what: str):
        return Gpt2OnnxError(f"{mpath}: {what}; the manifest was edited or damaged, re-export the artifact")

    if not isinstance(raw["source"], dict):
        raise bad("source is not an object")
    c = raw["config"]
    if not isinstance(c, dict):
        raise bad("config is not an object")
    missing = [k for k in CONFIG_KEYS if k not in c]
    if missing:
        raise bad(f"config lacks {', '.join(missing)}")
    for k in CONFIG_KEYS:
        v = c[k]
        if type(v) is not int or v < (0 if k.endswith("_id") else 1):
            raise bad(f"config.{k} is {v!r}, not a {'non-negative' if k.endswith('_id') else 'positive'} integer")
    if c["n_embd"] % c["n_head"]:
        raise bad(f"config.n_embd {c['n_embd']} is not a multiple of n_head {c['n_head']}")
    for k in ("eos_token_id", "pad_token_id"):
        if c[k] >= c["vocab_size"]:
            raise bad(f"config.{k} {c[k]} is outside the vocabulary 0..{c['vocab_size'] - 1}")
    io = raw["io"]
    if not isinstance(io, dict) or not isinstance(io.get("kv"), dict) or not all(
            isinstance(io.get(k), dict) for k in ("inputs", "outputs")):  # name -> its shape and type
        raise bad("io lacks its inputs, outputs or kv entries")
    if io["kv"].get("dtype") not in KV_DTYPES:
        raise bad(f"io.kv.dtype is {io['kv'].get('dtype')!r}, not one of {', '.join(KV_DTYPES)}")


def _check_file_list(files: Any, mpath: str) -> dict[str, dict[str, Any]]:
    """`files` must map plain names to {"bytes": int, "sha256": 64 hex digits} and list every file the runtime opens."""
    if not isinstance(files, dict):
        raise Gpt2OnnxError(f"{mpath}: `files` is not an object of name -> {{bytes, sha256}}; the artifact is damaged, re-export it")
    for name, meta in files.items():
        problem = _name_problem(name)
        if problem:
            raise Gpt2OnnxError(f"{mpath} lists the file {name!r}, which {problem}; the artifact is tampered with, re-export it")
        if not (isinstance(meta, dict) and type(meta.get("bytes")) is int and meta["bytes"] >= 0
                and isinstance(meta.get("sha256"), str) and _SHA256_HEX.fullmatch(meta["sha256"])):
            raise Gpt2OnnxError(f"{mpath} has a malformed entry for {name} (it needs an integer `bytes` and a 64-hex-digit "
                                f"`sha256`, got {json.dumps(meta)[:80]}); the artifact is damaged, re-export it")
    for name in REQUIRED_FILES:
        if name not in files:
            raise Gpt2OnnxError(f"{mpath} does not list {name}; the artifact is incomplete or tampered with, re-export it")
    return files


def _name_problem(name: str) -> str | None:
    """Why `name` is not a plain file name inside the artifact directory, or None when it is."""
    if not name or "\0" in name:
        return "is not a file name"
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        return "is an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "climbs out of the artifact directory with '..'"
    if "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        return "has a path separator (entries are plain names in the artifact directory)"
    if name in (".", MANIFEST_NAME):
        return "is not a data file (the manifest cannot list itself)"
    return None


def _check_inside(root: str, fpath: str, name: str, path: str) -> None:
    """Refuse a file that is a link resolving outside the artifact directory (`root` is its realpath)."""
    real = os.path.realpath(fpath)
    if os.path.commonpath([root, real]) != root:
        raise Gpt2OnnxError(f"{name} in {path} is a link to {real}, outside the artifact directory; an artifact must "
                            "be self-contained, re-export it")


def _check_unlisted(path: str, files: dict[str, Any]) -> None:
    """Refuse weights-like files the manifest does not list: onnxruntime would read model.onnx.data
    (export/convert.py's name for external data) if the graph pointed at it, unchecked."""
    for name in sorted(os.listdir(path)):
        if name not in files and name != MANIFEST_NAME and (name.endswith(".data") or name.startswith("model.onnx")):
            raise Gpt2OnnxError(f"{path} holds {name}, which the manifest does not list; the model may read weights from "
                                "it, so the artifact is incomplete or tampered with, re-export it")


def _check_external_data(path: str, files: dict[str, Any]) -> None:
    """Every external-data file model.onnx references must be a listed (hence checked, plain-named) file.

    A name-based rule ("*.data must be listed") misses a graph that points at any other file, and
    onnxruntime follows whatever `location` a tensor names, relative to the model's directory. So we
    read the locations from model.onnx itself, with a minimal protobuf walk (the runtime has no onnx
    package). Listed names are plain names, so a location such as "../x" or "/etc/x" is never listed.
    """
    for graph in ("model.onnx", *(name for name in sorted(files) if name.endswith(".onnx") and name != "model.onnx")):
        try:
            locations = _external_data_locations(os.path.join(path, graph))
        except (ValueError, OSError) as e:
            raise Gpt2OnnxError(f"{graph} in {path} is not a readable ONNX file ({e}); the artifact is damaged, re-export it") from None
        for loc in sorted(locations):
            if loc not in files:
                raise Gpt2OnnxError(f"{graph} in {path} reads weights from {loc!r}, which the manifest does not list; "
                                    "the artifact is incomplete or tampered with, re-export it")


# ONNX protobuf fields (onnx.proto) on every path from ModelProto to a TensorProto's external_data.
# Only these are descended into; every other field is skipped by its length, so the walk touches
# the graph's structure and tensor headers and never the weights (the file is mapped, not read).
_MODEL, _TRAINING, _FUNCTION, _GRAPH, _NODE, _ATTR, _SPARSE, _TENSOR, _ENTRY = range(9)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # graph, training_info, functions
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
    _FUNCTION: {7: _NODE},  # node
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _NODE: {5: _ATTR},  # attribute
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},  # t, g, tensors, graphs, sparse_*
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
    _TENSOR: {13: _ENTRY},  # external_data: StringStringEntryProto {key = 1, value = 2}
    _ENTRY: {},
}


def _external_data_locations(model_path: str) -> set[str]:
    """The `location` of every external_data entry of every tensor in the model (and its subgraphs,
    functions and training graphs), whether or not data_location says EXTERNAL.

    Raises:
        ValueError: the file is not a well-formed protobuf message.
    """
    found: set[str] = set()
    with open(model_path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return found
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            stack = [(_MODEL, 0, len(buf))]  # (message kind, start, end) still to walk
            while stack:
                kind, pos, end = stack.pop()
                entry: dict[int, bytes] = {}
                while pos < end:
                    key, pos = _varint(buf, pos, end)
                    field, wire = key >> 3, key & 7
                    if wire == 0:
                        _, pos = _varint(buf, pos, end)
                    elif wire == 1:
                        pos += 8
                    elif wire == 5:
                        pos += 4
                    elif wire == 2:
                        n, pos = _varint(buf, pos, end)
                        if pos + n > end:
                            raise ValueError(f"a field at byte {pos} runs past its message")
                        child = _CHILDREN[kind].get(field)
                        if child is not None:
                            stack.append((child, pos, pos + n))
                        elif kind == _ENTRY and field in (1, 2):
                            entry[field] = buf[pos: pos + n]
                        pos += n
                    else:
                        raise ValueError(f"unexpected protobuf wire type {wire} at byte {pos}")
                    if pos > end:
                        raise ValueError("the file ends inside a field")
                if kind == _ENTRY and entry.get(1) == b"location":
                    found.add(entry.get(2, b"").decode("utf-8", "replace"))
    return found


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("the file ends inside a field")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def describe(m: Manifest) -> str:
    """The manifest in a readable form, for `gpt2onnx info`."""
    try:
        return _describe(m)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as e:  # fields load_manifest does not compute with
        raise Gpt2OnnxError(f"{m.path}: a descriptive field of gpt2onnx.json has an unexpected form ({type(e).__name__}: "
                            f"{str(e)[:80]}); the manifest was edited or damaged, re-export the artifact") from None


def _describe(m: Manifest) -> str:
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
    if r.get("cuda_graph"):
        g = r["cuda_graph"]
        lines.append("cuda graph   " + ("capturable: onnxruntime's CUDA placement needs no host<->device copy" if g["capturable"]
                                       else f"not capturable: {len(g['host_device_copies'])} host<->device copies on CUDA "
                                            f"(first: {g['host_device_copies'][0]})" + _cuda_fix(r['precision'], r['provider'], kv['dtype'])))
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
        lines.append(f"file         {name}: {_size(meta['bytes'])} sha256 {meta['sha256'][:16]}…")
    lines.append("versions     " + ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items()))
    if src.get("synthetic"):
        lines.append("note         synthetic weights: speed figures are real, generated text is noise")
    return "\n".join(lines)


def _cuda_fix(precision: str, provider: str, kv_dtype: str) -> str:
    """What makes a capturable graph of this precision (int8 has no CUDA kernels in onnxruntime; CUDA's
    GroupQueryAttention takes a float16 cache only)."""
    if precision == "int8":
        return "; int8 is for the CPU: export fp16 or int4 with --provider cuda"
    if provider == "cuda" and kv_dtype != "float16":
        return f"; CUDA's GroupQueryAttention takes a float16 cache, not {kv_dtype}: export without --kv-dtype (float16 is CUDA's default)"
    return "; export with --provider cuda"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
