"""`gpt2onnx export | generate | chat | info | serve | bench`. argparse lives here only; each command
builds one options object and passes it on. Defaults come from those objects, not from here."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import sys
import threading
from dataclasses import fields

from gpt2onnx import interrupted, warning_line
from gpt2onnx.export.convert import KV_DTYPES, ExportOptions  # no heavy imports: choices and defaults only
from gpt2onnx.export.quantize import INT8_METHODS
from gpt2onnx.runtime.artifact import PRECISIONS
from gpt2onnx.runtime.errors import Gpt2OnnxError
from gpt2onnx.runtime.sampling import GenerationConfig
from gpt2onnx.runtime.session import PROVIDERS, SessionConfig

SYNTHETIC_NOTE = "note: synthetic weights; speed is real, the text is noise"


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (an unknown choice, a missing value) in the CLI's one-line form."""

    def error(self, message: str):
        self.exit(2, f"gpt2onnx: error: {message}; see `{self.prog} --help`\n")


def _default(cls, name: str):
    """The default of dataclass field `name` (for option objects with required fields)."""
    return next(f.default for f in fields(cls) if f.name == name)


def _add_generation_args(p: argparse.ArgumentParser, truncate: bool = True) -> None:
    """The generation options as flags; `truncate` False for chat, which drops its oldest turns to fit itself."""
    d = GenerationConfig()
    p.add_argument("--max-new-tokens", type=int, help=f"tokens to generate (default {d.max_new_tokens})")
    p.add_argument("--sample", dest="do_sample", action="store_true", default=None, help="sample instead of greedy")
    p.add_argument("--temperature", type=float, help=f"sampling temperature (default {d.temperature})")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (default off)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default off)")
    p.add_argument("--repetition-penalty", type=float, help="penalty > 1 for tokens already present (default off)")
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--eos-token-id", type=int, help="stop token (default the model's; -1 never stops early)")
    if truncate:
        p.add_argument("--truncate", action="store_true", default=None, help="keep the newest prompt tokens when too long")
    p.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram of this size, prompt included (default off)")
    p.add_argument("--min-new-tokens", type=int, help="forbid the stop token before this many new tokens (default 0)")
    p.add_argument("--presence-penalty", type=float, help="OpenAI's: subtract this from tokens already generated (-2..2, default off)")
    p.add_argument("--frequency-penalty", type=float, help="OpenAI's: subtract this per earlier occurrence in the reply (-2..2, default off)")
    p.add_argument("--logit-bias", type=_logit_bias, metavar="ID:BIAS,...",
                   help="add BIAS (-100..100) to token ID's logit: 100 forces it, -100 bans it")
    p.add_argument("--min-p", type=float, help="sampling: drop tokens less likely than this x the likeliest (default off)")
    b = p.add_argument_group("beam search (the whole reply at the end: not with --stream or --sample)")
    b.add_argument("--num-beams", type=int, help=f"beams per prompt (default {d.num_beams}: no beam search)")
    b.add_argument("--length-penalty", type=float,
                   help=f"a finished beam scores log-probability / new_tokens ** this; > 0 favours longer replies (default {d.length_penalty:g})")
    b.add_argument("--early-stopping", type=_early_stopping, metavar="{true,false,never}",
                   help=f"true: stop once num_beams replies are finished; false: when none can improve (a heuristic); "
                        f"never: only when none can (default {str(d.early_stopping).lower()})")


def _logit_bias(text: str) -> dict[int, float]:
    try:
        return {int(i): float(b) for i, b in (pair.split(":") for pair in text.split(",") if pair.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"give ID:BIAS pairs separated by commas, e.g. 50256:-100 (got {text!r})") from None


def _early_stopping(text: str) -> bool | str:
    values = {"true": True, "false": False, "never": "never"}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"choose from true, false, never (got {text!r})")
    return values[text.lower()]


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    d = SessionConfig()
    p.add_argument("--provider", default=d.provider, choices=("auto", *PROVIDERS), help=f"execution provider (default {d.provider})")
    p.add_argument("--threads", type=int, default=d.threads, help="intra-op threads (default one per core)")


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "seed")  # mean nothing without --sample
BEAM_FLAGS = ("length_penalty", "early_stopping")  # mean nothing without --num-beams > 1


def _generation_config(args) -> GenerationConfig:
    given = {f.name: getattr(args, f.name) for f in fields(GenerationConfig) if getattr(args, f.name, None) is not None}
    _refuse_unused([n for n in SAMPLING_FLAGS if n in given], not given.get("do_sample"), "--sample")
    _refuse_unused([n for n in BEAM_FLAGS if n in given], given.get("num_beams", 1) <= 1, "--num-beams N (N > 1)")
    return GenerationConfig(**given)


def _refuse_unused(given: list[str], unused: bool, needs: str) -> None:
    """Options `given` (by dest name) that the other flags make meaningless are an error, not silently ignored."""
    if unused and given:
        flag = "--" + given[0].replace("_", "-")
        raise Gpt2OnnxError(f"{flag} only applies with {needs}; add it or drop {flag}")


def _parse_ids(text: str) -> list[list[int]]:
    try:
        return [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";")]
    except ValueError:
        raise Gpt2OnnxError(f"--ids must be comma-separated integers, rows separated by ';' (got {text!r})") from None


EXTRAS = {  # what each optional command needs, checked up front: a missing one is named in one line
    "export": ("torch", "transformers", "onnx", "onnx_ir"),
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "bench": ("psutil", "rich", "matplotlib"),
}


def _need(extra: str) -> None:
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return sys.modules.get(module, True) is None or importlib.util.find_spec(module) is None
        except (ImportError, ValueError):
            return True

    missing = [m for m in EXTRAS[extra] if absent(m)]
    if missing:
        raise Gpt2OnnxError(f"`gpt2onnx {extra}` needs {missing[0]}; install it with `pip install 'gpt2onnx[{extra}]'`")


def cmd_export(args) -> None:
    _need("export")
    try:
        from gpt2onnx.export.convert import ExportOptions, export
    except ImportError as e:
        raise Gpt2OnnxError(f"the export stage needs {e.name}; install it with `pip install 'gpt2onnx[export]'`") from None
    from gpt2onnx.export.quantize import Int4Config, Int8Config

    keep = tuple(n for n in (args.keep_float or "").split(",") if n)
    quant = {"int8": [n for n in ("int8_method", "int8_per_tensor", "int8_full_range") if getattr(args, n)],
             "int4": [n for n in ("int4_block_size", "int4_asymmetric", "int4_accuracy_level", "int4_head_bits")
                      if getattr(args, n) not in (None, False)]}
    for precision, names in quant.items():
        _refuse_unused(names, args.precision != precision, f"--precision {precision}")
    _refuse_unused(["keep_float"] if keep else [], args.precision not in ("int8", "int4"), "--precision int8 or int4")
    d8, d4 = Int8Config(), Int4Config()
    int8 = Int8Config(method=args.int8_method or d8.method, per_channel=d8.per_channel and not args.int8_per_tensor,
                      reduce_range=d8.reduce_range and not args.int8_full_range, exclude=keep or d8.exclude)
    int4 = Int4Config(block_size=d4.block_size if args.int4_block_size is None else args.int4_block_size,
                      symmetric=d4.symmetric and not args.int4_asymmetric,
                      accuracy_level=d4.accuracy_level if args.int4_accuracy_level is None else args.int4_accuracy_level,
                      exclude=keep or d4.exclude, head_bits=d4.head_bits if args.int4_head_bits is None else args.int4_head_bits)
    opts = ExportOptions(model=args.model, output=args.output, precision=args.precision, provider=args.target_provider,
                         fuse=not args.no_fuse, seed=args.seed, force=args.force, int8=int8, int4=int4,
                         kv_dtype=args.kv_dtype, mixed=args.mixed_step)
    export(opts, log=lambda m: print(m, flush=True))


def _engine(args):
    from gpt2onnx.runtime import Engine

    return Engine.load(args.artifact, provider=args.provider, threads=args.threads)


def cmd_generate(args) -> None:
    cfg = _generation_config(args)
    if (args.ids is None) == (not args.prompt):
        raise Gpt2OnnxError("give either prompt text or --ids, not both and not neither")
    if args.stream and (args.ids is not None or len(args.prompt) != 1 or args.json):
        raise Gpt2OnnxError("--stream takes exactly one text prompt and no --json")
    if args.stream and cfg.num_beams > 1:  # the runtime's own refusal names its Python functions, not these flags
        raise Gpt2OnnxError("--stream cannot show beam search's reply as it grows (the best beam is known only at the end); "
                            "drop --stream or --num-beams")
    engine = _engine(args)
    if args.stream:
        for piece in engine.stream(args.prompt[0], **vars(cfg)):
            print(piece, end="", flush=True)
        print()
    else:
        rows = _parse_ids(args.ids) if args.ids is not None else [engine.encode(p, i) for i, p in enumerate(args.prompt)]
        new = engine.generate(rows, **vars(cfg))
        texts = [engine.decode(r) for r in new]
        if args.json:
            print(json.dumps({"ids": new, "text": texts}, ensure_ascii=False))
        else:
            for t in texts:
                print(t)
    if args.timing:
        s = engine.stats
        print(f"timing: batch {s.batch}, prompt {s.prompt_tokens} tokens in {1e3 * s.prefill_s:.1f} ms, "
              f"{s.new_tokens} new tokens, decode {s.per_token_p50_ms:.2f} ms/token median, {s.per_token_ms:.2f} mean "
              f"({1e3 / max(s.per_token_ms, 1e-9) * s.batch:.1f} tokens/s), provider {engine.provider}", file=sys.stderr)
    if engine.manifest.synthetic:
        print(SYNTHETIC_NOTE, file=sys.stderr)


def _turn_timing(engine) -> str:
    s = engine.stats
    return (f"timing: {s.prompt_tokens - s.cached_tokens} new prompt tokens run ({s.cached_tokens} reused from the cache) "
            f"in {1e3 * s.prefill_s:.1f} ms, {s.new_tokens} reply tokens at {s.per_token_p50_ms:.2f} ms/token median")


def cmd_chat(args) -> None:
    cfg = _generation_config(args)
    engine = _engine(args)
    session = engine.chat(**vars(cfg))
    if args.say:  # a scripted conversation: each message is a turn, printed with the reply
        if engine.manifest.synthetic:
            print(SYNTHETIC_NOTE, file=sys.stderr)
        for line in args.say:
            print(f"> {line}", flush=True)
            print(session.send(line), flush=True)
            if args.timing:
                print(_turn_timing(engine), file=sys.stderr, flush=True)
        return
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # non-UTF-8 input gets our message, not a crash
    print("chat: type a message; /reset forgets the history; Ctrl-D quits." + (f" ({SYNTHETIC_NOTE})" if engine.manifest.synthetic else ""),
          file=sys.stderr)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            print(file=sys.stderr)
            return
        line = line.rstrip("\r\n")  # the text as typed, spaces kept (a turn's tokens are its text's, as --say's)
        if not line:  # Enter alone sends nothing
            continue
        if line.strip() == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        try:
            print(session.send(line), flush=True)
            if args.timing:
                print(_turn_timing(engine), file=sys.stderr, flush=True)
        except Gpt2OnnxError as e:  # one bad line does not end the conversation
            print(f"gpt2onnx: error: {e}", file=sys.stderr)


def cmd_info(args) -> None:
    from gpt2onnx.runtime.artifact import describe, load_manifest

    m = load_manifest(args.artifact, verify="size")
    print(json.dumps(m.raw, indent=2) if args.json else describe(m))


def cmd_bench(args) -> None:
    _need("bench")
    try:
        from gpt2onnx.benchmarks.harness import main as bench_main
    except ImportError as e:
        raise Gpt2OnnxError(f"the benchmark needs {e.name}; install it with `pip install 'gpt2onnx[bench]'`") from None
    bench_main(args)


def api_key(flag: str | None, env: str | None) -> str | None:
    """The server's key: --api-key, else GPT2ONNX_API_KEY. Set but empty (`--api-key "$KEY"` with KEY unset) is
    refused rather than serving without a key; a key read from a secret file loses its trailing newline."""
    key, source = (flag, "--api-key") if flag is not None else (env, "GPT2ONNX_API_KEY")
    if key is not None and not key.strip():
        raise Gpt2OnnxError(f"the API key is empty ({source}); give a non-empty key, or unset {source} to serve without one")
    return None if key is None else key.strip()


def cmd_serve(args) -> None:
    import os

    _need("serve")
    try:
        from gpt2onnx.serve.server import serve
    except ImportError as e:
        raise Gpt2OnnxError(f"the server needs {e.name}; install it with `pip install 'gpt2onnx[serve]'`") from None
    cfg = _serve_config(args)
    cfg.api_key = api_key(args.api_key, os.environ.get("GPT2ONNX_API_KEY"))
    _refuse_unused(["replicas"] if args.replicas is not None else [], not args.ray, "--ray")
    if args.ray and (given := [k for k in ("keep_alive_s", "root_path") if getattr(args, k) is not None]):  # Ray's proxy's
        raise Gpt2OnnxError(f"--{given[0].replace('_', '-')} does not apply with --ray (Ray Serve's proxy holds the connections); drop it")
    if not args.ray:
        serve(args.artifacts, cfg)
        return
    try:
        import ray.serve  # noqa: F401 - only to name the missing extra before any work

        from gpt2onnx.serve.ray_app import application, run
        from gpt2onnx.serve.server import check
    except ImportError as e:
        raise Gpt2OnnxError(f"scale-out needs {e.name}; install it with `pip install 'gpt2onnx[ray]'`") from None
    check(cfg)
    replicas = _default_arg(application, "replicas") if args.replicas is None else args.replicas
    if replicas < 1:
        raise Gpt2OnnxError(f"--replicas must be at least 1, got {replicas}")
    run(args.artifacts, cfg, replicas)


def _default_arg(func, name: str):
    import inspect

    return inspect.signature(func).parameters[name].default


def _given(cls, args, skip: tuple[str, ...] = ()) -> dict:
    """The fields of dataclass `cls` that the command line set (flags left out stay None)."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in skip and getattr(args, f.name, None) is not None}


def _serve_config(args):
    """ServeConfig from the flags given; everything else is the defaults of ServeConfig,
    SchedulerConfig and SessionConfig."""
    from gpt2onnx.runtime.scheduler import SchedulerConfig
    from gpt2onnx.runtime.session import SessionConfig
    from gpt2onnx.serve.config import ServeConfig

    given = _given(ServeConfig, args, skip=("scheduler", "session", "api_key"))
    if "max_tokens" in given and "default_max_tokens" not in given:  # a cap below the default lowers the default
        given["default_max_tokens"] = min(ServeConfig.default_max_tokens, given["max_tokens"])
    return ServeConfig(**given, scheduler=SchedulerConfig(**_given(SchedulerConfig, args)),
                       session=SessionConfig(**_given(SessionConfig, args)))


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    from gpt2onnx.serve.config import ServeConfig  # the dataclasses only: no serve extra needed for --help

    d = ServeConfig()
    sd = d.scheduler
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help="artifact directories; each is a model named after its directory")
    p.add_argument("--host", help=f"address to listen on (default {d.host}: loopback only)")
    p.add_argument("--port", type=int, help=f"port (default {d.port}; 0 = any free port, printed at start)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes, /tokenize and /detokenize (or set GPT2ONNX_API_KEY)")
    p.add_argument("--max-tokens", type=int, help=f"cap on a request's max_tokens (default {d.max_tokens})")
    p.add_argument("--default-max-tokens", type=int, help=f"a completion's max_tokens when the request names none (default "
                   f"{d.default_max_tokens}, or --max-tokens if lower; a chat reply may take the context left, up to --max-tokens)")
    p.add_argument("--max-body-bytes", type=int, help=f"largest request body (default {d.max_body_bytes})")
    p.add_argument("--request-timeout-s", type=float, help=f"cancel a request after this long (default {d.request_timeout_s:g})")
    p.add_argument("--shutdown-timeout-s", type=float, help=f"on SIGTERM, time in-flight requests get; the process exits within "
                   f"this + 5 s (default {d.shutdown_timeout_s:g}: inside Kubernetes' default grace of 30 s)")
    p.add_argument("--access-log", action="store_true", default=None, help="log a line per request (method, path, status, "
                   "seconds, request id); server errors are logged either way")
    p.add_argument("--keep-alive-s", type=float, help=f"close an idle keep-alive connection after this long (default "
                   f"{d.keep_alive_s:g}; above a load balancer's idle timeout, e.g. 65 behind an AWS ALB's 60)")
    p.add_argument("--root-path", help="the path prefix a reverse proxy strips before forwarding (ASGI root_path)")
    p.add_argument("--allowed-origins", help="browser origins allowed to call the API (CORS), comma-separated, or * (default: none)")
    s = p.add_argument_group("scheduler (one per model)")
    s.add_argument("--max-batch", type=int, help=f"requests decoded together per model (default {sd.max_batch})")
    s.add_argument("--max-queue", type=int, help=f"requests waiting beyond the batch before 429 (default {sd.max_queue})")
    s.add_argument("--prefill-chunk", type=int, help=f"prompt tokens per decode step while others decode (default {sd.prefill_chunk})")
    s.add_argument("--prompt-width", type=int, help=f"while others decode, prompts go in right-padded chunks of exactly this "
                   f"many tokens, one row per pass, captured per slot on CUDA (default {sd.prompt_width} = chunks of any length)")
    s.add_argument("--capacity", type=int, help="positions per batch row, prompt and reply (default the model's context)")
    s.add_argument("--keep-prefixes", action=argparse.BooleanOptionalAction, default=None,
                   help=f"a finished request's row keeps its tokens for a later prompt that extends them, e.g. the next "
                        f"turn of a conversation (default {'on' if sd.keep_prefixes else 'off'})")
    p.add_argument("--ray", action="store_true", help="serve through Ray Serve replicas (pip install 'gpt2onnx[ray]')")
    p.add_argument("--replicas", type=int, help="Ray Serve replicas with --ray (default: serve.ray_app.application's)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpt2onnx", description="Export, run and measure GPT-2-family models on ONNX Runtime.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a checkpoint to an artifact directory")
    p.add_argument("model", help="synthetic:dialogpt-small|medium|large|tiny, trained:chat (trained here once), trained:chat-tiny (shipped), "
                                  "a checkpoint directory, or a hub id")
    p.add_argument("-o", "--output", required=True, help="artifact directory to create")
    precision, provider, seed = (_default(ExportOptions, n) for n in ("precision", "provider", "seed"))
    p.add_argument("--precision", default=precision, choices=PRECISIONS, help=f"weights and activations (default {precision})")
    p.add_argument("--provider", dest="target_provider", default=provider, choices=tuple(PROVIDERS),
                   help=f"provider the artifact is built for (default {provider})")
    p.add_argument("--no-fuse", action="store_true", help="plain ONNX operators instead of onnxruntime's fused ones (a portable graph for other ONNX runtimes; gpt2onnx's own runtime decodes fused graphs only)")
    p.add_argument("--seed", type=int, default=seed, help=f"weights seed of synthetic checkpoints (default {seed})")
    p.add_argument("--mixed-step", action="store_true",
                   help="also write mixed.onnx, a decode step and one row's prompt chunk in one pass, which the scheduler "
                        "runs with --prompt-width (weights shared with model.onnx on disk)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--kv-dtype", default=_default(ExportOptions, "kv_dtype"), choices=KV_DTYPES,
                   help="KV cache dtype (default: int8 for int8 and int4 on cpu; float16 on cuda; else the activations')")
    q = p.add_argument_group("quantization (defaults chosen by measurement, see export/quantize.py)")
    q.add_argument("--int8-method", choices=INT8_METHODS,
                   help="int8: dynamic (DynamicQuantizeMatMul, fastest; default) or nbits (8-bit MatMulNBits: "
                        "each request's tokens independent of its batch-mates, slower)")
    q.add_argument("--int8-per-tensor", action="store_true", help="int8: one scale per weight instead of per column")
    q.add_argument("--int8-full-range", action="store_true", help="int8: 8-bit weights instead of 7-bit (VNNI machines)")
    q.add_argument("--int4-block-size", type=int, help="int4: weights per scale (16, 32, 64, 128 or 256)")
    q.add_argument("--int4-asymmetric", action="store_true", help="int4: zero points per block")
    q.add_argument("--int4-accuracy-level", type=int, help="int4: 0 fp32 activations, 4 int8 activations")
    q.add_argument("--int4-head-bits", type=int, choices=(4, 8),
                   help="int4: bits of the LM head and the embedding tied to it: 8 (default: as llama.cpp's Q4_0 keeps its "
                        "head wider) or 4 (less to read a token, less accurate)")
    q.add_argument("--keep-float", help="comma list of MatMul node names left unquantized (e.g. lm_head)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate from prompts")
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("prompt", nargs="*", help="prompt text (one row per argument)")
    p.add_argument("--ids", help="token ids instead of text: '1,2,3' or '1,2;3,4' for a batch")
    p.add_argument("--json", action="store_true", help='print {"ids": [[...]], "text": [...]} (new tokens only)')
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--timing", action="store_true", help="print prefill and per-token times to stderr")
    _add_generation_args(p)
    _add_engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive DialoGPT chat (Ctrl-D quits), or a scripted one with --say")
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--say", action="append", metavar="TEXT",
                   help="a user turn; repeat for a scripted conversation printed with its replies (no stdin read)")
    p.add_argument("--timing", action="store_true", help="print each turn's prompt and per-token times to stderr")
    _add_generation_args(p, truncate=False)
    _add_engine_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="print an artifact's manifest")
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--json", action="store_true", help="the raw manifest")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="serve artifacts over an OpenAI-compatible HTTP API")
    _add_serve_args(p)
    _add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="benchmark artifacts against PyTorch, optimum, llama.cpp and CTranslate2")
    try:
        from gpt2onnx.benchmarks.settings import add_arguments
    except ImportError:
        add_arguments = None
    if add_arguments:
        add_arguments(p)
    p.set_defaults(func=cmd_bench)
    for p in sub.choices.values():  # where an internal error's "rerun with --debug" puts it: after the command
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p.set_defaults(command_parser=p)  # its errors and flag names (_parse, _in_flags)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, with an unknown option reported by its command's parser (`see gpt2onnx generate --help`)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _in_flags(message: str, args: argparse.Namespace) -> str:
    """The runtime's messages name options as its Python API does (max_new_tokens, do_sample): said by the
    CLI, they name the flags the user typed (--max-new-tokens, --sample)."""
    command = getattr(args, "command_parser", None)
    if command is None:
        return message
    message = message.replace("pass truncate=True (the CLI's --truncate)", "pass --truncate")
    for action in command._actions:
        if action.option_strings and "_" in action.dest:  # a Python name no plain word would be
            message = re.sub(rf"(?<![\w-]){action.dest}(?!\w)", max(action.option_strings, key=len), message)
    return message


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = warning_line
    parser = build_parser()
    args = _parse(parser, argv)
    # SIGTERM and SIGHUP as Ctrl-C (an export removes its half-written directory; a server still loading
    # stops with one line); a serving server shuts down gracefully on its own handlers, and only the main
    # thread may set any
    handle = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)} if handle else {}
    try:
        return _run(args)
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def _run(args) -> int:
    try:
        args.func(args)
        sys.stdout.flush()  # here, so a reader that left is met below and not in the interpreter's exit
    except Gpt2OnnxError as e:
        print(f"gpt2onnx: error: {_in_flags(str(e), args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpt2onnx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`gpt2onnx info A | head -3`): stop quietly, as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's final flush must not fail too
        return 141
    except Exception as e:  # a bug: one line unless --debug
        if interrupted(e):  # the signal landed inside a C extension's import, which wraps it in an ImportError
            print("gpt2onnx: interrupted", file=sys.stderr)
            return 130
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # `> /dev/full`: the disk, not a bug
            print(f"gpt2onnx: error: cannot write the output: {e.strerror}; free space there or write elsewhere", file=sys.stderr)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's final flush must not fail too
            return 2
        if args.debug:
            raise
        print(f"gpt2onnx: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
