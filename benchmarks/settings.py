"""The benchmark's settings: one dataclass (its defaults are the command line's), the argparse options
that build it, and the checks that refuse a setting before anything is measured (ToolParser: the same
for the tools run on their own, `python -m gpt2onnx.benchmarks.X`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from gpt2onnx.runtime.errors import Gpt2OnnxError
from gpt2onnx.runtime.sampling import MAX_BEAMS
from gpt2onnx.runtime.session import MAX_THREADS, PROVIDERS, select_provider

from .engines.llamacpp import LLAMACPP_SRC

PRECISIONS = ("fp32", "fp16", "int8", "int4")
# pytorch and optimum run the checkpoint in fp32 (pytorch fp16 on CUDA; optimum also its own CPU int8 beside an
# int8 artifact on a CPU, engines/optimum.py); pytorch-compile is pytorch with a
# static KV cache and, on CUDA, its decode step compiled (torch.compile "reduce-overhead", engines/pytorch.py);
# the anchors (engines/llamacpp.py, engines/ctranslate2.py) are converted once per precision of the artifacts
# measured. Absent ones are skipped with the reason.
BASELINES = ("pytorch", "pytorch-compile", "optimum", "llamacpp", "ctranslate2")
# What runs when --baselines is not given. pytorch-compile is the GPU user's baseline (gpu.sh names it): its
# decode step is compiled on CUDA only, so on a CPU it is a static cache run eagerly, slower than plain
# pytorch and not how CPU users run PyTorch (a handicapped duplicate of the pytorch row).
DEFAULT_BASELINES = ("pytorch", "optimum", "llamacpp", "ctranslate2")
OURS_MODES = ("scheduler", "http", "serial", "static")  # the concurrent scenario's ways to serve an artifact


@dataclass
class Settings:
    """What `gpt2onnx bench` measures and how; every default here is the command line's."""

    artifacts: list[str]
    baselines: list[str] = field(default_factory=lambda: list(DEFAULT_BASELINES))
    batch: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    prompt_len: list[int] = field(default_factory=lambda: [32, 128, 512])
    new_tokens: int = 64
    repeats: int = 5
    context: list[int] = field(default_factory=lambda: [50, 300, 600, 900, 1000])
    context_new_tokens: int = 16
    # a DialoGPT conversation: turns of user messages and fixed-length replies (0 turns = skip)
    chat_turns: int = 8
    chat_user_len: int = 24
    chat_reply_len: int = 16
    # closed-loop clients sending requests back to back (empty or 0 = skip); see concurrent_plan
    concurrent_clients: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    # per point; 0 = max(2C, 64): at C <= 16 four or more requests per client, so the ramp-up (all
    # prompts at once) and the tail (a partly filled batch) do not dominate the figure
    concurrent_requests: int = 0
    concurrent_repeats: int = 3
    concurrent_precisions: list[str] = field(default_factory=lambda: ["int8"])  # none given: the first artifact
    concurrent_max_batch: int = 64  # the scheduler's and static batching's batch: min(C, this)
    concurrent_prompt_len: list[int] = field(default_factory=lambda: [16, 256])  # uniform, inclusive
    concurrent_reply_len: list[int] = field(default_factory=lambda: [16, 128])
    # > 0: ours also runs mode chunkedW, the scheduler with SchedulerConfig.prompt_width = W (fixed-width
    # prompt chunks, captured per slot under CUDA graphs); 0 = not
    concurrent_prompt_width: int = 0
    provider: str = "cpu"
    threads: int = 0  # 0 = one per core
    out: str = "reports/latest"
    # a fresh process per system loads and generates once for its peak RSS (and ours' breakdown)
    footprint: bool = True
    beams: int = 4  # beam search speed: 1 vs this many beams at batch 1 (0 = skip)
    cache: str = "artifacts/bench-cache"  # baseline checkpoints, optimum exports and anchor conversions, reused
    llamacpp_src: str = LLAMACPP_SRC  # the llama.cpp sources `make llamacpp` unpacks (its GGUF converter)


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers ("" for none)."""
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Settings(artifacts=[])
    ints = int_list
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT_DIR", help="artifact directories to measure")
    p.add_argument("--baselines", default=",".join(d.baselines),
                   help=f"comma list of {', '.join(BASELINES)} ('' for none; default {','.join(DEFAULT_BASELINES)}: "
                        "pytorch-compile is for CUDA; those not installed are skipped with the reason: llamacpp needs "
                        "`make llamacpp`)")
    p.add_argument("--batch", type=ints, default=d.batch, help="batch sizes for throughput (default 1,4,16,64)")
    p.add_argument("--prompt-len", type=ints, default=d.prompt_len, help="prompt lengths for time to first token")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens, help="tokens generated per run")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed repeats (median reported)")
    p.add_argument("--context", type=ints, default=d.context, help="context lengths of the latency curve")
    p.add_argument("--context-new-tokens", type=int, default=d.context_new_tokens, help="tokens per context point")
    p.add_argument("--chat-turns", type=int, default=d.chat_turns, help="turns of the chat scenario (0 = skip)")
    p.add_argument("--chat-user-len", type=int, default=d.chat_user_len, help="tokens per user message in the chat scenario")
    p.add_argument("--chat-reply-len", type=int, default=d.chat_reply_len, help="tokens per reply in the chat scenario")
    p.add_argument("--concurrent-clients", type=ints, default=d.concurrent_clients,
                   help="closed-loop clients per point of the concurrent scenario ('' or 0 = skip; default 1,4,16,64)")
    p.add_argument("--concurrent-requests", type=int, default=d.concurrent_requests,
                   help="requests per concurrent point, the same list for every system (0 = max(2C, 64)). The serial systems "
                        "take this many requests' time per point: on 2 cores DialoGPT-small int8 ~0.3 s and optimum ~1.2 s a "
                        "request, so the defaults add ~30 min to make bench (~8 min without optimum)")
    p.add_argument("--concurrent-repeats", type=int, default=d.concurrent_repeats, help="timed repeats of the concurrent scenario")
    p.add_argument("--concurrent-precisions", type=lambda v: [x for x in v.split(",") if x], default=d.concurrent_precisions,
                   help="artifacts of these precisions get the concurrent scenario (default int8; none given: the first artifact)")
    p.add_argument("--concurrent-max-batch", type=int, default=d.concurrent_max_batch,
                   help="batch of the scheduler and of static batching: min(clients, this)")
    p.add_argument("--concurrent-prompt-len", type=ints, default=d.concurrent_prompt_len, metavar="LO,HI",
                   help="prompt lengths, uniform (default 16,256; both ranges shrink to fit the model's positions)")
    p.add_argument("--concurrent-reply-len", type=ints, default=d.concurrent_reply_len, metavar="LO,HI",
                   help="reply lengths, uniform, every reply exactly its length (default 16,128)")
    p.add_argument("--concurrent-prompt-width", type=int, default=d.concurrent_prompt_width, metavar="W",
                   help="also run ours' scheduler with prompts in fixed W-column chunks (mode chunkedW; default 0 = not)")
    p.add_argument("--beams", type=int, default=d.beams, help="beam search scenario: 1 vs this many beams (0 = skip)")
    p.add_argument("--no-footprint", dest="footprint", action="store_false",
                   help="skip the fresh-process memory measurement per system")
    p.add_argument("--bench-provider", dest="provider", default=d.provider, help="cpu | cuda for every system")
    p.add_argument("--threads", type=int, default=d.threads, help="intra-op threads for every system (0 = per core)")
    p.add_argument("--out", default=d.out, help="report directory")
    p.add_argument("--cache", default=d.cache, help="where baseline checkpoints and exports are kept")
    p.add_argument("--llamacpp-src", default=d.llamacpp_src, help="llama.cpp sources with convert_hf_to_gguf.py "
                   "(default: where `make llamacpp` puts them)")


def from_args(args: argparse.Namespace) -> Settings:
    """The Settings that add_arguments' options parsed into `args` describe."""
    names = {f.name for f in dataclasses.fields(Settings)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return Settings(**{**given, "baselines": [b for b in args.baselines.split(",") if b]})


def check(s: Settings) -> None:
    unknown = [b for b in s.baselines if b not in BASELINES]
    if unknown:
        raise Gpt2OnnxError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")
    if s.repeats < 1 or s.new_tokens < 2:
        raise Gpt2OnnxError("--repeats must be >= 1 and --new-tokens >= 2")
    if not s.batch or not s.prompt_len or min(s.batch + s.prompt_len) < 1:
        raise Gpt2OnnxError("--batch and --prompt-len need positive integers")
    if any(c < 1 for c in s.context) or s.context_new_tokens < 1:
        raise Gpt2OnnxError("--context takes positive lengths (or \"\" for none) and --context-new-tokens >= 1")
    if s.chat_turns < 0 or (s.chat_turns and (s.chat_user_len < 1 or s.chat_reply_len < 2)):
        raise Gpt2OnnxError("--chat-turns must be >= 0, --chat-user-len >= 1 and --chat-reply-len >= 2")
    if any(c < 0 for c in s.concurrent_clients) or (any(s.concurrent_clients) and (
            s.concurrent_requests < 0 or s.concurrent_repeats < 1 or s.concurrent_max_batch < 1
            or s.concurrent_prompt_width < 0)):
        raise Gpt2OnnxError("--concurrent-clients must be >= 0, --concurrent-requests >= 0, --concurrent-repeats >= 1, "
                            "--concurrent-max-batch >= 1 and --concurrent-prompt-width >= 0")
    for name, rng, lo in (("prompt", s.concurrent_prompt_len, 1), ("reply", s.concurrent_reply_len, 2)):
        if len(rng) != 2 or not lo <= rng[0] <= rng[1]:
            raise Gpt2OnnxError(f"--concurrent-{name}-len takes LO,HI with {lo} <= LO <= HI, got {','.join(map(str, rng))}")
    unknown = [p for p in s.concurrent_precisions if p not in PRECISIONS]
    if unknown:
        raise Gpt2OnnxError(f"unknown precision {unknown[0]!r} in --concurrent-precisions; choose from {', '.join(PRECISIONS)}")
    if s.provider not in ("cpu", "cuda"):
        raise Gpt2OnnxError(f"unknown provider {s.provider!r}; choose cpu or cuda")
    if not 0 <= s.threads <= MAX_THREADS:  # checked here, not first in a worker after the plan
        raise Gpt2OnnxError(f"--threads must be 0 (one per core) to {MAX_THREADS}, got {s.threads}")
    if s.beams != 0 and not 2 <= s.beams <= MAX_BEAMS:
        raise Gpt2OnnxError(f"--beams must be 0 (skip the beam scenario) or 2 to {MAX_BEAMS}, got {s.beams}")
    if os.path.lexists(s.cache) and not os.path.isdir(s.cache):
        raise Gpt2OnnxError(f"--cache {s.cache} is a file; give a directory for the baselines' checkpoints and exports")
    _check_out(s.out)


def check_provider(provider: str) -> None:
    """Refuse a provider this onnxruntime lacks now, not when ours' worker loads after the plan
    (apart from check(), whose choices a machine without the provider can still check)."""
    try:
        select_provider(provider)  # Engine.load's choice: the same test the workers meet
    except Gpt2OnnxError:
        raise Gpt2OnnxError(f"--bench-provider {provider} is not available here (this onnxruntime has no "
                            f"{PROVIDERS[provider]}); pass --bench-provider cpu, or install onnxruntime-gpu for cuda") from None


def nearest_existing(path: str) -> str:
    """`path`, or its nearest ancestor that exists: where directories made for `path` would go."""
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def _check_out(out: str, flag: str = "--out") -> None:
    """Refuse an --out (`flag`) the report cannot be written to; results.write creates it only after every
    measurement. Nothing is created here, so a refused run leaves no directory behind."""
    path = os.path.abspath(out)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise Gpt2OnnxError(f"{flag} {out} is a file, not a directory; give a directory for the report (new or existing)")
    parent = nearest_existing(path)
    if not os.path.isdir(parent):
        raise Gpt2OnnxError(f"{flag} {out} cannot be created: {parent} is not a directory; give another report directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise Gpt2OnnxError(f"{flag} {out} cannot be written: {parent} is not writable; give a report directory you can write")


class ToolParser(argparse.ArgumentParser):
    """The parser of a benchmark tool run on its own (`python -m gpt2onnx.benchmarks.profile ...`): its errors
    in one line, as the gpt2onnx CLI's, checked before anything is measured; `run` says the runtime's
    refusals (a missing artifact, a prompt that does not fit) in that same line instead of a traceback."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def at_least(self, args: argparse.Namespace, **minimums: int) -> None:
        """Refuse each option (by dest) set below its minimum."""
        for name, lo in minimums.items():
            v = getattr(args, name)
            if v is not None and not v >= lo:
                self.error(f"--{name.replace('_', '-')} must be at least {lo}, got {v}")

    def output_file(self, path: str | None, flag: str) -> None:
        """Refuse a file to write the figures to that cannot be written, before the measuring, not after."""
        if path is None:
            return
        parent = os.path.dirname(os.path.abspath(path)) or "."
        if os.path.isdir(path) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            self.error(f"{flag} {path} cannot be written (a directory, or its directory is missing or read-only); "
                       "give a file path in a writable directory")

    def output_dir(self, path: str, flag: str = "--out") -> None:
        """Refuse a directory for the figures that cannot be made or written (bench's own --out check)."""
        self.run(_check_out, path, flag)

    def run(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except Gpt2OnnxError as e:
            self.error(str(e))
