"""The llama.cpp and CTranslate2 baselines ("anchors"): the Hugging Face checkpoint the other
baselines run, converted once per precision of the artifacts measured and kept in the bench cache.

| our precision | llama.cpp (GGUF)  | CTranslate2 |
|---|---|---|
| fp32          | F32               | float32     |
| fp16          | —                 | float16 (CUDA) |
| int8          | Q8_0              | int8        |
| int4          | Q4_0              | — (its int4 takes AWQ checkpoints only) |

llama.cpp: `make llamacpp` builds llama-cpp-python from its source distribution and leaves the
llama.cpp sources it vendors in build/llamacpp/llama.cpp. Their convert_hf_to_gguf.py writes F32;
llama.cpp's quantizer (`llama_model_quantize`, what the llama-quantize tool runs) writes Q8_0 and
Q4_0 from it with its defaults. Both run in a child process (`python -m gpt2onnx.benchmarks.anchors`),
so the converter's modules never enter the harness. Two things the converter needs that our
checkpoints may lack are supplied in that process, without touching the vendored files:
- `n_ctx` in config.json (real GPT-2 / DialoGPT configs carry it; older saved checkpoints do not):
  taken from `n_positions`;
- a known pre-tokenizer: a tokenizer.json whose pre-tokenizer is GPT-2's byte-level split (our
  synthetic tokenizer) is declared "gpt-2" when the converter does not recognise its hash.
Beside each model-TYPE.gguf a model-TYPE.json records the bytes of weights read per token.

CTranslate2: ctranslate2.converters.TransformersConverter, quantization float32 / int8 / float16.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from gpt2onnx.runtime.errors import Gpt2OnnxError

GGUF_TYPES = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}
CT2_TYPES = {"fp32": "float32", "int8": "int8", "fp16": "float16"}
# where `make llamacpp` unpacks the llama.cpp sources (the repository's build/ folder)
LLAMACPP_SRC = str(Path(__file__).resolve().parents[1] / "build" / "llamacpp" / "llama.cpp")
LLAMACPP_HINT = "run `make llamacpp` (builds llama-cpp-python from its source distribution once, minutes on 2 cores)"


def missing(kind: str, llamacpp_src: str = LLAMACPP_SRC) -> str | None:
    """Why the `llamacpp` or `ctranslate2` baseline cannot run here, or None."""
    if kind == "ctranslate2":
        for mod in ("ctranslate2", "transformers", "torch"):  # the converter reads the checkpoint with transformers
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not installed (pip install 'gpt2onnx[bench]' or {mod})"
        return None
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed: {LLAMACPP_HINT}"
    if not os.path.isfile(os.path.join(llamacpp_src, "convert_hf_to_gguf.py")):
        return f"no llama.cpp sources (convert_hf_to_gguf.py) in {llamacpp_src}: {LLAMACPP_HINT}, or pass --llamacpp-src"
    for mod in ("transformers", "torch"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (the GGUF converter needs it; pip install 'gpt2onnx[bench]')"
    return None


def ctranslate2_model(hf: str, cache: str, precision: str, log=print) -> str:
    """The CTranslate2 model directory of checkpoint `hf` at `precision` (a key of CT2_TYPES),
    converted into `cache` once."""
    quant = CT2_TYPES[precision]
    out = os.path.join(cache, f"ctranslate2-{_name(hf)}-{quant}")
    if not os.path.isfile(os.path.join(out, "model.bin")):
        log(f"converting {hf} to CTranslate2 {quant} in {out}")
        from ctranslate2.converters import TransformersConverter

        tmp = out + ".tmp"
        TransformersConverter(_local(hf)).convert(tmp, quantization=quant, force=True)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


def gguf_model(hf: str, cache: str, precision: str, llamacpp_src: str = LLAMACPP_SRC, log=print) -> str:
    """The GGUF file of checkpoint `hf` at `precision` (a key of GGUF_TYPES), converted into `cache`
    once: F32 by the vendored converter, the others quantized from the F32 file.

    Raises:
        Gpt2OnnxError: the converter or the quantizer failed (their output's last lines say why).
    """
    gtype = GGUF_TYPES[precision]
    folder = os.path.join(cache, f"llamacpp-{_name(hf)}")
    out = os.path.join(folder, f"model-{gtype}.gguf")
    if os.path.isfile(out) and os.path.isfile(_sidecar(out)):
        return out
    os.makedirs(folder, exist_ok=True)
    if gtype == "F32":
        log(f"converting {hf} to GGUF F32 in {out} (llama.cpp's convert_hf_to_gguf.py)")
        cmd = ["convert", llamacpp_src, _local(hf), out]
    else:
        f32 = gguf_model(hf, cache, "fp32", llamacpp_src, log)
        log(f"quantizing {f32} to {gtype} (llama.cpp's quantizer)")
        cmd = ["quantize", llamacpp_src, f32, out, gtype]
    r = subprocess.run([sys.executable, "-m", "gpt2onnx.benchmarks.anchors", *cmd], capture_output=True, text=True)
    if r.returncode != 0 or not os.path.isfile(out):
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
        raise Gpt2OnnxError(f"llama.cpp {gtype} conversion of {hf} failed: {tail}")
    return out


def ctranslate2_bytes_per_token(model_dir: str) -> int:
    """Bytes of weights a CTranslate2 GPT-2 reads per token: every variable in model.bin (a tied LM
    head is stored once, as an alias) but the position table, of which one row is read.

    model.bin: uint32 version, string name, uint32 revision, uint32 count, then per variable: string
    name, uint8 rank, uint32 dims[rank], uint8 dtype, uint32 bytes, the bytes (strings: uint16
    length with the NUL, the characters, NUL); the aliases follow."""
    import struct

    total = 0
    with open(os.path.join(model_dir, "model.bin"), "rb") as f:
        def string() -> str:
            (n,) = struct.unpack("H", f.read(2))
            return f.read(n)[:-1].decode("utf-8")

        f.read(4)
        string()
        _, count = struct.unpack("II", f.read(8))
        for _ in range(count):
            name = string()
            (rank,) = struct.unpack("B", f.read(1))
            f.seek(4 * rank + 1, os.SEEK_CUR)
            (nbytes,) = struct.unpack("I", f.read(4))
            f.seek(nbytes, os.SEEK_CUR)
            total += 0 if name.endswith("position_encodings/encodings") else nbytes
    return total


def gguf_info(path: str) -> dict:
    """What the conversion recorded beside a GGUF file: {type, bytes_per_token, tensor_types}."""
    with open(_sidecar(path)) as f:
        return json.load(f)


def _name(hf: str) -> str:
    return os.path.basename(hf.rstrip("/")) or "checkpoint"


def _sidecar(gguf: str) -> str:
    return gguf[: -len(".gguf")] + ".json"


def _local(hf: str) -> str:
    """A local directory for a checkpoint path or hub id (the GGUF converter reads files)."""
    if os.path.isdir(hf):
        return hf
    from huggingface_hub import snapshot_download

    return snapshot_download(hf)


# ---- the child process: the vendored converter, patched in memory, and the quantizer ------------

def _gpt2_byte_level(hf: str) -> bool:
    """The checkpoint's tokenizer.json pre-tokenizes as GPT-2 does: ByteLevel with GPT-2's regex."""
    try:
        with open(os.path.join(hf, "tokenizer.json"), encoding="utf-8") as f:
            pre = json.load(f).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return False
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def _convert(src: str, hf: str, out: str) -> None:
    sys.path.insert(0, src)  # the converter imports its `conversion` package and its gguf-py from there
    import convert_hf_to_gguf as cli  # vendored, found through the path above
    from conversion import base

    load_hparams = base.ModelBase.load_hparams

    def with_n_ctx(dir_model, is_mistral_format):
        h = load_hparams(dir_model, is_mistral_format)
        if h.get("model_type") == "gpt2" and "n_ctx" not in h:
            h["n_ctx"] = h["n_positions"]
        return h

    base.ModelBase.load_hparams = staticmethod(with_n_ctx)
    vocab_pre = base.TextModel.get_vocab_base_pre

    def gpt2_when_unknown(self, tokenizer):
        quiet = base.logger.level
        base.logger.setLevel(logging.ERROR)  # the unknown-hash banner, when we answer it below
        try:
            return vocab_pre(self, tokenizer)
        except NotImplementedError:
            if _gpt2_byte_level(hf):
                return "gpt-2"
            raise
        finally:
            base.logger.setLevel(quiet)

    base.TextModel.get_vocab_base_pre = gpt2_when_unknown
    tmp = out + ".tmp"
    sys.argv = ["convert_hf_to_gguf.py", hf, "--outfile", tmp, "--outtype", "f32"]
    cli.main()
    _finish(tmp, out, "F32")


def _quantize(src: str, f32: str, out: str, gtype: str) -> None:
    import ctypes

    import llama_cpp

    sys.path.insert(0, os.path.join(src, "gguf-py"))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[gtype]
    params.nthread = os.cpu_count() or 1
    tmp = out + ".tmp"
    if llama_cpp.llama_model_quantize(f32.encode(), tmp.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize {f32} -> {gtype} failed")
    _finish(tmp, out, gtype)


def _finish(tmp: str, out: str, gtype: str) -> None:
    """Record the weights read per token beside the file (every tensor but the position table, read
    one row per token; GPT-2's LM head is the token embedding, read whole), then move it in place."""
    from gguf import GGUFReader

    tensors = GGUFReader(tmp).tensors
    info = {"type": gtype,
            "bytes_per_token": int(sum(t.n_bytes for t in tensors if t.name != "position_embd.weight")),
            "tensor_types": sorted({t.tensor_type.name for t in tensors})}
    with open(_sidecar(out), "w") as f:
        json.dump(info, f)
    os.replace(tmp, out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m gpt2onnx.benchmarks.anchors", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="HF checkpoint -> GGUF F32 with the vendored converter")
    c.add_argument("src", help="the llama.cpp source directory")
    c.add_argument("hf")
    c.add_argument("out")
    q = sub.add_parser("quantize", help="GGUF F32 -> Q8_0 | Q4_0")
    q.add_argument("src", help="the llama.cpp source directory (its gguf-py reads the result)")
    q.add_argument("f32")
    q.add_argument("out")
    q.add_argument("type", choices=["Q8_0", "Q4_0"])
    a = p.parse_args()
    if a.cmd == "convert":
        _convert(a.src, a.hf, a.out)
    else:
        _quantize(a.src, a.f32, a.out, a.type)
