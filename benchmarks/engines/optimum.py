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


def _made_once(out: str, make) -> str:
    """`out`, made by make(tmp) into a temporary directory beside it and renamed, unless it holds a model.onnx."""
    if not os.path.isfile(os.path.join(out, "model.onnx")):
        import shutil

        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        os.replace(tmp, out)
    return out


def plain_model(hf: str, cache: str, log) -> str:
    """optimum's plain export of checkpoint `hf` (`optimum-cli export onnx`), made into `cache` once: what
    both the optimized fp32 model and the int8 one start from."""
    out = os.path.join(cache, "optimum-plain-" + os.path.basename(hf.rstrip("/")))

    def make(tmp: str) -> None:
        from optimum.onnxruntime import ORTModelForCausalLM

        log(f"exporting {hf} with optimum into {out} (optimum-cli export onnx)")
        ORTModelForCausalLM.from_pretrained(hf, export=True).save_pretrained(tmp)

    return _made_once(out, make)


def optimum_model(hf: str, cache: str, log, provider: str = "cpu") -> str:
    """optimum's export of checkpoint `hf`, optimized at OPTIMIZATION for `provider`, made into `cache` once."""
    out = os.path.join(cache, f"optimum-{OPTIMIZATION}-{provider}-" + os.path.basename(hf.rstrip("/")))

    def make(tmp: str) -> None:
        from optimum.onnxruntime import AutoOptimizationConfig, ORTModelForCausalLM, ORTOptimizer

        plain = plain_model(hf, cache, log)
        log(f"optimizing the optimum baseline into {out} (optimum-cli export onnx --optimize {OPTIMIZATION})")
        config = getattr(AutoOptimizationConfig, OPTIMIZATION)(for_gpu=provider == "cuda")
        ORTOptimizer.from_pretrained(ORTModelForCausalLM.from_pretrained(plain)).optimize(config, tmp, file_suffix=None)

    return _made_once(out, make)


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

    def make(tmp: str) -> None:
        import shutil

        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        plain = plain_model(hf, cache, log)
        log(f"quantizing the optimum int8 baseline into {out} (optimum-cli onnxruntime quantize --{isa})")
        config = getattr(AutoQuantizationConfig, isa)(is_static=False, per_channel=False)  # the CLI's default: per tensor
        ORTQuantizer.from_pretrained(plain, file_name="model.onnx").quantize(quantization_config=config, save_dir=tmp, file_suffix=None)
        for name in os.listdir(plain):  # the tokenizer and generation config, as optimum-cli's output keeps them
            if name.endswith(".json") and not os.path.exists(os.path.join(tmp, name)):
                shutil.copy(os.path.join(plain, name), tmp)

    return _made_once(out, make)


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

