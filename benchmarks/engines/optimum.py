"""The optimum baseline: ORTModelForCausalLM over optimum's own export of the checkpoint, optimized the
way optimum's docs show for GPT-2 (`optimum-cli export onnx --optimize O3`: onnxruntime's transformer
fusions and the GELU approximation; for_gpu on CUDA) and, beside our int8 artifacts on a CPU, its
plain export quantized the way optimum quantizes for a CPU (`optimum-cli onnxruntime quantize --avx512_vnni`
or the instruction set this CPU has: dynamic int8, per tensor, the CLI's defaults)."""

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


# optimum's CPU quantization configs (AutoQuantizationConfig), the first this machine's CPU can run
ISAS = (("avx512_vnni", {"avx512_vnni", "avx512f"}), ("avx512", {"avx512f"}), ("avx2", {"avx2"}))


def cpu_isa() -> str:
    """The optimum quantization config for this CPU: arm64 on ARM, else the widest x86 set it has."""
    import platform

    if platform.machine().lower() in ("aarch64", "arm64"):
        return "arm64"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    except OSError:
        flags = set()
    return next((name for name, need in ISAS if need <= flags), "avx2")


def optimum_int8_model(hf: str, cache: str, log) -> str:
    """optimum's dynamic int8 quantization (ORTQuantizer, what `optimum-cli onnxruntime quantize --ISA`
    runs) of its plain export of checkpoint `hf`, for this CPU's instruction set, made into `cache` once.
    The plain export, because that is what quantizes: onnxruntime's quantizer cannot type the O3 graph's
    fused nodes ("Unable to find data type for weight_name='FullyConnect_MatMul_1_output'")."""
    isa = cpu_isa()
    out = os.path.join(cache, f"optimum-int8-{isa}-" + os.path.basename(hf.rstrip("/")))
    if not os.path.isfile(os.path.join(out, "model.onnx")):
        log(f"exporting and quantizing the optimum int8 baseline to {out} (optimum-cli onnxruntime quantize --{isa})")
        import shutil

        from optimum.onnxruntime import ORTModelForCausalLM, ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        plain, tmp = out + ".plain", out + ".tmp"
        for d in (plain, tmp):
            shutil.rmtree(d, ignore_errors=True)
        ORTModelForCausalLM.from_pretrained(hf, export=True).save_pretrained(plain)
        config = getattr(AutoQuantizationConfig, isa)(is_static=False, per_channel=False)  # the CLI's default: per tensor
        ORTQuantizer.from_pretrained(plain, file_name="model.onnx").quantize(quantization_config=config, save_dir=tmp, file_suffix=None)
        for name in os.listdir(plain):  # the tokenizer and generation config, as optimum-cli's output keeps them
            if name.endswith(".json") and not os.path.exists(os.path.join(tmp, name)):
                shutil.copy(os.path.join(plain, name), tmp)
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
        past = next((i for i in m.graph.input if i.name.startswith("past_key_values")), None)
        kv = past and onnx.helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type).name
        return {"provider": self.device, "weights": {"bytes_per_token": weight_bytes_per_token(m)}, "kv_cache": kv}

