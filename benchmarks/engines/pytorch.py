"""The PyTorch baselines: transformers eager (`pytorch`) and transformers with a static KV cache whose
decode step is compiled on CUDA (`pytorch-compile`), both timed through `generate`; and the Hugging
Face checkpoint every baseline starts from (a synthetic artifact's seeded weights saved once)."""

from __future__ import annotations

import os
import time

import numpy as np

from ..clients import SerialClients
from ..machine import nvidia_smi_mb
from ..worker import SystemSpec
from ..workloads import prompt_rows


def hf_checkpoint(m, cache: str, log) -> str:
    """The Hugging Face checkpoint directory manifest `m`'s artifact came from: its source path, or for a
    synthetic artifact its seeded weights saved into `cache` once (what every baseline runs)."""
    src = m.raw["source"]
    if not src.get("synthetic"):
        return src["checkpoint"]
    name = src["checkpoint"].split(":", 1)[1]
    path = os.path.join(cache, f"hf-{name}-seed{src['seed']}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        log(f"saving {src['checkpoint']} (seed {src['seed']}) as a Hugging Face checkpoint in {path}")
        from gpt2onnx.export import checkpoints

        checkpoints.save_hf_checkpoint(checkpoints.load(src["checkpoint"], src["seed"]), path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def checkpoint_name(hf: str) -> str:
    """A folder name for converted forms of checkpoint `hf` (a path or hub id)."""
    return os.path.basename(hf.rstrip("/")) or "checkpoint"


def local_checkpoint(hf: str) -> str:
    """A local directory for a checkpoint path or hub id (the converters read files)."""
    if os.path.isdir(hf):
        return hf
    from huggingface_hub import snapshot_download

    return snapshot_download(hf)


class HFGenerate(SerialClients):
    """Shared timing for transformers-style `generate`: a stopping criterion stamps every token."""

    model = None
    device = "cpu"

    def _generate_args(self, batch: int) -> dict:
        """Extra `generate` arguments for a batch of this size (a static cache); called inside the grad mode."""
        return {}

    def _grad_mode(self):
        import torch

        return torch.inference_mode()

    def generate(self, rows, new_tokens: int) -> dict:
        timing, out = self._generate(rows, new_tokens)
        return {**timing, "tokens": out[:, len(rows[0]):].tolist()}

    def new_conversation(self) -> None:
        pass  # DialoGPT's usage: every turn calls generate on the whole history, nothing kept

    def reply(self, history: list[int], new_tokens: int) -> tuple[dict, list[int]]:
        timing, out = self._generate([history], new_tokens)
        return {**timing, "cached_tokens": 0}, out[0, len(history):].tolist()

    def _one(self, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        timing, out = self._generate([prompt], n)
        return out[0, len(prompt):].tolist(), timing["token_s"]

    def _generate(self, rows, new_tokens: int):
        """Greedy `generate` of exactly `new_tokens` per row: (timings, output ids [B, S + new]).
        timings: ttft_s, step_s, total_s, and token_s (each token's perf_counter stamp)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        stamps: list[float] = []

        class Stamp(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                if self.device_sync:
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        Stamp.device_sync = self.device == "cuda"
        ids = torch.tensor(rows, device=self.device)
        with self._grad_mode():
            extra = self._generate_args(len(rows))  # made (and a static cache warmed up) before the clock starts
            t = time.perf_counter()
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=self.eos, stopping_criteria=StoppingCriteriaList([Stamp()]),
                                      **extra)
        total = time.perf_counter() - t
        return {"ttft_s": stamps[0] - t, "step_s": list(np.diff(stamps)), "total_s": total, "token_s": stamps}, out.cpu()

    def gpu_memory(self) -> dict:
        if self.device != "cuda":
            return {}
        import torch

        return {"gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20, **nvidia_smi_mb()}


class PyTorch(HFGenerate):
    def __init__(self, spec: SystemSpec, threads: int):
        import torch
        import transformers

        from gpt2onnx.export.checkpoints import dtype_kwarg

        torch.set_num_threads(threads)
        self.device = "cuda" if spec.provider == "cuda" else "cpu"
        dtype = torch.float16 if spec.precision == "fp16" else torch.float32
        self.model = transformers.AutoModelForCausalLM.from_pretrained(spec.path, **dtype_kwarg(dtype)).to(self.device).eval()
        self.eos = self.model.config.eos_token_id
        self.vocab = self.model.config.vocab_size
        self.precision = spec.precision

    def info(self) -> dict:
        params = {n: p for n, p in self.model.named_parameters()}
        # per token: every weight once, except the position table (one row); wte is read whole
        # because the tied LM head multiplies by it
        per_token = sum(p.numel() * p.element_size() for n, p in params.items() if not n.endswith("wpe.weight"))
        return {"provider": self.device, "weights": {"bytes_per_token": per_token}, "kv_cache": str(self.model.dtype).removeprefix("torch.")}


class PyTorchCompiled(PyTorch):
    """What a GPU user runs with transformers for low latency: `generate` with a static KV cache, whose
    decode step `generate` compiles itself (torch.compile, mode "reduce-overhead": CUDA graphs), the
    recipe of transformers' "Optimizing inference" guide. The prompt pass runs eagerly (generate
    compiles decode steps only), so prompts of any length reuse the one compiled step.

    One StaticCache per batch size, of the model's whole position table and kept across calls (reset
    before each): the compiled step then sees one shape per batch size whatever the prompt and reply
    lengths, so compilation and graph capture happen once, in the warm-up this class runs the first
    time it meets a batch size, never in a timed run (a cache sized to each call's length would
    recompile whenever a call needs more positions than the one before).

    On CPU the same static-cache path runs without compiling: `generate` compiles on CUDA only (its
    auto-compile criteria), and on the 2-core development machine inductor took 10-30 s per batch size
    even for the 2-layer test model (forced on there once, transformers 4.57 and 5.17: one graph, no
    recompiles or graph breaks, tokens equal to eager's), too slow for the test suite; the tokens still
    go through the static cache and the warm-up a GPU run uses."""

    # untimed generations each new batch size gets before its first timed one: the first call traces
    # and compiles, the next records the CUDA graphs (cudagraph trees warm up before they record)
    WARMUP_CALLS = 3
    WARMUP_TOKENS = 8

    def __init__(self, spec: SystemSpec, threads: int):
        from transformers import CompileConfig

        super().__init__(spec, threads)
        self.compiled = self.device == "cuda"
        self.caches: dict[int, object] = {}  # batch size -> its StaticCache
        # fullgraph: GPT-2 compiles whole (_can_compile_fullgraph); a graph break fails loudly (the harness
        # drops the baseline with the reason) instead of measuring a step that runs partly eager
        self.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")

    def info(self) -> dict:
        return {**super().info(), "compiled": self.compiled}

    def _grad_mode(self):
        import torch

        # no_grad, as generate itself runs: the kept cache's tensors must stay ordinary tensors, which
        # reset() may write outside inference mode, and inference tensors are not what the recipe compiles
        return torch.no_grad()

    def _generate_args(self, batch: int) -> dict:
        from transformers import StaticCache

        cache = self.caches.get(batch)
        if cache is None:
            cache = self.caches[batch] = StaticCache(config=self.model.config, max_cache_len=self.model.config.n_positions)
            self._warm_up(batch)
        cache.reset()  # zeros, in place: the compiled step keeps reading the same addresses
        # disable_compile off CUDA: see the class docstring
        return {"past_key_values": cache, "compile_config": self.compile_config, "disable_compile": not self.compiled}

    def _warm_up(self, batch: int) -> None:
        rows = prompt_rows(batch, 8, self.vocab)
        for _ in range(self.WARMUP_CALLS):
            self._generate(rows, self.WARMUP_TOKENS)  # the cache exists now: no recursion

