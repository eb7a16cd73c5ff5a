"""The engine: a loaded artifact (session, tokenizer, manifest), shared read-only by every caller.

    engine = Engine.load("artifacts/dialogpt-small")
    engine.generate([[...ids...]], max_new_tokens=32)       -> [[new ids]]
    engine.generate_text("Hello", max_new_tokens=32)         -> "reply"
    for piece in engine.stream("Hello"): print(piece, end="")
    chat = engine.chat(); chat.send("Hi!")

Every call keeps its state in its own Request objects and its own rows of the decode core
(decoder.py), so calls from many threads at once return what they return one at a time. For many
concurrent requests, a Scheduler (scheduler.py) batches them through one decode loop over the same core.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import time
from collections.abc import Iterator

import numpy as np

from .artifact import Manifest, load_manifest
from .beam import Beams
from .decoder import Decoder, Mixed, Pick
from .errors import ContextOverflow, Gpt2OnnxError, require_utf8
from .prompt_cache import PromptCache
from .request import SCORE_CHUNK, PromptScores, Request, Stats, Token
from .sampling import MAX_LOGPROBS, GenerationConfig, _int
from .session import (
    PROVIDERS,
    SessionConfig,
    build_pick_session,
    build_session,
    check_io,
    check_libraries,
    check_precision,
    select_provider,
)
from .spec import ModelSpec


class Engine:
    """A loaded artifact: session, tokenizer, manifest and the model spec read from it. Immutable after
    load but for the decoders it keeps for captured CUDA graphs (one per batch bucket, reused)."""

    def __init__(self, manifest: Manifest, session, tokenizer, provider: str, session_config: SessionConfig,
                 pick_session=None, spec: ModelSpec | None = None):
        self.manifest = manifest
        self.spec = spec or ModelSpec.from_manifest(manifest)  # load passes the one it checked
        self.session = session
        self.tokenizer = tokenizer
        self._longest_piece: int | None = None  # UTF-8 bytes of the vocabulary's longest piece (_refuse_unencoded)
        self.provider = provider
        self.session_config = session_config
        self.device = "cuda" if provider == PROVIDERS["cuda"] else "cpu"
        self.cuda_graph = bool(session_config.cuda_graph)
        # greedy's pick where the logits lie, shared by this engine's decoders (None: numpy's argmax)
        self.pick = Pick(pick_session, self.spec, self.device, self.cuda_graph) if pick_session is not None else None
        # captured graphs are identified per session: every Decoder over this session draws its ids here
        self._graph_ids = itertools.count(1)
        # CUDA graphs replay fixed addresses: generations reuse one Decoder per batch bucket, one at a time
        self._graph_decoders: dict[int, Decoder] = {}
        self._graph_owner: dict[int, PromptCache | None] = {}  # the cache whose tokens a bucket's row 0 holds
        self._graph_lock = threading.Lock()
        self._graph_holder: int | None = None  # the thread whose generation holds _graph_lock
        self._mixed_step: Mixed | bool | None = False  # the mixed step graph: False = not built yet, None = none
        self._mixed_lock = threading.Lock()
        self._local = threading.local()  # each thread's last Stats

    # the dims callers ask for most (serve, chat, benchmarks); everything else is on `spec`
    n_positions = property(lambda self: self.spec.n_positions)
    vocab_size = property(lambda self: self.spec.vocab_size)
    eos_token_id = property(lambda self: self.spec.eos_token_id)
    pad_token_id = property(lambda self: self.spec.pad_token_id)

    @classmethod
    def load(cls, path: str, provider: str = "auto", threads: int | None = None, verify: str = "sha256",
             cuda_graph: bool | None = None, huge_pages: bool | None = None, device_pick: bool | None = None,
             mixed_step: bool | None = None) -> Engine:
        """Validate the artifact at `path` and build its session.

        `cuda_graph` (CUDA only, default on) replays the decode step from a captured CUDA graph: the
        step's buffers then live for the engine's lifetime, one set per batch bucket, at the full
        position table, so a later generation of that bucket replays the same graph.
        `huge_pages` (Linux, cpu provider, default on) moves the weights onnxruntime copies at load
        into 2 MB pages, which batch-1 decode streams faster (runtime/session.py, `_huge_pages`).
        `device_pick` (default on with CUDA where the artifact has pick.onnx) takes greedy's argmax on
        the device in steps of 4 rows or more, so a step copies ids to the host, not logits (decoder.py, Pick).
        `mixed_step` (default on with CUDA where the artifact has mixed.onnx, `export --mixed-step`; True
        also on the CPU) lets a scheduler with a prompt width run a prompt chunk in its decode step's pass
        (decoder.py, Mixed); its session is built when the first such scheduler starts.

        Raises:
            Gpt2OnnxError: damaged, mismatched or unfused artifact, unknown or unavailable provider, bad options.
        """
        from tokenizers import Tokenizer

        sc = SessionConfig(provider=provider, threads=threads, verify=verify, cuda_graph=cuda_graph, huge_pages=huge_pages,
                           device_pick=device_pick, mixed_step=mixed_step)
        sc.validate()
        check_libraries()
        ep = select_provider(provider)  # before the slow checks: a wrong flag fails fast
        sc.cuda_graph = ep == PROVIDERS["cuda"] and cuda_graph is not False
        manifest = load_manifest(path, verify=verify)
        check_precision(manifest.precision, ep)
        spec = ModelSpec.from_manifest(manifest)
        if not spec.in_place_kv:
            raise Gpt2OnnxError(f"{path} was exported with --no-fuse (a graph that concatenates its KV cache, kept for "
                                "other ONNX runtimes); this runtime decodes fused graphs only, re-export without --no-fuse")
        if device_pick and not spec.has_pick:
            raise Gpt2OnnxError(f"{path} has no pick graph (pick.onnx, written by exports since 2026-12-06), so greedy's "
                                "pick cannot run on the device; re-export it, or leave device_pick unset")
        sc.device_pick = spec.has_pick and (bool(device_pick) if device_pick is not None else ep == PROVIDERS["cuda"])
        if mixed_step and not spec.has_mixed:
            raise Gpt2OnnxError(f"{path} has no mixed step graph (mixed.onnx); re-export it with --mixed-step, or leave "
                                "mixed_step unset")
        if mixed_step and manifest.precision == "int8" and "dynamic" in (manifest.raw.get("quantization") or {}).get("method", ""):
            # exports refuse this pairing since 2026-12-07: in one pass the rows share int8's activation scale,
            # which the idle chunk row's read of columns not yet written moves (decoder.py, decode_with_chunk).
            # The method, not batch_invariant: int4 measures False too (its kernels sum in other orders per
            # batch size) yet quantizes each row by itself, so its idle row's read stays in that row
            raise Gpt2OnnxError(f"{path} quantizes a pass's rows together (int8 dynamic), so its mixed step would make a "
                                "request's logits depend on its pass-mates; leave mixed_step unset, or re-export with "
                                "--int8-method nbits")
        # on the CPU it measured slower in the concurrent scenario (a second session, its own thread pool):
        # by default a CUDA feature, where a pass costs its launches more than its arithmetic
        sc.mixed_step = spec.has_mixed and (bool(mixed_step) if mixed_step is not None else ep == PROVIDERS["cuda"])
        try:
            # the tokenizer first: its JSON parse leaves ~25 MB of freed heap that the session's
            # allocations then reuse; the other order adds that to the process's peak (measured
            # DialoGPT-small int4: peak 209 vs 232 MB)
            tokenizer = Tokenizer.from_file(manifest.file("tokenizer.json"))
            session = build_session(manifest, ep, sc)
            pick_session = build_pick_session(manifest, ep, sc) if sc.device_pick else None
        except Gpt2OnnxError:
            raise
        except Exception as e:  # onnxruntime and tokenizers raise their own types for bad files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise Gpt2OnnxError(f"cannot load the artifact at {path}: {first[:300]}; re-export it") from None
        check_io(manifest, session, spec)
        if tokenizer.id_to_token(spec.vocab_size) is not None:  # an id the embedding has no row for (O(1), not a vocab walk)
            raise Gpt2OnnxError(f"{path}: tokenizer.json has more tokens than the model's vocabulary of {spec.vocab_size} "
                                "(a tokenizer from another model?); re-export the artifact")
        engine = cls(manifest, session, tokenizer, ep, sc, pick_session, spec)
        engine._load_args = (path, provider, threads, verify, cuda_graph, huge_pages, device_pick, mixed_step)
        return engine

    def __reduce__(self):
        """Pickled as its load (multiprocessing's spawn passes arguments so): the other process loads the
        artifact itself, with the same options; onnxruntime's session cannot be copied."""
        if getattr(self, "_load_args", None) is None:
            raise TypeError("this Engine was not made by Engine.load, so it cannot be pickled; pass its artifact path")
        return (Engine.load, self._load_args)

    def decoder(self, slots: int, capacity: int, prefault: bool = False, captured: bool = True,
                mixed: bool = False) -> Decoder:
        """A new decode core of `slots` rows x `capacity` positions over this engine's session, its
        decode steps captured as CUDA graphs when the engine captures and `captured` (beam search,
        whose rows move between steps, runs uncaptured); with `mixed`, able to run a prompt chunk in a
        decode step's pass where the artifact has the mixed step graph (decode_with_chunk)."""
        _int(slots, "slots", 1)
        _int(capacity, "capacity", 1, self.n_positions, hint=" (the model's context)")
        graph_id = (lambda: next(self._graph_ids)) if self.cuda_graph and captured else None
        # an uncaptured core on a capturing engine picks on the host: the pick's graphs (one per binding) would
        # otherwise pile up with every such short-lived core
        pick = self.pick if graph_id is not None or not self.cuda_graph else None
        return Decoder(self.spec, self.session, slots, capacity, self.device, graph_id=graph_id, prefault=prefault,
                       session_graphs=self.cuda_graph, pick=pick, mixed=self._mixed() if mixed else None)

    def _mixed(self) -> Mixed | None:
        """The mixed step graph's session, built at the first decoder that asks (None: the artifact has none,
        mixed_step is off, or CUDA cannot capture it)."""
        with self._mixed_lock:
            if self._mixed_step is False and self.session_config.mixed_step:
                from .session import build_mixed_session

                session = build_mixed_session(self.manifest, self.provider, self.session_config)
                self._mixed_step = Mixed(session, self.cuda_graph) if session is not None else None
            return self._mixed_step or None

    @property
    def stats(self) -> Stats:
        """Timings of the calling thread's last generation."""
        return getattr(self._local, "stats", None) or Stats()

    # ---- requests: the one validation path -------------------------------------------------

    def config(self, **kw) -> GenerationConfig:
        """A validated GenerationConfig from keyword options."""
        try:
            cfg = GenerationConfig(**kw)
        except TypeError as e:
            raise Gpt2OnnxError(f"unknown generation option: {e}") from None
        cfg.validate()
        for name, ids in (("eos_token_id", [cfg.eos_token_id] if cfg.eos_token_id not in (None, -1) else []),
                          ("stop_token_ids", cfg.stop_token_ids)):
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise Gpt2OnnxError(f"{name} {bad[0]} is outside the vocabulary 0..{self.vocab_size - 1}")
        return cfg

    def request(self, prompt: str | list[int], cfg: GenerationConfig, limit: int | None = None, index: int = 0,
                stream: bool = True, prompt_logprobs: int | None = None, score_only: bool = False) -> Request:
        """Validate one prompt (text or token ids) against `cfg` and a context of `limit` positions
        (default the model's) and make its Request. `stream`: the caller hands out tokens as they
        come (stream, the Scheduler), which beam search cannot: it knows its tokens only at the end.
        `prompt_logprobs` k: the prompt's tokens are scored as its passes run, k alternatives each;
        `score_only`: only that (it needs no positions beside the prompt; cfg.max_new_tokens is not generated).

        Raises:
            Gpt2OnnxError: empty prompt, ids outside the vocabulary, a request longer than the context,
                num_beams > 1 for a streaming caller.
        """
        if stream and cfg.num_beams > 1:
            raise Gpt2OnnxError("num_beams > 1 knows its tokens only at the end, so it cannot stream or run in the "
                                "Scheduler (the server); use generate, generate_text or chat, or num_beams=1")
        limit, room = limit or self.n_positions, 0 if score_only else cfg.max_new_tokens
        row = self._prompt_ids(prompt, index, room, limit, cfg.truncate)
        eos = self.eos_token_id if cfg.eos_token_id is None else cfg.eos_token_id
        return Request(row[-(limit - room):], cfg, eos, self.decode, self.vocab_size, prompt_logprobs, score_only)

    def _prompt_ids(self, prompt: str | list[int], index: int, max_new: int, limit: int, truncate: bool) -> list[int]:
        """The prompt's token ids, checked: text or integer ids inside the vocabulary, not empty, and
        (unless `truncate`, which keeps the last ones) fitting `limit` positions beside `max_new` tokens."""
        if isinstance(prompt, str) and not truncate:
            self._refuse_unencoded(prompt, index, max_new, limit)
        row = self.encode(prompt, index) if isinstance(prompt, str) else prompt
        # a set or a dict has no order of its own (a set's ids came in hash order, a dict's keys as a text)
        if isinstance(row, (int, np.integer, bytes, bytearray, set, frozenset, dict)) or not hasattr(row, "__iter__"):
            raise Gpt2OnnxError("a prompt must be text or a list of token ids", param="prompt")
        row = list(row)
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in row):  # no 1.7, "15", True
            raise Gpt2OnnxError(f"prompt {index} must hold integer token ids", param="prompt")
        row = [int(t) for t in row]
        if not row:
            raise Gpt2OnnxError(f"prompt {index} is empty; pass at least one token", param="prompt")
        bad = [t for t in row if not 0 <= t < self.vocab_size]
        if bad:
            raise Gpt2OnnxError(f"token id {bad[0]} in prompt {index} is outside the vocabulary 0..{self.vocab_size - 1}",
                                param="prompt")
        if max_new >= limit:
            raise ContextOverflow(index, 0, max_new, limit)
        if len(row) > limit - max_new and not truncate:
            raise ContextOverflow(index, len(row), max_new, limit)
        return row

    def _requests(self, prompts, kw: dict, where: str) -> list[Request]:
        cfg = _no_logprobs(self.config(**kw), where)
        if isinstance(prompts, (str, bytes, bytearray, set, frozenset, dict)) or not hasattr(prompts, "__iter__"):
            raise Gpt2OnnxError("input_ids must be a non-empty list of lists of token ids", param="prompt")
        prompts = list(prompts)  # a generator, a tuple, a 2-D numpy array's rows
        if not prompts or isinstance(prompts[0], (int, np.integer)):
            raise Gpt2OnnxError("input_ids must be a non-empty list of lists of token ids", param="prompt")
        return [self.request(p, cfg, index=i, stream=False) for i, p in enumerate(prompts)]

    # ---- text ------------------------------------------------------------------------------

    def _refuse_unencoded(self, text: str, index: int, max_new: int, limit: int) -> None:
        """Refuse a text too long to fit before the tokenizer runs: it holds the GIL ~1.4 s a megabyte (the
        server's event loop, every stream with it). No token covers more UTF-8 bytes than the
        vocabulary's longest piece spells, so bytes // that is a lower bound on the text's tokens."""
        room = limit - max_new
        if len(text) <= room:  # a token covers at least one character's byte: nothing to prove
            return
        least = self.token_floor(text)
        if least > room:
            raise ContextOverflow(index, least, max_new, limit, at_least=True)

    def token_floor(self, text: str) -> int:
        """A lower bound on `text`'s tokens, without the tokenizer (which holds the GIL ~1.4 s a megabyte):
        no token covers more UTF-8 bytes than the vocabulary's longest piece spells."""
        if self._longest_piece is None:  # made at the first long text: ~30 ms over the vocabulary
            self._longest_piece = max(len(s.encode("utf-8")) for s in self.tokenizer.get_vocab(with_added_tokens=True))
        return len(text.encode("utf-8", "surrogatepass")) // self._longest_piece

    def encode(self, text: str, index: int | None = None) -> list[int]:
        """`text`'s token ids; `index` names the prompt in errors (which of several is empty, say)."""
        what = "prompt" if index is None else f"prompt {index}"
        if not isinstance(text, str):
            raise Gpt2OnnxError(f"{what} must be text, got {type(text).__name__}", param="prompt")
        require_utf8(text, what, "prompt")
        if not text:
            raise Gpt2OnnxError(f"{what} is empty; pass some text", param="prompt")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """The special tokens' ids (<|endoftext|> ...): `decode` leaves them out of the text."""
        return frozenset(i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for. A byte-level BPE token may hold part of a multi-byte
        character, which decode([id]) renders as U+FFFD; OpenAI's logprobs give the token's real
        bytes so a client can join them. Special tokens give their text."""
        piece = self.tokenizer.id_to_token(int(token_id)) or ""
        table = _byte_decoder()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return self.decode([token_id]).encode("utf-8")  # not a byte-level vocabulary

    # ---- entry points ----------------------------------------------------------------------

    def generate(self, input_ids: list[list[int]], cache: PromptCache | None = None, **kw) -> list[list[int]]:
        """Generate for a batch of prompts of any lengths.

        Args:
            input_ids: one list of token ids per row.
            cache: reuse the keys and values of an earlier batch-1 request, up to the prefix this prompt shares
                (see PromptCache); one row only.
            **kw: GenerationConfig fields (max_new_tokens, do_sample, temperature, top_k, top_p,
                repetition_penalty, seed, eos_token_id, truncate, stop, stop_token_ids,
                no_repeat_ngram_size, min_new_tokens; num_beams, length_penalty, early_stopping for
                beam search, which returns each prompt's best beam).
        Returns:
            the new tokens of each row, stopping after its EOS / stop token (included).
        Raises:
            Gpt2OnnxError: bad options, empty prompt, ids outside the vocabulary, a request longer than the context.
        """
        reqs = self._requests(input_ids, kw, "generate")
        for _ in self.run(reqs, cache):
            pass
        return [r.tokens for r in reqs]

    def generate_text(self, prompt: str | list[str], **kw) -> str | list[str]:
        """Generate from text; returns the new text of each prompt (a str for a str), cut before a stop string."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise Gpt2OnnxError("generate_text takes text or a list of texts; pass token ids to generate")
        if not prompts:
            raise Gpt2OnnxError("no prompts given; pass at least one")
        reqs = self._requests(prompts, kw, "generate_text")
        for _ in self.run(reqs):
            pass
        texts = [r.text.text for r in reqs]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str | list[int], cache: PromptCache | None = None, **kw) -> Iterator[str]:
        """Yield the new text piece by piece. A piece never ends inside a multi-byte character:
        a token that leaves a character incomplete is held until the next one completes it."""
        req = self.request(prompt, _no_logprobs(self.config(**kw), "stream"))  # validated here, before the first next()
        return (ev.text for events in self.run([req], cache) for ev in events if ev.text)

    def score(self, prompt: str | list[int], top_logprobs: int = 0, index: int = 0) -> list[Token]:
        """Each token of `prompt` with its log-probability given the tokens before it (the first token
        has none) and the `top_logprobs` likeliest tokens at its place, as generated tokens' logprobs
        are computed (the raw logits). What OpenAI's echo with logprobs returns, and what perplexity and
        multiple-choice evaluations read (lm-evaluation-harness scores through it).

        The prompt runs through a decode core of its own in passes of SCORE_CHUNK tokens, keeping every
        position's logits ([chunk, vocab] floats at a time, not [len, vocab]); uncaptured, beside any
        generation on this engine.

        Raises:
            Gpt2OnnxError: bad top_logprobs, an empty prompt, ids outside the vocabulary, a prompt longer than the context.
        """
        _int(top_logprobs, "top_logprobs", 0, MAX_LOGPROBS)
        try:
            row = self._prompt_ids(prompt, index, 0, self.n_positions, truncate=False)
        except ContextOverflow as e:  # its advice speaks of max_new_tokens and truncate, which scoring has not
            raise Gpt2OnnxError(f"{e.describe('max_new_tokens')}; shorten it", param="prompt") from None
        dec, scores = self.decoder(1, len(row), captured=False), PromptScores(row, top_logprobs, self.decode)
        for start in range(0, len(row), SCORE_CHUNK):
            scores.add(start, dec.prefill(0, [row[start: start + SCORE_CHUNK]], every=True))  # [chunk, vocab]
        dec.close()
        return scores.tokens

    def chat(self, **kw):
        """A DialoGPT chat session over this engine; `kw` are generation options."""
        from .chat import ChatSession

        return ChatSession(self, _no_logprobs(self.config(**kw), "chat"))

    # ---- the decode loop -------------------------------------------------------------------

    def run(self, reqs: list[Request], cache: PromptCache | None = None) -> Iterator[list]:
        """Decode `reqs` together (one sampled token per unfinished request per step) until all
        finish; yields each step's new Token events. Once half the rows have finished, the live
        ones are packed into the first rows so finished ones stop costing work. Beam search
        (num_beams > 1) yields once, at the end."""
        if cache is not None and not isinstance(cache, PromptCache):
            raise Gpt2OnnxError(f"cache must be a PromptCache or None, got {type(cache).__name__}", param="cache")
        if reqs and reqs[0].cfg.num_beams > 1:
            yield from self._run_beams(reqs, cache)
            return
        if cache is not None and len(reqs) != 1:
            raise Gpt2OnnxError(f"a prompt cache serves one prompt at a time, got {len(reqs)}; pass one prompt or no cache")
        with self._turn(reqs, cache) as dec:
            self._local.stats = stats = Stats(batch=len(reqs), prompt_tokens=sum(len(r.ids) for r in reqs))
            logits = self._prefill(dec, reqs, cache, stats)
            try:
                yield from self._decode(dec, reqs, logits, stats)
            finally:
                if cache is not None:  # the cache holds the prompt and every reply token fed back
                    cache.ids = (reqs[0].ids + reqs[0].tokens)[: int(dec.held[0])]

    def _decode(self, dec: Decoder, reqs: list[Request], logits: np.ndarray, stats: Stats) -> Iterator[list]:
        """Sample, yield, feed back, step: until every request is done (or at their longest reply).
        When every request picks greedily, steps return their ids [n] (taken on the device where the
        decoder has a pick) instead of logits [n, vocab]; the first token comes from the prompt pass's logits."""
        live = list(range(len(reqs)))  # the request each decoder row holds
        tokens = np.full(len(reqs), self.pad_token_id, np.int64)
        greedy = all(r.greedy for r in reqs)
        out = logits  # a step's logits [n, vocab], or with the device pick its ids [n]
        for step in range(max(r.cfg.max_new_tokens for r in reqs)):
            events = [reqs[r].take(out[i]) for i, r in enumerate(live) if not reqs[r].done]
            stats.new_tokens = step + 1
            if step == 0:
                stats.ttft_s = time.perf_counter() - min(r.stats.submitted_s for r in reqs)
            yield events
            done = np.array([reqs[r].done for r in live])
            if done.all():
                return
            if dec.graph_id is None and 2 * done.sum() >= len(live) > 1:  # half the rows finished: pack the rest
                dec.reorder(np.flatnonzero(~done))
                live = [r for r, d in zip(live, done) if not d]
                done = done[~done]
            tokens = tokens[: len(live)]
            tokens[:] = [reqs[r].tokens[-1] for r in live]
            tokens[done] = self.pad_token_id
            t = time.perf_counter()
            out = dec.decode_greedy(tokens, ~done) if greedy else dec.decode(tokens, ~done)
            dt = time.perf_counter() - t
            stats.step_s.append(dt)
            stats.decode_s += dt

    def _prefill(self, dec: Decoder, reqs: list[Request], cache: PromptCache | None, stats: Stats) -> np.ndarray:
        """The prompt pass: only the tokens past a held prefix the cache's row already has."""
        t = time.perf_counter()
        row, held = reqs[0].ids, int(dec.held[0])
        if cache is not None and held:
            stats.cached_tokens = held
            logits = dec.prefill(0, [row[held:]])
        else:
            logits = dec.prefill(0, [r.ids for r in reqs])
        stats.prefill_s = time.perf_counter() - t
        return logits

    def _run_beams(self, reqs: list[Request], cache: PromptCache | None) -> Iterator[list]:
        """Beam search over `reqs` (one config): K rows per prompt in one Decoder, uncaptured (rows
        are reordered between steps), the cache rows following their beams; yields each request's
        best hypothesis at the end."""
        if cache is not None:
            raise Gpt2OnnxError("a PromptCache does not serve beam search; pass no cache with num_beams > 1")
        K, steps = reqs[0].cfg.num_beams, reqs[0].cfg.max_new_tokens
        rows = [r.ids for r in reqs for _ in range(K)]
        dec = self.decoder(len(rows), max(map(len, rows)) + steps, captured=False)
        self._local.stats = stats = Stats(batch=len(reqs), prompt_tokens=sum(len(r.ids) for r in reqs))
        beams = Beams(reqs, self.vocab_size)
        t = time.perf_counter()
        logits = dec.prefill(0, rows)
        stats.prefill_s = time.perf_counter() - t
        while beams.advance(logits):
            dec.reorder(beams.parents)
            t = time.perf_counter()
            logits = dec.decode(beams.tokens)
            stats.step_s.append(time.perf_counter() - t)
            stats.decode_s += stats.step_s[-1]
        stats.new_tokens = beams.t
        stats.ttft_s = time.perf_counter() - min(r.stats.submitted_s for r in reqs)
        yield beams.finish()

    @contextlib.contextmanager
    def _turn(self, reqs: list[Request], cache: PromptCache | None) -> Iterator[Decoder]:
        """The Decoder a generation runs on, held for the whole generation.

        Uncaptured: a new Decoder sized for this generation; with a cache, the cache's batch-1 row
        (kept up to the longest prefix it shares with the prompt), else a new row of the whole position
        table that the cache keeps for the next turn. Captured (CUDA graphs): the engine's Decoder of the batch's
        bucket at the whole position table, one generation at a time; the cache's tokens survive
        only while no other generation has taken that Decoder since. A generation a thread starts while
        its own earlier one is still open (a stream not finished: two zipped, chat.send inside one) runs
        uncaptured: waiting for the lock would wait for itself, and one thread runs one pass at a time."""
        if cache is not None:
            cache.acquire()
        try:
            me = threading.get_ident()
            if not self.cuda_graph or self._graph_holder == me:
                yield self._pick(reqs, cache, captured=False)
            else:
                with self._graph_lock:
                    self._graph_holder = me
                    try:
                        yield self._pick(reqs, cache, captured=True)
                    finally:
                        self._graph_holder = None
        finally:
            if cache is not None:
                cache.release()

    def _pick(self, reqs: list[Request], cache: PromptCache | None, captured: bool) -> Decoder:
        steps = max(r.cfg.max_new_tokens for r in reqs)
        if captured:
            b = 1 << (len(reqs) - 1).bit_length()
            if b not in self._graph_decoders:
                self._graph_decoders[b] = self.decoder(b, self.n_positions)
            dec, owner = self._graph_decoders[b], self._graph_owner.get(b)
            self._graph_owner[b] = cache
        elif cache is not None:  # a cache filled by another engine is not read
            mine = cache.decoder is not None and cache.decoder.session is self.session and cache.decoder.graph_id is None
            dec, owner = cache.decoder if mine else self.decoder(1, self.n_positions, captured=False), cache
        else:
            return self.decoder(len(reqs), max(len(r.ids) for r in reqs) + steps, captured=False)
        keep = cache.reusable(reqs[0].ids, steps) if cache is not None and owner is cache and cache.decoder is dec else 0
        for r in range(dec.slots):  # row 0 keeps the prefix it shares with the prompt; the rest start over
            dec.truncate(r, keep if r == 0 else 0)
        if cache is not None:
            cache.decoder, cache.ids = dec, cache.ids[:keep]
        return dec


def _no_logprobs(cfg: GenerationConfig, where: str) -> GenerationConfig:
    """`where` returns tokens or text only: a logprobs option would be computed and dropped."""
    if cfg.logprobs is not None:
        raise Gpt2OnnxError(f"{where} returns no log-probabilities; drop logprobs, or submit the request to a Scheduler "
                            "(Result.logprobs) or read the Token events of Engine.run", param="logprobs")
    return cfg


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet read back: each of the 256 bytes is one printable character in the
    vocabulary's token strings (printable Latin-1 bytes stand for themselves, the rest are shifted
    to U+0100 and up, in byte order)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(shifted)}}
