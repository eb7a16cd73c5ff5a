"""Provider choice and the onnxruntime session: what `Engine.load` builds once and shares read-only."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from .artifact import Manifest
from .errors import Gpt2OnnxError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
MAX_THREADS = 1024


@dataclass
class SessionConfig:
    """How the onnxruntime session is built; recorded by the benchmark report."""

    provider: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # intra-op threads; None = one per core
    verify: str = "sha256"  # artifact file checks: sha256 | size
    # capture the decode step in a CUDA graph (CUDA only; None = on where CUDA is used)
    cuda_graph: bool | None = None

    def validate(self) -> None:
        if self.provider not in ("auto", *PROVIDERS):
            raise Gpt2OnnxError(f"unknown provider {self.provider!r}; choose auto, cpu or cuda")
        t = self.threads
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= MAX_THREADS):
            raise Gpt2OnnxError(f"threads must be an integer from 1 to {MAX_THREADS} (or unset for one per core), got {t!r}")
        if self.cuda_graph not in (None, True, False):
            raise Gpt2OnnxError(f"cuda_graph must be true, false or unset, got {self.cuda_graph!r}")


def select_provider(requested: str) -> str:
    """Map cpu | cuda | auto to the name of an available onnxruntime execution provider."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested == "auto":
        return PROVIDERS["cuda"] if PROVIDERS["cuda"] in available else PROVIDERS["cpu"]
    if requested not in PROVIDERS:
        raise Gpt2OnnxError(f"unknown provider {requested!r}; choose auto, cpu or cuda")
    if PROVIDERS[requested] not in available:
        raise Gpt2OnnxError(
            f"{requested} is not available in this onnxruntime (available: {', '.join(available)}); "
            "use --provider cpu, or install onnxruntime-gpu for cuda"
        )
    return PROVIDERS[requested]


def check_precision(precision: str, ep: str) -> None:
    """Refuse or warn about precision and provider pairs that run badly."""
    if precision == "int8" and ep == PROVIDERS["cuda"]:
        raise Gpt2OnnxError("int8 artifacts run on the cpu provider only; use --provider cpu, or an int4 or fp16 artifact for cuda")
    if precision == "fp16" and ep == PROVIDERS["cpu"]:
        warnings.warn("fp16 on the CPU provider is no faster than fp32 (its CPU kernels compute through fp32; measured 27.6 vs 26.7 ms/token on DialoGPT-small); "
                      "use an fp32, int8 or int4 artifact for cpu", UserWarning, stacklevel=4)


def build_session(manifest: Manifest, ep: str, sc: SessionConfig):
    """The inference session; on CUDA with a CUDA graph when every node can be captured, else
    without one (with a warning that says so, and `sc.cuda_graph` set False)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = sc.threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    path = manifest.file("model.onnx")
    if not sc.cuda_graph:
        return ort.InferenceSession(path, so, providers=[ep])
    try:
        return ort.InferenceSession(path, so, providers=[(ep, {"enable_cuda_graph": "1"})])
    except Exception as e:  # e.g. a node placed on the CPU: onnxruntime refuses to capture the graph
        sc.cuda_graph = False
        warnings.warn(f"CUDA graph capture unavailable for this artifact ({str(e).splitlines()[0][:200]}); "
                      "decoding without it", UserWarning, stacklevel=4)
        return ort.InferenceSession(path, so, providers=[ep])


def check_io(manifest: Manifest, session) -> None:
    """The graph must have exactly the inputs and outputs the manifest promises."""
    io = manifest.raw["io"]
    got_in = {i.name for i in session.get_inputs()}
    got_out = {o.name for o in session.get_outputs()}
    if got_in != set(io["inputs"]) or got_out != set(io["outputs"]):
        missing = sorted((set(io["inputs"]) - got_in) | (set(io["outputs"]) - got_out))
        extra = sorted((got_in - set(io["inputs"])) | (got_out - set(io["outputs"])))
        raise Gpt2OnnxError(f"model.onnx in {manifest.path} does not match its manifest (missing {missing[:3]}, "
                            f"unexpected {extra[:3]}); the artifact is mixed up, re-export it")
