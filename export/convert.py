"""The export pipeline: load -> build graph -> (quantize) -> parity -> write the artifact atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import functools
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from gpt2onnx.runtime.artifact import FORMAT_VERSION, KV_DTYPES, MANIFEST_NAME, PRECISIONS, sha256
from gpt2onnx.runtime.errors import Gpt2OnnxError
from gpt2onnx.runtime.session import PROVIDERS, check_libraries
from gpt2onnx.runtime.spec import MIXED_FILE, PICK_FILE

from . import checkpoints, graph, parity, quantize

ALIGN = 4096  # external weights start on page boundaries (mmap); see _weight_file
NAME_MAX = 255  # bytes in one file name (Linux, macOS)


@dataclass
class ExportOptions:
    model: str  # synthetic:NAME, a checkpoint directory, or a hub id
    output: str  # the artifact directory to create
    precision: str = "fp32"
    provider: str = "cpu"  # the execution provider the artifact is built for
    fuse: bool = True
    seed: int = 0  # weights of synthetic checkpoints
    force: bool = False  # replace an existing output directory
    parity_steps: int = 3
    # KV cache dtype; None = int8 for int8/int4 on the CPU provider, else the activations'. int8 (one calibrated scale per layer and tensor)
    # reads a quarter of fp32's bytes per token: at context 900 beside int8 weights that is the
    # difference between 1.44x and 1.18x the context-50 step time, with no measurable accuracy cost
    # (benchmarks in the issue notes). float16 under fp32 activations halves the bytes instead.
    kv_dtype: str | None = None
    enforce_tolerances: bool = True  # False only for measuring sweeps (benchmarks/quant_sweep.py)
    int8: quantize.Int8Config = field(default_factory=quantize.Int8Config)
    int4: quantize.Int4Config = field(default_factory=quantize.Int4Config)
    # also write mixed.onnx: a decode step and one row's prompt chunk in one pass, for the scheduler
    # (runtime/decoder.py, Mixed); its weights are model.onnx's, read from the same data file
    mixed: bool = False


def export(opts: ExportOptions, log: Callable[[str], None] = print) -> str:
    """Export `opts.model` to the artifact directory `opts.output`; returns that path.

    Raises:
        Gpt2OnnxError: bad options, an existing output without `force`, a checkpoint that cannot be
            loaded, or parity outside the precision's tolerance (nothing is written then).
    """
    _check_options(opts)
    check_libraries()  # below the floors the quantizers and the parity check fail on their own, unclearly
    dtype = _activation_dtype(opts.precision)
    opts = dataclasses.replace(opts, kv_dtype=_kv_dtype(opts))
    log(f"loading {opts.model}")
    ckpt = checkpoints.load(opts.model, opts.seed)
    notes: list[str] = []
    cfg = graph.model_config(ckpt.model.config, getattr(ckpt.model, "generation_config", None), opts.fuse, notes)
    for n in notes:
        log(n)
    text = [i for i in ckpt.tokenizer.encode(checkpoints.sample_text()).ids if i < cfg.vocab_size]
    log(f"building the {'fused' if opts.fuse else 'plain'} {dtype} graph: {cfg.n_layer} layers, width {cfg.n_embd}")
    scales = None
    if opts.kv_dtype == "int8":  # calibrated on the shipped text's first n_positions tokens
        scales = parity.kv_scales(ckpt.model, text[: cfg.n_positions])
    # PyTorch's side of the checks, taken first: the model is then dropped once the float graphs hold
    # its weights, before onnxruntime's quantizers and the graph's own session need the memory
    rows = _parity_prompts(text, cfg)
    decode_ref = parity.decode_reference(ckpt.model, cfg, rows, opts.parity_steps)
    forced_ref = parity.teacher_references(ckpt.model, cfg, text)
    w = graph.weights(ckpt.model, cfg)  # views of the model's tensors (the head's transpose a copy)
    ckpt.model = None

    quantized = opts.precision in ("int8", "int4")
    _import_writers(quantized)
    out = os.path.abspath(opts.output)
    made = _missing_parents(out)  # created here, removed again when the export fails or is interrupted
    tmp = None
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        # the name shortened: the temporary name (and its ".old" for --force) must fit NAME_MAX as the artifact's does
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)[:32]}.tmp-", dir=os.path.dirname(out))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the artifact gets the user's usual mode
        model_path = os.path.join(tmp, "model.onnx")
        mixed_path = os.path.join(tmp, MIXED_FILE) if opts.mixed else None
        # the float graphs, each weight written into the data file as the graph takes it (the model holds
        # none), then the checkpoint's weights dropped: onnxruntime's quantizers read the float files
        float_dir = os.path.join(tmp, "float") if quantized else tmp
        os.makedirs(float_dir, exist_ok=True)
        float_model = os.path.join(float_dir, "model.onnx")
        _write_graph(functools.partial(graph.build, cfg, w, fused=opts.fuse, dtype=dtype, kv_dtype=opts.kv_dtype,
                                       kv_scales=scales), float_model)
        if mixed_path:
            log("building the mixed step graph (a decode step and a prompt chunk in one pass)")
            _write_graph(functools.partial(graph.build, cfg, w, dtype=dtype, kv_dtype=opts.kv_dtype, kv_scales=scales, mixed=True),
                         os.path.join(float_dir, MIXED_FILE), share=float_model)
        del w
        quant = None
        if quantized:
            quant = _quantize(float_model, model_path, opts, log)
            if mixed_path:
                _quantize(os.path.join(float_dir, MIXED_FILE), mixed_path, opts, log, share=model_path)
            shutil.rmtree(float_dir)
        log("checking parity and accuracy against PyTorch fp32")
        session = parity.ort_session(model_path)
        figures = parity.decode_parity(session, decode_ref, cfg, fused=opts.fuse)
        accuracy = parity.teacher_forced(session, forced_ref, cfg)
        tol = parity.tolerances(opts.precision, opts.kv_dtype, ckpt.source, opts.int4.head_bits)
        problem = parity.check(opts.precision, figures, accuracy, tol)
        mixed_figures = None
        if mixed_path:  # the mixed pass against the model's own chunk and step passes, same tolerance
            mixed_figures = parity.mixed_parity(session, mixed_path, cfg, opts.kv_dtype, rows)
            if problem is None and not mixed_figures["max_abs_logit_diff"] <= tol["max_abs_logit_diff"]:
                problem = (f"the mixed step graph's logits differ from the model's by {mixed_figures['max_abs_logit_diff']:.3g}, "
                           f"not within the {opts.precision} tolerance {tol['max_abs_logit_diff']:g}")
        if problem and opts.enforce_tolerances:
            raise Gpt2OnnxError(f"accuracy check failed: {problem}; nothing was written")
        # measured, not assumed: MatMulNBits' one-row and many-row kernels may sum in other orders (through
        # the runtime's decode core, which runs fused graphs only)
        invariance = parity.batch_invariance(session, cfg, opts.kv_dtype, _batch_prompts(text, cfg)) if opts.fuse else None
        del session  # one session of model.onnx for every check above, freed before the files are written
        ckpt.tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        if opts.fuse:  # greedy's pick where the logits lie (runtime/decoder.py, Pick)
            import onnx

            onnx.save_model(graph.build_pick(), os.path.join(tmp, PICK_FILE))
        manifest = _manifest(opts, ckpt, cfg, model_path, tmp)
        manifest["parity"] = {"decode_vs_pytorch_fp32": {**figures, "tolerance": tol["max_abs_logit_diff"]}}
        if mixed_figures:
            manifest["parity"]["mixed_vs_model"] = {**mixed_figures, "tolerance": tol["max_abs_logit_diff"]}
        manifest["accuracy"] = {"teacher_forced": accuracy, "tolerances": tol}
        manifest["parity"]["batch_invariance"] = invariance
        manifest["quantization"] = quant and {**quant, "batch_invariant": invariance and invariance["invariant"]}
        with open(os.path.join(tmp, MANIFEST_NAME), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
        _replace_dir(tmp, out, opts.force)
    except BaseException as e:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in made:  # deepest first; only while empty
            with contextlib.suppress(OSError):
                os.rmdir(d)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # the disk, not a bug
            raise Gpt2OnnxError(f"cannot write {out}: {e.strerror}; free space there or choose another -o "
                                "(nothing was written)") from None
        raise
    g = manifest["cuda_graph"]
    if opts.provider == "cuda" and not g["capturable"]:  # asked for on purpose perhaps (a float32 cache), but say what it costs
        log(f"note: on CUDA this graph needs {len(g['host_device_copies'])} host<->device copies (first: "
            f"{g['host_device_copies'][0]}), so its decode step cannot be captured as a CUDA graph; `gpt2onnx info` says why")
    log(f"wrote {out}: decode max |Δlogit| {figures['max_abs_logit_diff']:.2e}; teacher-forced over {accuracy['tokens']} tokens: "
        f"mean KL {accuracy['mean_kl']:.2e}, top-1 {accuracy['top1_agreement']:.3f}, perplexity {accuracy['perplexity_change_pct']:+.2f}%")
    return out


def _activation_dtype(precision: str) -> str:
    return "float16" if precision == "fp16" else "float32"


def _kv_dtype(opts: ExportOptions) -> str:
    """The KV cache dtype: the plain graph concatenates a cache in the activations' dtype; the int8
    cache is measured on the CPU provider only, so CUDA artifacts keep a float cache, float16 even
    under float32 activations (fp32, int4): onnxruntime's CUDA GroupQueryAttention takes float16 /
    bfloat16 only, and a float32 one would run on the CPU provider with copies around it every layer."""
    if not opts.fuse:
        return _activation_dtype(opts.precision)
    if opts.kv_dtype:
        return opts.kv_dtype
    if opts.provider == "cuda":
        return "float16"
    return "int8" if opts.precision in ("int8", "int4") else _activation_dtype(opts.precision)


def _check_options(opts: ExportOptions) -> None:
    if opts.precision not in PRECISIONS:
        raise Gpt2OnnxError(f"unknown precision {opts.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if opts.precision == "int8" and opts.provider == "cuda":
        raise Gpt2OnnxError("int8 artifacts run on the cpu provider only (onnxruntime has no CUDA DynamicQuantizeMatMul); "
                            "use --precision int4 or fp16 for cuda")
    if opts.kv_dtype not in (None, *KV_DTYPES):
        raise Gpt2OnnxError(f"unknown KV cache dtype {opts.kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    if opts.kv_dtype == "int8" and opts.precision == "fp16":
        raise Gpt2OnnxError("an int8 KV cache is for the CPU precisions; use --kv-dtype float16 or drop it for fp16")
    if not opts.fuse and opts.kv_dtype not in (None, _activation_dtype(opts.precision)):
        raise Gpt2OnnxError("--kv-dtype needs the fused graph; drop --no-fuse")
    if opts.mixed and not opts.fuse:
        raise Gpt2OnnxError("--mixed-step needs the fused graph; drop --no-fuse")
    if opts.mixed and opts.precision == "int8" and opts.int8.method == "dynamic":
        # one activation scale over the step's rows and the chunk's tokens: a row's logits would move with
        # its pass-mates, and with the columns the idle chunk row reads before the chunk writes them
        raise Gpt2OnnxError("--mixed-step needs per-row activations: int8's dynamic quantization scales a pass's rows "
                            "together; add --int8-method nbits, or export fp32 or int4")
    if opts.precision == "int4":
        opts.int4.check()  # before the checkpoint loads
    if opts.provider not in PROVIDERS:
        raise Gpt2OnnxError(f"unknown provider {opts.provider!r}; choose one of {', '.join(PROVIDERS)}")
    if isinstance(opts.seed, bool) or not isinstance(opts.seed, int) or not 0 <= opts.seed < 2**63:
        raise Gpt2OnnxError(f"--seed (synthetic weights) must be an integer from 0 to {2**63 - 1}, got {opts.seed!r}"[:200])
    _check_output(opts.output, opts.force)


def _check_output(output: str, force: bool) -> None:
    """Refuse an output location the artifact cannot be written to, before any work: an existing
    file or directory (without `force`), a path under a regular file, or a parent that cannot be
    written (the artifact is built in a temporary directory beside `output`, then renamed)."""
    if not output:
        raise Gpt2OnnxError("-o is empty; name the artifact directory to write")
    if len(os.path.basename(os.path.abspath(output)).encode()) > NAME_MAX:
        raise Gpt2OnnxError(f"-o's last name is longer than the {NAME_MAX} bytes a file name may have; choose a shorter one")
    if os.path.lexists(output) and not os.path.isdir(output):
        raise Gpt2OnnxError(f"{output} is a file; choose a directory path for -o")
    out, cwd = os.path.realpath(output), os.path.realpath(os.getcwd())
    if cwd == out or cwd.startswith(out.rstrip(os.sep) + os.sep):
        raise Gpt2OnnxError(f"{output} is the current directory or holds it; choose a new directory for -o")
    if os.path.exists(output) and not force:
        raise Gpt2OnnxError(f"{output} already exists; pass --force to replace it or choose another -o")
    if os.path.exists(output) and os.listdir(output) and not os.path.isfile(os.path.join(output, MANIFEST_NAME)):
        # --force replaces an artifact, never a directory of something else
        raise Gpt2OnnxError(f"{output} is not empty and holds no {MANIFEST_NAME}: not an artifact, so --force will not "
                            "replace it; choose another -o or remove it yourself")
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.lexists(parent):  # the nearest existing ancestor: export creates the rest
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise Gpt2OnnxError(f"cannot create {output}: {parent} is a file, not a directory; choose another -o")
    try:  # os.access alone says yes to root on a read-only filesystem
        tempfile.TemporaryDirectory(prefix=".gpt2onnx-probe-", dir=parent).cleanup()
    except OSError as e:
        raise Gpt2OnnxError(f"cannot create {output}: {parent} is not writable ({e.strerror}); choose another -o") from None


def _parity_prompts(ids: list[int], cfg) -> list[list[int]]:
    """Two prompts of different lengths from the shipped text's ids, so the batch is padded."""
    n = min(24, cfg.n_positions // 4)
    return [ids[:n], ids[n: n + n // 2]]


def _batch_prompts(ids: list[int], cfg) -> list[list[int]]:
    """Four prompts of different lengths from the shipped text's ids (a padded batch of four), and where the
    context allows two more: 2 x head_dim + 1 tokens, whose pass alone would leave its last row alone in a
    block of onnxruntime's CPU attention (runtime/decoder.py, Decoder.lone_tail), beside four tokens more."""
    n = min(24, cfg.n_positions // 4)
    rows = [ids[:n], ids[n: n + n // 2], ids[2 * n: 2 * n + 3], ids[3 * n: 4 * n - 5]]
    tail = 2 * cfg.head_dim + 1
    if tail + 4 + 4 <= cfg.n_positions and len(ids) >= tail + 4:  # batch_invariance's capacity: the longest + 4
        rows += [ids[:tail], ids[:tail + 4]]
    return rows


def _quantize(float_path: str, path: str, opts: ExportOptions, log, share: str | None = None) -> dict:
    """Quantize the float graph at `float_path` (onnxruntime's quantizers read it from the file) and
    save it at `path`; returns the quantization's manifest entry."""
    log(f"quantizing to {opts.precision}")
    if opts.precision == "int8":
        model, quant = quantize.quantize_int8(float_path, opts.int8)
    else:
        model, quant = quantize.quantize_int4(float_path, opts.int4)
    _save_onnx(model, path, share)
    return quant


def _save_onnx(model, path: str, share: str | None = None) -> None:
    """`model` (weights inside it: a quantizer's output) in `path`, its weights in `path`.data, laid out
    by `_weight_file`; each tensor's bytes leave the model as they are written."""
    import onnx
    from onnx import numpy_helper

    with _weight_file(path, share) as external:
        for t in model.graph.initializer:
            has_raw = t.HasField("raw_data")
            raw = t.raw_data if has_raw else numpy_helper.to_array(t).tobytes()
            if external(t.name, raw, t) is None:  # under 4 KiB: stays in the model as the quantizer wrote it
                continue
            if not has_raw:  # quantizers write some scales as typed fields; the file took their bytes
                for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    t.ClearField(field)
            t.ClearField("raw_data")
    onnx.save_model(model, path)


def _import_writers(quantized: bool) -> None:
    """Imports what writes and checks the artifact before its directory exists. onnx's extension is a nanobind
    module whose import runs Python (its enums): a Ctrl-C / SIGTERM landing there cannot unwind through it and
    aborts the process (std::terminate, exit -6), past the cleanup that removes the half-written directory."""
    import onnx  # noqa: F401
    import onnx.helper  # noqa: F401
    import onnx.numpy_helper  # noqa: F401
    import onnxruntime  # noqa: F401

    if quantized:  # the MatMulNBits quantizer's module brings onnxruntime.quantization (quantize_dynamic) with it
        quantize.nbits_quantizer()


def _write_graph(build: Callable, path: str, share: str | None = None) -> None:
    """The graph `build(external=...)` returns (graph.build, its other arguments bound) in `path`, each weight written
    into `path`.data by `_weight_file` as the graph takes it: the model never holds the weights' bytes,
    so building and writing it costs about nothing beyond the checkpoint's own tensors (it held a
    second copy of them until the model was saved: DialoGPT-large fp32's export peaked at 7.6 GB)."""
    import onnx

    with _weight_file(path, share) as external:
        model = build(external=lambda name, arr, tensor: external(name, arr.reshape(-1).view(np.uint8), tensor))
    onnx.save_model(model, path)


@contextlib.contextmanager
def _weight_file(path: str, share: str | None = None):
    """Yields `external(name, raw, tensor)`, which appends a weight's bytes (raw: bytes or a uint8 array)
    to `path`.data, points the TensorProto `tensor` at them (external data) and returns where they went,
    (file name, offset, length); None for a tensor under 4 KiB, which stays in the model.

    Every tensor of 4 KiB or more starts on a 4096-byte boundary: onnxruntime memory-maps aligned
    external initializers on the CPU instead of copying them into its own buffers, so a process holds
    one copy of the weights (in the page cache, shared by every process that loads the artifact), and
    a table only gathered from (the token embedding) costs resident memory only for the rows it reads.

    `share`: a graph saved before whose weights this one reuses: a tensor with the same name and bytes
    there points into that graph's data file instead of being written again (the mixed step graph and
    model.onnx: one copy on disk, and in the page cache where onnxruntime maps it). A data file left
    empty (every weight shared) is removed."""
    import onnx

    shared = _external_tensors(share) if share else {}
    data = path + ".data"
    with open(data, "wb") as f:
        def external(name: str, raw, tensor) -> tuple[str, int, int] | None:
            if len(raw) < ALIGN:
                return None
            if name in shared and _same_bytes(shared[name], raw):
                where = shared[name][:3]
            else:
                f.write(b"\0" * (-f.tell() % ALIGN))
                where = (os.path.basename(data), f.tell(), len(raw))
                f.write(raw)
            del tensor.external_data[:]
            for key, value in zip(("location", "offset", "length"), where):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            return where

        yield external
    if os.path.getsize(data) == 0:
        os.remove(data)


def _external_tensors(path: str) -> dict[str, tuple[str, int, int, str]]:
    """name -> (location, offset, length, data file path) of the external tensors of the graph at `path`."""
    import onnx

    out = {}
    for t in onnx.load(path, load_external_data=False).graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            e = {x.key: x.value for x in t.external_data}
            out[t.name] = (e["location"], int(e.get("offset", 0)), int(e["length"]), os.path.join(os.path.dirname(path), e["location"]))
    return out


def _same_bytes(ext: tuple[str, int, int, str], raw) -> bool:
    """Whether the shared tensor `ext` holds exactly `raw` (bytes or a uint8 array)."""
    _, offset, length, file = ext
    if length != len(raw):
        return False
    with open(file, "rb") as f:
        f.seek(offset)
        return f.read(length) == memoryview(raw)


def _missing_parents(path: str) -> list[str]:
    """The directories above `path` that do not exist yet, deepest first."""
    out = []
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        out.append(parent)
        parent = os.path.dirname(parent)
    return out


def _replace_dir(tmp: str, out: str, force: bool) -> None:
    """Rename `tmp` to `out`; with `force`, the old directory (or a link to it) is moved aside first, then
    removed. Ctrl-C, SIGTERM and SIGHUP wait until this is done: between the two renames `out` holds
    neither the old artifact nor the new one, and the caller's clean-up would delete the new one."""
    if os.path.exists(out) and not force:
        raise Gpt2OnnxError(f"{out} already exists; pass --force to replace it")
    with _signals_deferred():
        if os.path.lexists(out):
            old = tmp + ".old"
            os.rename(out, old)
            os.rename(tmp, out)
            if os.path.islink(old):  # -o named a link to an artifact: the link is replaced, its target kept
                os.unlink(old)
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT, SIGTERM and SIGHUP that arrive inside the block are raised again when it ends, under the
    handlers the caller had. Python runs handlers on the main thread only, and only it may set them
    (masking the signal in one thread would not do: the kernel hands it to any other thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    saved = {s: signal.signal(s, lambda n, _: got.append(n)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if got:
            signal.raise_signal(got[0])


def _manifest(opts: ExportOptions, ckpt, cfg: graph.ModelConfig, model_path: str, tmp: str) -> dict:
    import onnx

    m = onnx.load(model_path, load_external_data=False)
    kv_dtype = opts.kv_dtype  # resolved by _kv_dtype
    io = {
        "inputs": {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name for i in m.graph.input},
        "outputs": {o.name: onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type).name for o in m.graph.output},
        "kv": {
            "layout": "BNSH",  # [batch, heads, sequence, head_dim]
            "dtype": kv_dtype,
            **({"quantization": "int8, one scale per layer and tensor, calibrated on the shipped text (max |x| x 1.25 / 127)"}
               if kv_dtype == "int8" else {}),
            # fused graphs write the cache in place when past and present are bound to one buffer
            "shared_buffer": bool(opts.fuse),
            **graph.NAMES.manifest()["kv"],
        },
        "names": graph.NAMES.manifest()["names"],
        "logits_to_keep": graph.NAMES.logits_to_keep,
        **({"pick": graph.NAMES.manifest()["pick"]} if opts.fuse else {}),
        **({"mixed": graph.NAMES.manifest()["mixed"]} if opts.mixed else {}),
    }
    # every file the export wrote (model.onnx, model.onnx.data when the weights go external,
    # tokenizer.json, pick.onnx): the runtime refuses a manifest that omits a file it opens (runtime/artifact.py)
    files = {}
    for name in sorted(os.listdir(tmp)):
        p = os.path.join(tmp, name)
        files[name] = {"bytes": os.path.getsize(p), "sha256": sha256(p)}
    return {
        "format": "gpt2onnx",
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"checkpoint": ckpt.source, "synthetic": ckpt.synthetic, "seed": ckpt.seed if ckpt.synthetic else None},
        "config": {**asdict(cfg), "head_dim": cfg.head_dim},
        "precision": opts.precision,
        "provider": opts.provider,
        "fused": opts.fuse,
        "opset": graph.OPSET,
        "io": io,
        "fused_ops": graph.fused_counts(m),
        # what onnxruntime runs after its own graph optimizations (e.g. MatMulInteger -> DynamicQuantizeMatMul)
        "runtime_ops": graph.runtime_counts(model_path),
        # where onnxruntime's CUDA provider would place the graph, and whether it could then capture
        # the decode step as a CUDA graph (no host<->device copies); the runtime reads `capturable`
        "cuda_graph": {**_cuda_placement(m), **({"mixed": _cuda_placement(onnx.load(os.path.join(tmp, MIXED_FILE), load_external_data=False))}
                                                 if opts.mixed else {})},
        "weights": {"bytes_per_token": graph.weight_bytes_per_token(m)},
        "files": files,
        "versions": _versions(),
    }


def _cuda_placement(model) -> dict:
    from .placement import predict

    p = predict(model)
    return {"capturable": p.capturable, "host_device_copies": [str(c) for c in p.copies], "nodes_on_cpu": len(p.on_cpu)}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("gpt2onnx", "torch", "transformers", "onnx", "onnxruntime", "tokenizers", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
