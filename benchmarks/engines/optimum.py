"""The optimum baseline: ORTModelForCausalLM over optimum's own export of the checkpoint."""

from __future__ import annotations

import os

from ..worker import SystemSpec
from .pytorch import HFGenerate


def optimum_model(hf: str, cache: str, log) -> str:
    """optimum's export of checkpoint `hf` (its defaults), made into `cache` once."""
    out = os.path.join(cache, "optimum-" + os.path.basename(hf.rstrip("/")))
    if not os.path.isfile(os.path.join(out, "model.onnx")):
        log(f"exporting the optimum baseline to {out} (optimum's defaults)")
        from optimum.onnxruntime import ORTModelForCausalLM

        tmp = out + ".tmp"
        ORTModelForCausalLM.from_pretrained(hf, export=True).save_pretrained(tmp)
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

