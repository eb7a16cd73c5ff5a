"""Provider choice and the onnxruntime session: what `Engine.load` builds once and shares read-only."""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from dataclasses import dataclass

from .artifact import CONFIG_PROP, Manifest
from .errors import Gpt2OnnxError, one_line
from .spec import MIXED_FILE, PICK_FILE, IONames

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
MAX_THREADS = 1024


# onnxruntime's CUDA attention backends, its provider option sdpa_kernel (a bit mask): 1 = flash
# attention only. Left to choose, onnxruntime 1.31 spends 45-85 ms on the first prompt pass of every
# shape it has not run before (2-3 ms once seen), and a server meets a new prompt length on nearly
# every request; flash alone runs every prompt pass in ~2 ms, new shape or not. Its price: the
# captured decode step 0.61 -> 0.70 ms at batch 1 and 1.48 -> 1.61 ms at 16 (H200, DialoGPT-small
# fp16, one run; 1|2 with memory-efficient attention still paid 5-14 ms per new shape). Flash needs an
# Ampere or newer GPU: older ones fall back to onnxruntime's slower attention (not measured here).
CUDA_OPTIONS = {"sdpa_kernel": "1"}


def cuda_options(cuda_graph: bool) -> dict[str, str]:
    """The CUDA provider options of every session the runtime (and the GPU tools) make."""
    return {**CUDA_OPTIONS, **({"enable_cuda_graph": "1"} if cuda_graph else {})}


@dataclass
class SessionConfig:
    """How the onnxruntime session is built; recorded by the benchmark report."""

    provider: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # intra-op threads; None = one per physical core this process may use
    verify: str = "sha256"  # artifact file checks: sha256 | size
    # capture the decode step in a CUDA graph (CUDA only; None = on where CUDA is used)
    cuda_graph: bool | None = None
    # back the weights onnxruntime copies at load (pre-packed MatMul weights) with 2 MB pages: batch-1
    # decode streams every weight once a token, and 4 KB pages cost a TLB miss each 4 KB of that stream
    # (Linux and the cpu provider only; None = on there; costs 0.1-1 s of load at fp32, see _huge_pages)
    huge_pages: bool | None = None
    # greedy's pick on the device: the artifact's pick.onnx as a second session, run after decode steps
    # of 4 rows or more whose rows all pick greedily, so a step copies ids, not logits, to the host
    # (None = on with the cuda provider where the artifact carries pick.onnx; True also on the CPU,
    # where the logits already lie on the host and it only adds a run: for tests)
    device_pick: bool | None = None
    # the artifact's mixed step graph for a scheduler with a prompt width: a decode step and one row's prompt
    # chunk in one pass (None = on with the cuda provider where the artifact carries mixed.onnx; True also on
    # the CPU, where the concurrent scenario measured it slower; False: never)
    mixed_step: bool | None = None

    def validate(self) -> None:
        if self.provider not in ("auto", *PROVIDERS):
            raise Gpt2OnnxError(f"unknown provider {self.provider!r}; choose auto, cpu or cuda")
        t = self.threads
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= MAX_THREADS):
            raise Gpt2OnnxError(f"threads must be an integer from 1 to {MAX_THREADS} (or unset for one per core), got {t!r}")
        for name in ("cuda_graph", "huge_pages", "device_pick", "mixed_step"):
            if getattr(self, name) not in (None, True, False):
                raise Gpt2OnnxError(f"{name} must be true, false or unset, got {getattr(self, name)!r}")


# The oldest releases that run every graph the exporter writes, and the runtime's pyproject floors
# (tests/test_runtime_edges.py holds the two equal). Found by running each precision's artifact on older
# releases (2026-12-07): onnxruntime 1.22-1.24 refuse the int8 KV cache's GroupQueryAttention at load,
# 1.25-1.26 load it and fail the first pass (their CPU kernel reads the cache as float), 1.27 runs it but
# every row after a batch's first comes out wrong (DialoGPT-small int8, 4 rows: max |dlogit| 0.95 against
# 1.32, 0.07 for 1.28; a tiny export fails its parity check by 10.4), 1.28 runs it right. The export's
# int4 quantizer needs 1.24 (`bits`). tokenizers 0.19 cannot parse the tokenizer.json that 0.20 and later
# write (merges as pairs).
MIN_VERSIONS = {"onnxruntime": (1, 28), "tokenizers": (0, 20)}


def check_libraries() -> None:
    """Refuse, in one line naming the upgrade, an onnxruntime or tokenizers older than MIN_VERSIONS
    (pip enforces the floors; a --no-deps install or a system package does not)."""
    import importlib.metadata

    import onnxruntime
    import tokenizers

    for module in (onnxruntime, tokenizers):
        name, have = module.__name__, getattr(module, "__version__", "0")
        floor = MIN_VERSIONS[name]
        if tuple(int(x) for x in re.findall(r"\d+", have)[:2]) < floor:
            dist = name
            if name == "onnxruntime":  # the CUDA build is its own distribution
                try:
                    importlib.metadata.version("onnxruntime-gpu")
                    dist = "onnxruntime-gpu"
                except importlib.metadata.PackageNotFoundError:
                    pass
            want = ".".join(map(str, floor))
            raise Gpt2OnnxError(f"{name} {have} is older than {want}, the oldest gpt2onnx runs on; "
                                f"pip install -U '{dist}>={want}'")


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
            "use the cpu provider, or install onnxruntime-gpu for cuda (README, GPU)"
        )
    return PROVIDERS[requested]


def check_precision(precision: str, ep: str) -> None:
    """Refuse or warn about precision and provider pairs that run badly."""
    if precision == "int8" and ep == PROVIDERS["cuda"]:
        raise Gpt2OnnxError("int8 artifacts run on the cpu provider only; use the cpu provider, or an int4 or fp16 artifact for cuda")
    if precision == "fp16" and ep == PROVIDERS["cpu"]:
        warnings.warn("fp16 on the CPU provider is no faster than fp32 (its CPU kernels compute through fp32; measured 27.6 vs 26.7 ms/token on DialoGPT-small); "
                      "use an fp32, int8 or int4 artifact for cpu", UserWarning, stacklevel=3)


def build_session(manifest: Manifest, ep: str, sc: SessionConfig, profile_prefix: str | None = None):
    """The inference session; on CUDA with a CUDA graph when every node can be captured, else
    without one (with a warning that says so, and `sc.cuda_graph` set False). `sc.huge_pages` is
    left saying whether the weights were moved to huge pages. `profile_prefix`: onnxruntime's node
    profile is written there (benchmarks/profile.py)."""
    import onnxruntime as ort

    so = _options(sc)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    path = manifest.file("model.onnx")
    if ep == PROVIDERS["cpu"]:
        huge = sc.huge_pages is not False and sys.platform.startswith("linux")
        before = _anon_regions() if huge else None
        session = ort.InferenceSession(path, so, providers=[ep])
        sc.huge_pages = huge and _huge_pages(before) > 0
        return session
    sc.huge_pages = False
    capture = manifest.raw.get("cuda_graph", {})
    if sc.cuda_graph and capture.get("capturable") is False:  # export predicted the copies onnxruntime would refuse
        sc.cuda_graph = False
        copies = capture.get("host_device_copies") or ["?"]
        warnings.warn(f"this artifact's graph needs host<->device copies on CUDA ({copies[0]}"
                      f"{f' and {len(copies) - 1} more' if len(copies) > 1 else ''}), so its decode step cannot be "
                      "captured as a CUDA graph; decoding without one (re-export it with --provider cuda)",
                      UserWarning, stacklevel=3)
    if not sc.cuda_graph:
        return ort.InferenceSession(path, so, providers=[(ep, cuda_options(False))])
    try:
        return ort.InferenceSession(path, so, providers=[(ep, cuda_options(True))])
    except Exception as e:  # e.g. a node placed on the CPU: onnxruntime refuses to capture the graph
        sc.cuda_graph = False
        warnings.warn(f"CUDA graph capture unavailable for this artifact ({str(e).splitlines()[0][:200]}); "
                      "decoding without it", UserWarning, stacklevel=3)
        return ort.InferenceSession(path, so, providers=[(ep, cuda_options(False))])


def physical_cores(cpus: str = "/sys/devices/system/cpu") -> int:
    """The physical cores this process may run on: hyperthread siblings count once (onnxruntime's own
    default and llama.cpp's advice: a second thread per core only contends for the same units), and
    the affinity mask (a container's or taskset's CPUs) is respected. Falls back to the CPUs allowed."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        try:
            with open(f"{cpus}/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())  # the same text for every sibling of one core
        except OSError:
            return len(allowed) or 1
    return len(cores) or 1


def _options(sc: SessionConfig):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = sc.threads or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def build_mixed_session(manifest: Manifest, ep: str, sc: SessionConfig):
    """The session of the artifact's mixed step graph (a decode step and one row's prompt chunk in one
    pass, decoder.py Mixed), on the decoder's provider and captured where the decoder's session is; None
    (with a warning) where CUDA cannot capture it: the scheduler then runs a chunk and a step as two passes.
    A second session: on CUDA it holds a second copy of the weights on the device, on the CPU a second copy
    of the weights onnxruntime pre-packs (fp32); the int8 / int4 weights it maps are model.onnx's."""
    import onnxruntime as ort

    path = manifest.file(MIXED_FILE)
    if ep == PROVIDERS["cpu"]:
        session = ort.InferenceSession(path, _options(sc), providers=[ep])
    else:
        if sc.cuda_graph and manifest.raw.get("cuda_graph", {}).get("mixed", {}).get("capturable") is False:
            warnings.warn("this artifact's mixed step graph needs host<->device copies on CUDA, so it cannot be captured; "
                          "prompt chunks run as passes of their own (re-export it with --provider cuda)", UserWarning, stacklevel=4)
            return None
        try:
            session = ort.InferenceSession(path, _options(sc), providers=[(ep, cuda_options(bool(sc.cuda_graph)))])
        except Exception as e:
            warnings.warn(f"the mixed step graph cannot run here ({one_line(e, 200)}); prompt chunks run as passes of their own",
                          UserWarning, stacklevel=4)
            return None
    names = IONames.from_manifest(manifest.raw["io"])
    want = {names.chunk_ids, names.chunk_mask, names.chunk_position_ids, names.chunk_logits, names.logits,
            *(x for pair in names.chunk_kv(manifest.config["n_layer"]) for x in pair)}
    got = {i.name for i in session.get_inputs()} | {o.name for o in session.get_outputs()}
    if want - got:
        raise Gpt2OnnxError(f"{MIXED_FILE} in {manifest.path} does not match its manifest (missing {sorted(want - got)[:3]}); "
                            "the artifact is mixed up, re-export it")
    return session


def build_pick_session(manifest: Manifest, ep: str, sc: SessionConfig):
    """The session of the artifact's pick graph (ArgMax over a step's logits), on the decoder's provider;
    on CUDA with a CUDA graph where the decoder's session has one (captured once per batch bucket)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # one ArgMax per step: on the CPU a second thread pool would only contend
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    path = manifest.file(PICK_FILE)
    providers = [ep] if ep == PROVIDERS["cpu"] else [(ep, cuda_options(bool(sc.cuda_graph)))]
    session = ort.InferenceSession(path, so, providers=providers)
    # the names the Decoder binds (decoder.py, Pick): the decoder's logits in, the manifest's pick output out
    names = IONames.from_manifest(manifest.raw["io"])
    if [i.name for i in session.get_inputs()] != [names.logits] or [o.name for o in session.get_outputs()] != [names.next_token]:
        raise Gpt2OnnxError(f"{PICK_FILE} in {manifest.path} does not match its manifest (input {names.logits!r}, output "
                            f"{names.next_token!r}); the artifact is mixed up, re-export it")
    return session


_HUGE = 2 << 20  # the x86-64 and arm64 (4 KB base page) transparent huge page


def _anon_regions() -> list[tuple[int, int]]:
    """The process's private anonymous read-write mappings, as (start, end) addresses."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) == 5 and fields[1] == "rw-p":
                    out.append(tuple(int(x, 16) for x in fields[0].split("-")))
    except OSError:
        pass
    return out


def _huge_pages(before: list[tuple[int, int]]) -> int:
    """Collapse the anonymous memory the session's build added into transparent huge pages
    (madvise MADV_COLLAPSE, Linux 6.1+); returns the bytes collapsed, 0 where the kernel refuses.

    onnxruntime allocates pre-packed weights through malloc, which the kernel backs with 4 KB pages
    unless told otherwise (THP is `madvise` on most distributions), and they are written at load,
    so a later MADV_HUGEPAGE would wait for khugepaged; MADV_COLLAPSE copies them into 2 MB pages now.
    Only 2 MB extents outside every mapping of `before` (mappings merge, so a new allocation can
    extend an old one) and wholly resident (mincore) are collapsed, so nothing is faulted in that
    the session did not already hold: peak RSS unchanged. Measured on DialoGPT-small, 2-core Xeon:
    fp32 decode 19.0 -> 17.9 ms/token, the copy of its 445 MB costing ~1 s of load (the kernel
    compacts memory to find 2 MB pages); int8 and int4, whose weights are mostly mapped from the
    file, collapse ~40 MB in ~15 ms and decode at the same speed within noise."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        madvise, mincore = libc.madvise, libc.mincore
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = os.sysconf("SC_PAGE_SIZE")
    if page != 4096:  # 16 or 64 KB base pages (some arm64 kernels): their huge page is not 2 MB
        return 0
    vec = ctypes.create_string_buffer(_HUGE // page)
    runs: list[list[int]] = []  # [start, end) of contiguous extents to collapse
    for lo, hi in _anon_regions():
        for start in range(-(-lo // _HUGE) * _HUGE, hi // _HUGE * _HUGE, _HUGE):
            end = start + _HUGE
            if any(a < end and start < b for a, b in before):
                continue
            if mincore(start, _HUGE, vec) != 0 or any(b & 1 == 0 for b in vec.raw):  # a page not resident
                continue
            if runs and runs[-1][1] == start:
                runs[-1][1] = end
            else:
                runs.append([start, end])
    done = 0
    for start, end in runs:
        if madvise(start, end - start, 25) == 0:  # MADV_COLLAPSE (EINVAL on kernels without it: left as is)
            done += end - start
    return done


ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int8": "tensor(int8)"}


def check_io(manifest: Manifest, session, spec=None) -> None:
    """The graph must have exactly the inputs and outputs the manifest promises, and (given the spec
    read from it) a KV cache of its layers, heads, head size and dtype, and logits over its vocabulary."""
    io = manifest.raw["io"]
    got_in = {i.name for i in session.get_inputs()}
    got_out = {o.name for o in session.get_outputs()}
    if got_in != set(io["inputs"]) or got_out != set(io["outputs"]):
        missing = sorted((set(io["inputs"]) - got_in) | (set(io["outputs"]) - got_out))
        extra = sorted((got_in - set(io["inputs"])) | (got_out - set(io["outputs"])))
        raise Gpt2OnnxError(f"model.onnx in {manifest.path} does not match its manifest (missing {missing[:3]}, "
                            f"unexpected {extra[:3]}); the artifact is mixed up, re-export it")
    if spec is None:
        return
    n = spec.names  # the names the decode core binds, read back from the manifest's io: each must be the graph's
    absent = [x for x in (n.input_ids, n.attention_mask, n.position_ids, *([n.logits_to_keep] if spec.in_place_kv else []))
              if x not in got_in] + ([n.logits] if n.logits not in got_out else [])
    if absent:
        raise Gpt2OnnxError(f"model.onnx in {manifest.path} has no {absent[0]!r}, a name its manifest's io gives; the "
                            "manifest was edited or the artifact mixed up, re-export it")
    built = session.get_modelmeta().custom_metadata_map.get(CONFIG_PROP)
    if built:  # the dims the graph was built with (its weights' shapes): the manifest must say the same
        differ = [f"{k} {v} (manifest {manifest.config.get(k)})" for k, v in json.loads(built).items() if manifest.config.get(k) != v]
        if differ:
            raise Gpt2OnnxError(f"model.onnx in {manifest.path} was built with {', '.join(differ)}; the manifest was edited "
                                "or the artifact mixed up, re-export it")
    inputs = {i.name: i for i in session.get_inputs()}
    for past, _ in spec.kv_names:
        i = inputs.get(past)
        want = ["batch", spec.n_head, "past", spec.head_dim]
        if i is None or i.type != ORT_TYPES[str(spec.kv_dtype)] or len(i.shape) != 4 or i.shape[1::2] != want[1::2]:
            got = "no such input" if i is None else f"{i.type} {i.shape}"
            raise Gpt2OnnxError(f"model.onnx in {manifest.path} does not match its manifest: {past} should be "
                                f"{ORT_TYPES[str(spec.kv_dtype)]} [batch, {spec.n_head}, past, {spec.head_dim}], the graph has "
                                f"{got}; the manifest was edited or the artifact mixed up, re-export it")
    logits = next((o for o in session.get_outputs() if o.name == spec.names.logits), None)
    if logits is not None and logits.shape[-1] != spec.vocab_size:
        raise Gpt2OnnxError(f"model.onnx in {manifest.path} gives logits over {logits.shape[-1]} tokens, its manifest says "
                            f"{spec.vocab_size}; the manifest was edited or the artifact mixed up, re-export it")
