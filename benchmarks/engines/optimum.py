"""The optimum baseline: ORTModelForCausalLM over optimum's own export of the checkpoint, optimized the
way optimum's docs show for GPT-2 (`optimum-cli export onnx --optimize O3`: onnxruntime's transformer
fusions and the GELU approximation; for_gpu on CUDA)."""

from __future__ import annotations

import os

from ..worker import SystemSpec
from .pytorch import HFGenerate

OPTIMIZATION = "O3"  # optimum's level for GPT-2 in its own docs (O1 basic, O2 + fusions, O3 + GELU approximation)


def optimum_model(hf: str, cache: str, log, provider: str = "cpu") -> str:
    """optimum's export of checkpoint `hf`, optimized at OPTIMIZATION for `provider`, made into `cache` once."""
    out = os.path.join(cache, f"optimum-{OPTIMIZATION}-{provider}-" + os.path.basename(hf.rstrip("/")))
    if not os.path.isfile(os.path.join(out, "model.onnx")):
        log(f"exporting the optimum baseline to {out} (optimum-cli export onnx --optimize {OPTIMIZATION})")
        import shutil

        from optimum.onnxruntime import AutoOptimizationConfig, ORTModelForCausalLM, ORTOptimizer

        plain, tmp = out + ".plain", out + ".tmp"
        ORTModelForCausalLM.from_pretrained(hf, export=True).save_pretrained(plain)
        config = getattr(AutoOptimizationConfig, OPTIMIZATION)(for_gpu=provider == "cuda")
        ORTOptimizer.from_pretrained(ORTModelForCausalLM.from_pretrained(plain)).optimize(config, tmp, file_suffix=None)
        shutil.rmtree(plain)
        os.replace(tmp, out)
    return out


class Optimum(HFGenerate):
    def __init__(self, spec: SystemSpec, threads: int):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        provider = "CUDAExecutionProvider" if spec.provider == "cuda" else "CPUExecutionProvider"
        self.device = "cuda" if spec.provider == "cuda" else "cpu"
        self.model = ORTModelForCausalLM.from_pretrained(spec.path, session_options=so, provider=provider)
        self.eos = self.model.config.eos_token_id
        self.vocab = self.model.config.vocab_size
        self.path = spec.path

    def info(self) -> dict:
        import onnx

        from gpt2onnx.export.graph import weight_bytes_per_token

        m = onnx.load(os.path.join(self.path, "model.onnx"), load_external_data=False)
        return {"provider": self.device, "weights": {"bytes_per_token": weight_bytes_per_token(m)}}

