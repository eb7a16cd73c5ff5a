"""The plan of a benchmark run: the systems (ours per artifact, then each baseline prepared from the
checkpoint the first artifact came from, or skipped with the reason) and the scenario points every
system runs (decode, throughput, context, chat, the concurrent clients' request mix)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from gpt2onnx.runtime.errors import Gpt2OnnxError

from .engines import ctranslate2, llamacpp
from .engines.optimum import optimum_int8_model, optimum_model
from .engines.pytorch import hf_checkpoint
from .settings import OURS_MODES, Settings
from .worker import SystemSpec, Worker


@dataclass
class Plan:
    """The scenario points of a run, in the order each repeat runs them."""

    points: list[tuple[str, int, int, int]]  # (scenario decode | throughput | context, batch, prompt_len, new_tokens)
    chat_turns: int  # turns of the chat scenario that fit the context (0 = none)
    concurrent: dict | None  # concurrent_plan's request mix, or None


def scenarios(s: Settings, n_positions: int, log=print) -> Plan:
    """The points of every scenario that fit an `n_positions` context (the smallest of the artifacts').

    Raises:
        Gpt2OnnxError: the first --prompt-len and --new-tokens do not fit (see decode_prompts).
    """
    contexts = [c for c in s.context if c + s.context_new_tokens <= n_positions]
    if len(contexts) < len(s.context):
        log(f"context scenario: {', '.join(str(c) for c in s.context if c not in contexts)} tokens plus {s.context_new_tokens} "
            f"new tokens do not fit the {n_positions}-position context; dropped")
    points = [("decode", 1, p, s.new_tokens) for p in decode_prompts(s, n_positions, log)]
    points += [("throughput", b, s.prompt_len[0], s.new_tokens) for b in s.batch if b != 1]
    points += [("context", 1, c, s.context_new_tokens) for c in contexts]
    chat_turns = min(s.chat_turns, n_positions // (s.chat_user_len + s.chat_reply_len + 2))
    if chat_turns < s.chat_turns:
        log(f"chat scenario: {chat_turns} of {s.chat_turns} turns fit the {n_positions}-position context")
    return Plan(points, chat_turns, concurrent_plan(s, n_positions, log))


def decode_prompts(s: Settings, n_positions: int, log=print) -> list[int]:
    """The --prompt-len values whose prompt plus --new-tokens fit `n_positions`; the others are dropped
    and logged. The first is refused instead of dropped: throughput, the memory footprint, beam search
    and llama-bench all run at it, and the report names it as the decode point."""
    fit = [p for p in s.prompt_len if p + s.new_tokens <= n_positions]
    if s.prompt_len[0] not in fit:
        # each remedy that works alone: a prompt of at least 1 token, a reply of at least 2 (settings.check)
        fixes = [f"the first --prompt-len at most {n_positions - s.new_tokens}"] if n_positions - s.new_tokens >= 1 else []
        fixes += [f"--new-tokens at most {n_positions - s.prompt_len[0]}"] if n_positions - s.prompt_len[0] >= 2 else []
        raise Gpt2OnnxError(f"--prompt-len {s.prompt_len[0]} plus --new-tokens {s.new_tokens} exceed the {n_positions}-position "
                            f"context; make {' or '.join(fixes) or 'both smaller'}")
    dropped = [p for p in s.prompt_len if p not in fit]
    if dropped:
        log(f"decode scenario: prompts of {', '.join(map(str, dropped))} tokens plus {s.new_tokens} new tokens do not fit "
            f"the {n_positions}-position context; dropped")
    return fit


def concurrent_plan(s: Settings, n_positions: int, log=print) -> dict | None:
    """The concurrent scenario's request mix, or None when it is skipped.

    Prompt and reply ranges shrink by one factor until the longest prompt plus the longest reply fit
    the model's positions (a static batch pads every row to its longest prompt and runs its longest
    reply). Returns {clients, requests: {C: requests per point}, prompt_len: [lo, hi], reply_len: [lo, hi]}."""
    clients = [c for c in s.concurrent_clients if c > 0]
    if not clients:
        return None
    (p_lo, p_hi), (r_lo, r_hi) = s.concurrent_prompt_len, s.concurrent_reply_len
    f = min(1.0, n_positions / (p_hi + r_hi))
    prompt = [max(1, int(p_lo * f)), max(1, int(p_hi * f))]
    reply = [max(2, int(r_lo * f)), max(2, int(r_hi * f))]
    if prompt[1] + reply[1] > n_positions:
        raise Gpt2OnnxError(f"concurrent requests cannot fit the {n_positions}-position context; pass --concurrent-clients 0")
    if f < 1:
        log(f"concurrent scenario: prompts {prompt[0]}-{prompt[1]} and replies {reply[0]}-{reply[1]} tokens "
            f"fit the {n_positions}-position context")
    return {"clients": clients, "requests": {c: s.concurrent_requests or max(2 * c, 64) for c in clients},
            "prompt_len": prompt, "reply_len": reply}


def systems(s: Settings, manifests, log) -> tuple[list[SystemSpec], list[dict]]:
    """(specs, skipped): ours, one per artifact, then the baselines in `s.baselines` order; a baseline
    that cannot run here is a skipped entry {baseline, reason}."""
    names = [f"ours {m.precision}{'' if m.raw.get('fused', True) else ' unfused'} {s.provider}" for m in manifests]
    # two artifacts of one precision (an int4 with a 4-bit head beside the default) are told apart by directory:
    # one name would pool their records into one row
    names = [f"{n} ({os.path.basename(os.path.normpath(m.path))})" if names.count(n) > 1 else n for n, m in zip(names, manifests)]
    specs = [SystemSpec(n, "ours", m.path, s.provider, s.threads, m.precision) for n, m in zip(names, manifests)]
    skipped = []
    for kind in s.baselines:
        why = baseline_missing(kind, s.llamacpp_src)
        if why:
            log(f"skipping the {kind} baseline: {why}")
            skipped.append({"baseline": kind, "reason": why})
            continue
        if kind in ("llamacpp", "ctranslate2"):
            got, missed = _anchor_specs(kind, manifests, s, log)
            specs += got
            skipped += missed
            continue
        specs.append(_baseline_spec(kind, manifests[0], s, log))
        if kind == "optimum" and s.provider == "cpu" and any(m.precision == "int8" for m in manifests):
            try:  # optimum's own int8 beside ours: its CPU quantization of the same checkpoint
                path = optimum_int8_model(hf_checkpoint(manifests[0], s.cache, log), s.cache, log)
                specs.append(SystemSpec("optimum int8 cpu", "optimum", path, "cpu", s.threads, "int8"))
            except Exception as e:  # a failed quantization costs this row, not the whole run
                why = f"quantization failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log(f"skipping the optimum baseline at int8: {why}")
                skipped.append({"baseline": "optimum int8", "reason": why})
    return specs, skipped


def check_artifacts(manifests) -> None:
    """One model per run, each artifact once: the baselines are prepared from the first artifact's
    checkpoint, so an artifact of another model would be compared with the wrong PyTorch."""
    seen = set()
    for m in manifests:
        where = os.path.realpath(m.path)
        if where in seen:
            raise Gpt2OnnxError(f"artifact {m.path} is given twice; give each artifact once")
        seen.add(where)
    first = manifests[0]
    for m in manifests[1:]:
        if _model(m) != _model(first):
            raise Gpt2OnnxError(f"{m.path} was exported from {_model(m)}, {first.path} from {_model(first)}: the baselines "
                                "run one model; bench the artifacts of one checkpoint per run")


def _model(m) -> str:
    """The checkpoint an artifact came from, as the manifest says (synthetic weights with their seed)."""
    src = m.raw.get("source") or {}
    return f"{src.get('checkpoint')}" + (f" (seed {src.get('seed')})" if src.get("synthetic") else "")


def baseline_missing(kind: str, llamacpp_src: str = llamacpp.LLAMACPP_SRC) -> str | None:
    """Why a baseline cannot run here, or None."""
    if kind == "llamacpp":
        return llamacpp.missing(llamacpp_src)
    if kind == "ctranslate2":
        return ctranslate2.missing()
    need = {"pytorch": ["torch", "transformers"], "pytorch-compile": ["torch", "transformers"],
            "optimum": ["torch", "transformers", "optimum.onnxruntime"]}[kind]
    for mod in need:
        try:
            if importlib.util.find_spec(mod) is None:
                raise ImportError
        except (ImportError, ValueError):
            pkg = "optimum-onnx" if mod.startswith("optimum") else mod
            return f"{pkg} is not installed (pip install 'gpt2onnx[bench]' or {pkg})"
    return None


def concurrent_runs(s: Settings, workers: list[Worker]) -> list[tuple[Worker, str]]:
    """(worker, mode) pairs of the concurrent scenario: our artifacts of the chosen precisions (or the
    first artifact) in every mode, then optimum fp32 serially, then llama.cpp at the same precisions through
    llama-server's continuous batching where `make llamacpp` built it. The scheduler needs a fused artifact."""
    ours = [w for w in workers if w.spec.kind == "ours"]
    chosen = [w for w in ours if w.spec.precision in s.concurrent_precisions] or ours[:1]
    http = all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "httpx"))  # mode http needs the serve extra
    width = s.concurrent_prompt_width
    modes = OURS_MODES + ((f"chunked{width}", f"mixed{width}") if width else ())
    runs = [(w, mode) for w in chosen for mode in modes
            if (mode in ("serial", "static") or w.loaded["manifest"].get("fused", True)) and (mode != "http" or http)
            and (not mode.startswith("mixed") or "mixed" in w.loaded["manifest"].get("io", {}))]  # mixedW: mixed.onnx
    runs += [(w, "serial") for w in workers if w.spec.kind == "optimum" and w.spec.precision == "fp32"]  # int8: minutes more, no news
    if not llamacpp.tools_missing():
        precisions = {w.spec.precision for w in chosen}
        runs += [(w, "server") for w in workers if w.spec.kind == "llamacpp" and w.spec.precision in precisions]
    return runs


def _baseline_spec(kind: str, m, s: Settings, log) -> SystemSpec:
    """Baselines run the checkpoint the first artifact came from, prepared once into the cache."""
    hf = hf_checkpoint(m, s.cache, log)
    precision = "fp16" if (kind in ("pytorch", "pytorch-compile") and s.provider == "cuda") else "fp32"
    if kind == "pytorch":
        return SystemSpec(f"pytorch {precision} {s.provider}", "pytorch", hf, s.provider, s.threads, precision)
    if kind == "pytorch-compile":  # compiled on CUDA only (engines/pytorch.py: PyTorchCompiled): named for what runs
        label = "pytorch-compile" if s.provider == "cuda" else "pytorch-static"
        return SystemSpec(f"{label} {precision} {s.provider}", kind, hf, s.provider, s.threads, precision)
    return SystemSpec(f"optimum fp32 {s.provider}", "optimum", optimum_model(hf, s.cache, log, s.provider), s.provider, s.threads,
                      "fp32")


def _anchor_specs(kind: str, manifests, s: Settings, log) -> tuple[list[SystemSpec], list[dict]]:
    """One llama.cpp or CTranslate2 system per precision of the artifacts (in their order), converted
    from the checkpoint the first artifact came from. A precision it has no counterpart for, or whose
    conversion fails, comes back as a skipped entry with the reason."""
    hf = hf_checkpoint(manifests[0], s.cache, log)
    specs, skipped = [], []
    for precision in dict.fromkeys(m.precision for m in manifests):
        engine = llamacpp if kind == "llamacpp" else ctranslate2
        why = engine.unfit(precision, s.provider)
        if not why:
            try:
                if kind == "llamacpp":
                    path = llamacpp.gguf_model(hf, s.cache, precision, s.llamacpp_src, log)
                    name = f"llama.cpp {llamacpp.GGUF_TYPES[precision]} cpu"
                else:
                    path = ctranslate2.ctranslate2_model(hf, s.cache, precision, log)
                    name = f"ctranslate2 {ctranslate2.CT2_TYPES[precision]} {s.provider}"
                specs.append(SystemSpec(name, kind, path, s.provider, s.threads, precision))
                continue
            except Exception as e:  # a failed conversion costs this row, not the whole run
                why = f"conversion failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log(f"skipping the {kind} baseline at {precision}: {why}")
        skipped.append({"baseline": f"{kind} {precision}", "reason": why})
    return specs, skipped

