"""The decode engine: onnxruntime + numpy + tokenizers, no torch.

    engine = Engine.load("artifacts/dialogpt-small")
    engine.generate([[...ids...]], max_new_tokens=32)       -> [[new ids]]
    engine.generate_text("Hello", max_new_tokens=32)         -> "reply"
    for piece in engine.stream("Hello"): print(piece, end="")
    chat = engine.chat(); chat.send("Hi!")
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .artifact import Manifest, load_manifest
from .errors import Gpt2OnnxError
from .sampling import GenerationConfig, Sampler

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass
class SessionConfig:
    """How the onnxruntime session is built; recorded by the benchmark report."""

    provider: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # intra-op threads; None = one per core
    verify: str = "sha256"  # artifact file checks: sha256 | size | none
    # capture the decode step in a CUDA graph (CUDA only; None = on where CUDA is used)
    cuda_graph: bool | None = None


@dataclass
class Stats:
    """Timings of the last generation (seconds)."""

    batch: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from a PromptCache
    new_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # from the request to the first new token (buffers, prefill, sampling)
    decode_s: float = 0.0
    step_s: list[float] = field(default_factory=list)

    @property
    def per_token_ms(self) -> float:
        """Mean decode step time (ms)."""
        return 1e3 * self.decode_s / max(1, len(self.step_s))

    @property
    def per_token_p50_ms(self) -> float:
        """Median decode step time (ms): robust to a slow first step or a noisy neighbour."""
        return 1e3 * float(np.median(self.step_s)) if self.step_s else 0.0


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


def _check_precision(precision: str, ep: str) -> None:
    """Refuse or warn about precision and provider pairs that run badly."""
    if precision == "int8" and ep == PROVIDERS["cuda"]:
        raise Gpt2OnnxError("int8 artifacts run on the cpu provider only; use --provider cpu, or an int4 or fp16 artifact for cuda")
    if precision == "fp16" and ep == PROVIDERS["cpu"]:
        warnings.warn("fp16 on the CPU provider is no faster than fp32 (its CPU kernels compute through fp32; measured 27.6 vs 26.7 ms/token on DialoGPT-small); "
                      "use an fp32, int8 or int4 artifact for cpu", UserWarning, stacklevel=3)


def _session(ort, model_path: str, so, ep: str, sc: SessionConfig):
    """The inference session; on CUDA with a CUDA graph when every node can be captured, else
    without one (with a warning that says so)."""
    if not sc.cuda_graph:
        return ort.InferenceSession(model_path, so, providers=[ep])
    try:
        return ort.InferenceSession(model_path, so, providers=[(ep, {"enable_cuda_graph": "1"})])
    except Exception as e:  # e.g. a node placed on the CPU: onnxruntime refuses to capture the graph
        sc.cuda_graph = False
        warnings.warn(f"CUDA graph capture unavailable for this artifact ({str(e).splitlines()[0][:200]}); "
                      "decoding without it", UserWarning, stacklevel=4)
        return ort.InferenceSession(model_path, so, providers=[ep])


def _check_io(manifest: Manifest, session) -> None:
    """The graph must have exactly the inputs and outputs the manifest promises."""
    io = manifest.raw["io"]
    got_in = {i.name for i in session.get_inputs()}
    got_out = {o.name for o in session.get_outputs()}
    if got_in != set(io["inputs"]) or got_out != set(io["outputs"]):
        missing = sorted((set(io["inputs"]) - got_in) | (set(io["outputs"]) - got_out))
        extra = sorted((got_in - set(io["inputs"])) | (got_out - set(io["outputs"])))
        raise Gpt2OnnxError(f"model.onnx in {manifest.path} does not match its manifest (missing {missing[:3]}, "
                            f"unexpected {extra[:3]}); the artifact is mixed up, re-export it")


@dataclass
class PromptCache:
    """Keeps the KV cache of one batch-1 generation for the next request on the same conversation.

    A request whose prompt extends the tokens the cache already holds (the previous prompt and its
    reply) runs only the new tokens through the model; any other prompt starts over. A DialoGPT chat
    turn then costs its own tokens, not the whole history's. Pass it as `cache=` to generate or stream.
    """

    state: DecodeState | None = None

    def clear(self) -> None:
        self.state = None

    @property
    def tokens(self) -> int:
        """How many tokens' keys and values the cache holds."""
        return 0 if self.state is None else self.state.T


class Engine:
    """A loaded artifact: session, tokenizer and manifest."""

    def __init__(self, manifest: Manifest, session, tokenizer, provider: str, session_config: SessionConfig):
        self.manifest = manifest
        self.session = session
        self.tokenizer = tokenizer
        self.provider = provider
        self.session_config = session_config
        self.device = "cuda" if provider == PROVIDERS["cuda"] else "cpu"
        c = manifest.config
        self.n_layer, self.n_head, self.head_dim = c["n_layer"], c["n_head"], c["n_embd"] // c["n_head"]
        self.vocab_size, self.n_positions = c["vocab_size"], c["n_positions"]
        self.eos_token_id, self.pad_token_id = c["eos_token_id"], c["pad_token_id"]
        self.kv_dtype = np.dtype(manifest.kv["dtype"])
        self.shared_kv = bool(manifest.kv["shared_buffer"])
        self.stats = Stats()
        self.cuda_graph = bool(session_config.cuda_graph) and self.shared_kv
        self._graph_buffers: dict[int, dict] = {}  # batch size -> buffers the captured graph reads
        self._graph_owner: dict[int, DecodeState] = {}  # batch size -> the state whose cache those buffers hold

    @classmethod
    def load(cls, path: str, provider: str = "auto", threads: int | None = None, verify: str = "sha256",
             cuda_graph: bool | None = None) -> Engine:
        """Validate the artifact at `path` and build its session.

        `cuda_graph` (CUDA only, default on) replays the decode step from a captured CUDA graph: the
        step's buffers then live for the engine's lifetime, one set per batch size, at the full
        position table, so a later generation of that batch size replays the same graph.

        Raises:
            Gpt2OnnxError: damaged or mismatched artifact, unknown or unavailable provider.
        """
        import onnxruntime as ort
        from tokenizers import Tokenizer

        ep = select_provider(provider)  # before the slow checks: a wrong flag fails fast
        use_graph = ep == PROVIDERS["cuda"] and cuda_graph is not False
        sc = SessionConfig(provider=provider, threads=threads, verify=verify, cuda_graph=use_graph)
        manifest = load_manifest(path, verify=verify)
        _check_precision(manifest.precision, ep)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or os.cpu_count() or 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        try:
            session = _session(ort, manifest.file("model.onnx"), so, ep, sc)
            tokenizer = Tokenizer.from_file(manifest.file("tokenizer.json"))
        except Exception as e:  # onnxruntime and tokenizers raise their own types for bad files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise Gpt2OnnxError(f"cannot load the artifact at {path}: {first[:300]}; re-export it") from None
        _check_io(manifest, session)
        return cls(manifest, session, tokenizer, ep, sc)

    # ---- text ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise Gpt2OnnxError(f"prompt must be text, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise Gpt2OnnxError("prompt is not valid UTF-8; pass UTF-8 text") from None
        if not text:
            raise Gpt2OnnxError("prompt is empty; pass some text")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate_text(self, prompt: str | list[str], **kw) -> str | list[str]:
        """Generate from text; returns the new text of each prompt (a str for a str)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise Gpt2OnnxError("no prompts given; pass at least one")
        new = self.generate([self.encode(p) for p in prompts], **kw)
        texts = [self.decode(r) for r in new]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str | list[int], cache: PromptCache | None = None, **kw) -> Iterator[str]:
        """Yield the new text piece by piece. A piece never ends inside a multi-byte character:
        a token that leaves a character incomplete is held until the next one completes it."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        new: list[int] = []
        prefix = read = 0  # new[prefix:read] was emitted already; decoding from `prefix` keeps context
        for tokens, done in self._tokens([ids], self._config(kw), cache):
            if done[0]:
                break
            new.append(int(tokens[0]))
            shown, text = self.decode(new[prefix:read]), self.decode(new[prefix:])
            if len(text) > len(shown) and not text.endswith("\ufffd"):
                yield text[len(shown):]
                prefix, read = read, len(new)
        tail = self.decode(new[prefix:])[len(self.decode(new[prefix:read])):]
        if tail:  # bytes that never completed a character: flush them as the decoder renders them
            yield tail

    def chat(self, **kw):
        """A DialoGPT chat session over this engine; `kw` are generation options."""
        from .chat import ChatSession

        return ChatSession(self, self._config(kw))

    # ---- tokens ----------------------------------------------------------------------------

    def generate(self, input_ids: list[list[int]], cache: PromptCache | None = None, **kw) -> list[list[int]]:
        """Generate for a batch of prompts of any lengths.

        Args:
            input_ids: one list of token ids per row.
            cache: reuse the keys and values of an earlier batch-1 request this prompt extends
                (see PromptCache); one row only.
            **kw: GenerationConfig fields (max_new_tokens, do_sample, temperature, top_k, top_p,
                repetition_penalty, seed, eos_token_id, truncate).
        Returns:
            the new tokens of each row, stopping after its EOS token (included).
        Raises:
            Gpt2OnnxError: empty prompt, ids outside the vocabulary, a request longer than the context.
        """
        cfg = self._config(kw)
        rows = self._check_rows(input_ids, cfg)
        out: list[list[int]] = [[] for _ in rows]
        for tokens, done in self._tokens(rows, cfg, cache):
            for r, t in enumerate(tokens):
                if not done[r]:
                    out[r].append(int(t))
        return out

    def _config(self, kw: dict) -> GenerationConfig:
        try:
            cfg = GenerationConfig(**kw)
        except TypeError as e:
            raise Gpt2OnnxError(f"unknown generation option: {e}") from None
        cfg.validate()
        return cfg

    def _check_rows(self, input_ids, cfg: GenerationConfig) -> list[list[int]]:
        if not input_ids or isinstance(input_ids[0], (int, np.integer)):
            raise Gpt2OnnxError("input_ids must be a non-empty list of lists of token ids")
        limit = self.n_positions
        if cfg.max_new_tokens >= limit:
            raise Gpt2OnnxError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in {limit} positions; lower it")
        rows = []
        for r, row in enumerate(input_ids):
            row = [int(t) for t in row]
            if not row:
                raise Gpt2OnnxError(f"prompt {r} is empty; pass at least one token")
            bad = [t for t in row if not 0 <= t < self.vocab_size]
            if bad:
                raise Gpt2OnnxError(f"token id {bad[0]} in prompt {r} is outside the vocabulary 0..{self.vocab_size - 1}")
            room = limit - cfg.max_new_tokens
            if len(row) > room and not cfg.truncate:
                what = (f"prompt {r} has {len(row)} tokens, longer than the {limit}-position context" if len(row) > limit
                        else f"prompt {r} ({len(row)} tokens) plus max_new_tokens={cfg.max_new_tokens} runs past the {limit}-position context")
                raise Gpt2OnnxError(f"{what}; shorten it, lower max_new_tokens, or pass --truncate to keep the newest tokens")
            rows.append(row[-room:])
        return rows

    def _tokens(self, rows: list[list[int]], cfg: GenerationConfig,
                cache: PromptCache | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The decode loop. Yields (tokens [batch], done [batch]) once per new token; `done[r]` is
        True for rows that had already finished before this token."""
        t0 = time.perf_counter()
        eos = self.eos_token_id if cfg.eos_token_id is None else cfg.eos_token_id
        if cache is not None and len(rows) != 1:
            raise Gpt2OnnxError(f"a prompt cache serves one prompt at a time, got {len(rows)}; pass one prompt or no cache")
        state = cache.state if cache is not None and cache.state is not None and cache.state.e is self else None
        if state is not None and state.can_extend(rows[0], cfg.max_new_tokens):
            logits = state.extend(rows[0])
        else:  # a cached state is sized for the whole position table, so later turns fit in it
            state = DecodeState(self, rows, cfg.max_new_tokens, capacity=self.n_positions if cache is not None else None)
            logits = state.prefill()
        if cache is not None:
            cache.state = state
        self.stats = state.stats
        sampler = Sampler(cfg)
        seen = state.seen_tokens() if cfg.repetition_penalty != 1.0 else None  # [B, vocab]
        done = np.zeros(len(rows), bool)
        live = np.arange(len(rows))  # the request row each state row holds
        tokens = np.full(len(rows), self.pad_token_id)
        for step in range(cfg.max_new_tokens):
            tokens[:] = self.pad_token_id
            tokens[live] = sampler(logits, None if seen is None else seen[live])
            state.stats.new_tokens = step + 1
            if step == 0:
                state.stats.ttft_s = time.perf_counter() - t0
            yield tokens, done
            done = done | (tokens == eos)
            if done.all() or step + 1 == cfg.max_new_tokens:
                break
            if seen is not None:
                seen[live, tokens[live]] = True
            if not state.graph and 2 * done[live].sum() >= len(live) > 1:  # half the rows finished: stop computing them
                state.compact(~done[live])
                live = live[~done[live]]
            logits = state.step(tokens[live])


class DecodeState:
    """The buffers of one generation, allocated once: KV cache, mask, ids, positions, logits.

    With a shared-buffer artifact the KV cache is [batch, heads, capacity, head_dim] per layer and
    key/value tensor, bound as both past and present, so the attention op writes each new token's
    keys and values in place; the decode inputs have fixed shapes ([B, 1] ids and positions, a
    [B, capacity] mask whose future columns are 0) and are bound once, then written in place.
    Otherwise present = concat(past, new) and is fed back each step.
    `compact(keep)` drops finished rows (one copy of the cache) so they stop costing work.
    """

    def __init__(self, engine: Engine, rows: list[list[int]], max_new_tokens: int, capacity: int | None = None):
        import onnxruntime as ort

        self.e, self.ort = engine, ort
        self.B, self.S0 = len(rows), max(map(len, rows))
        self.graph = engine.cuda_graph
        # a captured graph replays fixed addresses and shapes: size for the whole position table
        self.capacity = engine.n_positions if self.graph else capacity or self.S0 + max_new_tokens
        # batch 1: the tokens whose keys and values the cache holds, so a later prompt can extend them
        self.fed: list[int] | None = list(rows[0]) if self.B == 1 else None
        e, B = engine, self.B
        # left padding: the real tokens of every row end at the same column
        self.prompt_ids = np.full((B, self.S0), e.pad_token_id, np.int64)
        self.mask = np.zeros((B, self.capacity), np.int64)  # [B, capacity]: 1 = real token so far
        for r, row in enumerate(rows):
            self.prompt_ids[r, self.S0 - len(row):] = row
            self.mask[r, self.S0 - len(row): self.S0] = 1
        self.rows = rows
        self.pos = np.clip(np.cumsum(self.mask[:, : self.S0], axis=1) - 1, 0, None)  # [B, S0]
        self.T = self.S0
        self.next_pos = self.pos[:, -1:].copy()  # [B, 1]
        self.keep_one = np.array(1, np.int64)
        if self.graph:
            kv = self._graph_buffers()["kv"]
            engine._graph_owner[B] = self  # a later state of this batch size overwrites this cache
        elif e.shared_kv:  # [B, heads, capacity, head_dim] per layer and tensor, written in place
            shape = [B, e.n_head, self.capacity, e.head_dim]
            kv = [ort.OrtValue.ortvalue_from_shape_and_type(shape, e.kv_dtype, e.device, 0) for _ in range(2 * e.n_layer)]
        else:  # [B, heads, 0, head_dim]: grows by concatenation
            kv = [ort.OrtValue.ortvalue_from_numpy(np.zeros((B, e.n_head, 0, e.head_dim), e.kv_dtype), e.device, 0)
                  for _ in range(2 * e.n_layer)]
        self.run_options = None
        self._bind(kv)
        self.stats = Stats(batch=B, prompt_tokens=sum(map(len, rows)))

    def _graph_buffers(self) -> dict:
        """The device buffers of the captured decode graph for this batch size, made once."""
        e, ort, B = self.e, self.ort, self.B
        if B not in e._graph_buffers:
            shape = [B, e.n_head, self.capacity, e.head_dim]
            e._graph_buffers[B] = {
                "id": str(len(e._graph_buffers) + 1),
                "kv": [ort.OrtValue.ortvalue_from_shape_and_type(shape, e.kv_dtype, e.device, 0) for _ in range(2 * e.n_layer)],
                "input_ids": ort.OrtValue.ortvalue_from_shape_and_type([B, 1], np.int64, e.device, 0),
                "position_ids": ort.OrtValue.ortvalue_from_shape_and_type([B, 1], np.int64, e.device, 0),
                "attention_mask": ort.OrtValue.ortvalue_from_shape_and_type([B, self.capacity], np.int64, e.device, 0),
                "num_logits_to_keep": ort.OrtValue.ortvalue_from_numpy(np.array(1, np.int64), e.device, 0),
                "logits": ort.OrtValue.ortvalue_from_shape_and_type([B, 1, e.vocab_size], np.float32, e.device, 0),
            }
        return e._graph_buffers[B]

    def _bind(self, kv: list) -> None:
        """(Re)allocate the per-batch buffers for self.B rows and bind the outputs and the cache."""
        e, B = self.e, self.B
        self.kv = kv
        self.ids = np.zeros((B, 1), np.int64)
        self.logits = np.empty((B, 1, e.vocab_size), np.float32)
        self.io = e.session.io_binding()
        self.logits_ov = self.ort.OrtValue.ortvalue_from_numpy(self.logits)  # shares memory
        self.io.bind_ortvalue_output("logits", self.logits_ov)
        self.io.bind_cpu_input("num_logits_to_keep", self.keep_one)  # 1 for every pass, prompt included
        if e.shared_kv:
            for j, (past, present) in enumerate(self._kv_names()):
                self.io.bind_ortvalue_input(past, kv[j])
                self.io.bind_ortvalue_output(present, kv[j])
        self.step_inputs = None  # bound after the prompt pass

    def _bind_step_inputs(self) -> None:
        """Bind the fixed-shape decode inputs once. On CPU the OrtValues share the numpy arrays'
        memory, so writing the arrays is enough; on CUDA they are device copies refreshed per step."""
        arrays = {"input_ids": self.ids, "position_ids": self.next_pos, "attention_mask": self.mask}
        if self.graph:
            g = self._graph_buffers()
            self.step_inputs = {k: (a, g[k]) for k, a in arrays.items()}
            for k, (a, ov) in self.step_inputs.items():
                ov.update_inplace(a)
                self.io.bind_ortvalue_input(k, ov)
            self.io.bind_ortvalue_input("num_logits_to_keep", g["num_logits_to_keep"])
            self.io.bind_ortvalue_output("logits", g["logits"])  # captured graphs write device memory only
            self.run_options = self.ort.RunOptions()
            self.run_options.add_run_config_entry("gpu_graph_id", g["id"])
            return
        self.step_inputs = {k: (a, self.ort.OrtValue.ortvalue_from_numpy(a, self.e.device, 0)) for k, a in arrays.items()}
        for name, (_, ov) in self.step_inputs.items():
            self.io.bind_ortvalue_input(name, ov)

    def compact(self, keep: np.ndarray) -> None:
        """Keep only the rows where `keep` is True (bool [B])."""
        self.B = int(keep.sum())
        self.mask, self.next_pos = np.ascontiguousarray(self.mask[keep]), np.ascontiguousarray(self.next_pos[keep])
        kv = [self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[keep]), self.e.device, 0) for v in self.kv]
        self._bind(kv)
        if self.e.shared_kv:
            self._bind_step_inputs()

    def _kv_names(self) -> Iterator[tuple[str, str]]:
        for i in range(self.e.n_layer):
            yield f"past_key_values.{i}.key", f"present.{i}.key"
            yield f"past_key_values.{i}.value", f"present.{i}.value"

    def seen_tokens(self) -> np.ndarray:
        seen = np.zeros((self.B, self.e.vocab_size), bool)
        for r, row in enumerate(self.rows):
            seen[r, row] = True
        return seen

    def _run_concat(self, ids: np.ndarray, pos: np.ndarray) -> None:
        """Plain graphs: the mask is exactly [B, T] and the cache comes back as new outputs."""
        io = self.io
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("position_ids", pos)
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(self.mask[:, : self.T]))
        for j, (past, present) in enumerate(self._kv_names()):
            io.bind_ortvalue_input(past, self.kv[j])
            io.bind_output(present, self.e.device)
        self.e.session.run_with_iobinding(io)
        self.kv = io.get_outputs()[1:]

    def prefill_options(self):
        """The prompt pass has its own shapes: never captured (gpu_graph_id -1)."""
        if not self.graph:
            return None
        ro = self.ort.RunOptions()
        ro.add_run_config_entry("gpu_graph_id", "-1")
        return ro

    def prefill(self) -> np.ndarray:
        t = time.perf_counter()
        self._prompt_pass(self.prompt_ids, self.pos)
        self.stats.prefill_s = time.perf_counter() - t
        return self.logits[:, -1]  # [B, vocab], a view of the bound buffer

    def can_extend(self, row: list[int], max_new_tokens: int) -> bool:
        """Whether `row` continues the cached tokens and it and its reply fit the cache."""
        return (self.fed is not None and len(self.fed) < len(row) and row[: len(self.fed)] == self.fed
                and len(row) + max_new_tokens <= self.capacity
                and (not self.graph or self.e._graph_owner.get(1) is self))

    def extend(self, row: list[int]) -> np.ndarray:
        """A prompt pass over the tokens of `row` past the cached ones (batch 1, can_extend true):
        they attend to the cache and append to it; returns the next logits [1, vocab]."""
        t = time.perf_counter()
        P, new = self.T, row[self.T:]
        self.stats = Stats(batch=1, prompt_tokens=len(row), cached_tokens=P)
        self.rows, self.fed = [row], list(row)
        self.T = len(row)
        self.mask[:, : self.T] = 1
        self.next_pos[:] = self.T - 1
        self._prompt_pass(np.array([new], np.int64), np.arange(P, self.T, dtype=np.int64)[None])  # [1, S] each
        self.stats.prefill_s = time.perf_counter() - t
        return self.logits[:, -1]

    def _prompt_pass(self, ids: np.ndarray, pos: np.ndarray) -> None:
        """Run ids [B, S] at positions pos [B, S] after the T - S cached tokens."""
        if self.e.shared_kv:
            io = self.io
            io.bind_cpu_input("input_ids", ids)
            io.bind_cpu_input("position_ids", pos)
            # exactly [B, T]: a prompt pass must not see the capacity-wide mask of the decode steps
            io.bind_cpu_input("attention_mask", np.ascontiguousarray(self.mask[:, : self.T]))
            if self.graph:  # the decode steps bound the captured graph's device logits
                io.bind_ortvalue_output("logits", self.logits_ov)
            self.e.session.run_with_iobinding(io, self.prefill_options())
            self._bind_step_inputs()
        else:
            self._run_concat(ids, pos)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row ([B]); returns the next logits [B, vocab]."""
        t = time.perf_counter()
        self.ids[:, 0] = tokens
        if self.fed is not None:
            self.fed.append(int(tokens[0]))
        self.T += 1
        self.next_pos += 1
        self.mask[:, self.T - 1] = 1
        if self.e.shared_kv:
            if self.graph or self.e.device != "cpu":  # separate copies of the decode inputs
                for arr, ov in self.step_inputs.values():
                    ov.update_inplace(arr)
            if self.graph:  # first call captures, later calls replay
                self.e.session.run_with_iobinding(self.io, self.run_options)
                self.logits[...] = self._graph_buffers()["logits"].numpy()
            else:
                self.e.session.run_with_iobinding(self.io)
        else:
            self._run_concat(self.ids, self.next_pos)
        dt = time.perf_counter() - t
        self.stats.step_s.append(dt)
        self.stats.decode_s += dt
        return self.logits[:, -1]
