"""CTranslate2: the Hugging Face checkpoint converted by ctranslate2.converters.TransformersConverter
(quantization float32 / int8 / float16), and the runner that times a ctranslate2.Generator.

| our precision | CTranslate2 |
|---|---|
| fp32 | float32 |
| fp16 | float16 (CUDA) |
| int8 | int8 |
| int4 | — (its int4 takes AWQ checkpoints only) |
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time

import numpy as np

from ..clients import SerialClients
from ..machine import nvidia_smi_mb
from ..worker import SystemSpec
from .pytorch import checkpoint_name, local_checkpoint

CT2_TYPES = {"fp32": "float32", "int8": "int8", "fp16": "float16"}


def missing() -> str | None:
    """Why the ctranslate2 baseline cannot run here, or None."""
    for mod in ("ctranslate2", "transformers", "torch"):  # the converter reads the checkpoint with transformers
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install 'gpt2onnx[bench]' or {mod})"
    return None


def unfit(precision: str, provider: str) -> str | None:
    """Why CTranslate2 has no row for this precision and provider, or None."""
    if precision == "int4":
        return "CTranslate2's int4 takes AWQ checkpoints only"
    if precision not in CT2_TYPES or (precision == "fp16" and provider != "cuda"):
        return f"no CTranslate2 {precision} on {provider}"
    return None


def ctranslate2_model(hf: str, cache: str, precision: str, log=print) -> str:
    """The CTranslate2 model directory of checkpoint `hf` at `precision` (a key of CT2_TYPES),
    converted into `cache` once."""
    quant = CT2_TYPES[precision]
    out = os.path.join(cache, f"ctranslate2-{checkpoint_name(hf)}-{quant}")
    if not os.path.isfile(os.path.join(out, "model.bin")):
        log(f"converting {hf} to CTranslate2 {quant} in {out}")
        from ctranslate2.converters import TransformersConverter

        tmp = out + ".tmp"
        TransformersConverter(local_checkpoint(hf)).convert(tmp, quantization=quant, force=True)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
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


class CTranslate2(SerialClients):
    """A CTranslate2 Generator: greedy, exactly `new_tokens` per row (min_length = max_length, so EOS
    is held back as the PyTorch baseline's min_new_tokens does). The prompt runs at once
    (include_prompt_in_result=False); a callback stamps every token. No cache between chat turns."""

    def __init__(self, spec: SystemSpec, threads: int):
        import json

        import ctranslate2

        self.device = "cuda" if spec.provider == "cuda" else "cpu"
        compute = {"fp32": "float32", "fp16": "float16", "int8": "int8"}[spec.precision]
        self.compute = compute
        self.model = ctranslate2.Generator(spec.path, device=self.device, compute_type=compute, intra_threads=threads,
                                           inter_threads=1)
        with open(os.path.join(spec.path, "vocabulary.json"), encoding="utf-8") as f:
            self.tokens = json.load(f)  # id -> the string Generator takes
        with open(os.path.join(spec.path, "config.json"), encoding="utf-8") as f:
            self.eos = self.tokens.index(json.load(f)["eos_token"])
        self.vocab = len(self.tokens)
        self.path = spec.path

    def info(self) -> dict:
        # the cache holds activations, in the compute type's float: int8 quantizes the weights only
        return {"provider": self.device, "weights": {"bytes_per_token": ctranslate2_bytes_per_token(self.path)},
                "kv_cache": "float16" if self.compute == "float16" else "float32"}

    def generate(self, rows, new_tokens: int) -> dict:
        timing, out = self._generate(rows, new_tokens)
        return {**timing, "tokens": out}

    def new_conversation(self) -> None:
        pass

    def reply(self, history: list[int], new_tokens: int) -> tuple[dict, list[int]]:
        timing, out = self._generate([history], new_tokens)
        return {**timing, "cached_tokens": 0}, out[0]

    def _one(self, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        timing, out = self._generate([prompt], n)
        return out[0], timing["token_s"]

    def _generate(self, rows, new_tokens: int) -> tuple[dict, list[list[int]]]:
        """Greedy generation of exactly `new_tokens` per row: (timings as HFGenerate's, new ids per row)."""
        stamps: list[float] = []

        def stamp(step) -> bool:
            if step.batch_id == 0:  # every row steps together: one stamp per step
                stamps.append(time.perf_counter())
            return False

        start = [[self.tokens[i] for i in row] for row in rows]
        t = time.perf_counter()
        res = self.model.generate_batch(start, max_length=new_tokens, min_length=new_tokens, sampling_topk=1, beam_size=1,
                                        include_prompt_in_result=False, callback=stamp)
        total = time.perf_counter() - t
        out = [r.sequences_ids[0] for r in res]
        return {"ttft_s": stamps[0] - t, "step_s": list(np.diff(stamps)), "total_s": total, "token_s": stamps}, out

    def gpu_memory(self) -> dict:
        return nvidia_smi_mb() if self.device == "cuda" else {}

