"""The one decode core: a KV cache of rows ("slots") and the passes that run them.

Per layer and tensor one buffer [slots, heads, capacity, head_dim] holds every row's keys and
values, bound as both GroupQueryAttention's past and present, so the op writes each new token in
place. Row r holds `held[r]` tokens at columns 0 .. held[r] - 1. The graph reads each row's length
from its mask row (seqlens_k = the last column holding a 1), so rows of any lengths decode together
and attend to nothing else: a row feeding a token has mask ones on [0, held] and the op writes at
column held, the token's position. Prompts of different lengths run in one pass right-padded: a
row's padding lands after its tokens, where its own next tokens overwrite it.

Everything that generates drives this class: `Engine.generate` / `stream` / `chat` and beam search
on the caller's thread (a Decoder of their own rows), the Scheduler from its loop (one Decoder of
`max_batch` slots), a PromptCache (a batch-1 Decoder kept with its tokens). It is handed the model
spec and the session, never the Engine.

CPU: the step's inputs and outputs are bound by address to host arrays, once per batch size, so a
step writes a few numbers and runs (no allocation). CUDA: the same arrays are copied into device
buffers at fixed addresses before each step; with CUDA graphs the step is captured once per batch
bucket (1, 2, 4 ... rows, `graph_id` from the engine's per-session counter) and replayed, while
prompt passes of their own shapes run uncaptured (gpu_graph_id -1); a prompt fed in fixed-width
chunks (`chunk`, one row a pass) is captured once per row and width like the step, and with the
artifact's mixed step graph (`Mixed`, `decode_with_chunk`) such a chunk runs inside a step's pass,
captured once per bucket, row and width. Rows that all pick
greedily step through `decode_greedy`: with a Pick (the artifact's pick.onnx as its own session, on
CUDA) the argmax runs where the logits lie and only the ids reach the host.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from .errors import Gpt2OnnxError, one_line
from .spec import ModelSpec

# Greedy's pick goes to the device from steps of this many rows (buckets under CUDA graphs). Why 4:
# measured on an H200 (DialoGPT-medium fp16, reports/gpu/step.md), copying a step's logits to the host
# costs ~0.04 ms + 0.2 ms per MB (0.08 ms at 1 row, 2.6 ms at 64; 0.2 MB a row) and numpy's argmax
# ~0.005 ms a row, while the pick costs its ArgMax kernel (~0.1 ms) and the ids' copy (0.01 ms) at
# any batch: even at 2 rows, ahead from 4, ~0.6 ms a step at 16 and ~3.5 ms at 64.
PICK_FROM = 4

# A prompt over an int8 KV cache (the int8 and int4 artifacts, CPU) runs in passes of at most this many
# tokens: onnxruntime's GroupQueryAttention with an int8 cache costs more than linearly in a pass's
# length, a float cache does not. Measured on DialoGPT-small, 2 cores (AMD EPYC), batch-1 TTFT through
# Engine.generate, medians of 10 interleaved: 512 tokens int8 663 -> 581 ms, int4 1095 -> 1038; 1000
# tokens int8 2647 -> 1896, int4 2613 -> 2246 (prefill alone, 128 or 256 a pass about the same); 200
# tokens level; fp32 at 1000 tokens 1807 in one pass, 1885 in passes of 256, so float caches keep one.
# 128 since 2026-12-08: on the 2-core AMD EPYC with AVX-512 VNNI, passes of 128 against 256 (medians of 5
# interleaved, the same prompts) took int8 124 / 210 / 497 ms against 129 / 220 / 518 at 300 / 512 / 1000
# tokens, int4 180 / 311 / 700 against 187 / 323 / 734 (64, 96 and 192 no better); on the AVX2 box above
# 128 and 256 were about the same.
# The logits are bit-equal for int4 and int8 nbits; int8's dynamic quantization scales each pass's
# activations by itself, so its logits move within its tolerance (as they do with a pass's batch).
INT8_KV_PASS = 128


class Pick:
    """Greedy's next token computed where a step's logits lie: the artifact's pick graph (ArgMax over
    logits [b, 1, vocab] -> int64 [b, 1]) as a session of its own, run right after the decode step on
    the step's logits buffer. On CUDA the logits then stay on the device and the step copies b ids to
    the host; the pick's run is captured like the step (one graph per step binding, fixed addresses).

    Args:
        session: the pick graph's onnxruntime session (session.build_pick_session).
        spec: the model spec (the pick's input and output names).
        device: where the step's logits lie ("cpu" | "cuda").
        captured: the session was created with enable_cuda_graph (each binding then gets a graph id).
    """

    def __init__(self, session, spec: ModelSpec, device: str, captured: bool):
        import onnxruntime as ort

        self.ort, self.session, self.spec, self.device = ort, session, spec, device
        self._graph_ids = itertools.count(1) if captured else None  # ids are per session: the pick's own
        self.runs = 0
        self.broken: str | None = None  # why the pick failed once (then every step picks on the host)

    def fail(self, err: Exception) -> None:
        """An optional speed-up that failed (e.g. a capture onnxruntime refuses on some GPU): say so once
        and leave greedy to the host from now on, rather than failing the requests."""
        import warnings

        self.broken = one_line(err, 200)
        warnings.warn(f"greedy's pick on the device failed ({self.broken}); picking on the host from now on",
                      RuntimeWarning, stacklevel=2)

    def bind(self, logits, b: int) -> tuple:
        """The binding of a pick over b rows of `logits`: a host array [>= b, 1, vocab] (bound by
        address) or a device OrtValue [b, 1, vocab]. Made once per step binding (Decoder keeps it)."""
        n, ort = self.spec.names, self.ort
        io = self.session.io_binding()
        if isinstance(logits, np.ndarray):  # the CPU provider: bound by address, nothing copied
            io.bind_input(n.logits, "cpu", 0, np.float32, [b, 1, self.spec.vocab_size], logits.ctypes.data)
            ids = np.zeros((b, 1), np.int64)
            io.bind_output(n.next_token, "cpu", 0, np.int64, [b, 1], ids.ctypes.data)
        else:
            io.bind_ortvalue_input(n.logits, logits)
            ids = ort.OrtValue.ortvalue_from_shape_and_type([b, 1], np.int64, self.device, 0)
            io.bind_ortvalue_output(n.next_token, ids)  # before the first run: the capture records it
        ro = None
        if self._graph_ids is not None:
            ro = ort.RunOptions()
            ro.add_run_config_entry("gpu_graph_id", str(next(self._graph_ids)))  # first run captures, then replays
        return io, ids, ro

    def run(self, binding: tuple) -> np.ndarray:
        """The ids [b] of one bound pick (valid until the binding's next run)."""
        io, ids, ro = binding
        self.session.run_with_iobinding(io, ro)
        self.runs += 1
        return (ids if isinstance(ids, np.ndarray) else ids.numpy())[:, 0]


class Mixed:
    """The artifact's mixed step graph (mixed.onnx) as a session of its own: a decode step over b rows and
    one other row's next prompt chunk in one pass, every weight read once for both (vLLM's chunked prefill
    mixes prompt and decode tokens in one batch the same way). Two GroupQueryAttention nodes a layer tell
    them apart, since the op takes a multi-token pass over a past for one row only.

    Args:
        session: the mixed graph's onnxruntime session (session.build_mixed_session).
        captured: the session was created with enable_cuda_graph (each binding then gets its own graph id).
    """

    def __init__(self, session, captured: bool):
        self.session = session
        self._graph_ids = itertools.count(1) if captured else None  # ids are per session: the mixed graph's own
        self.runs = 0

    def run_options(self):
        if self._graph_ids is None:
            return None
        import onnxruntime as ort

        ro = ort.RunOptions()
        ro.add_run_config_entry("gpu_graph_id", str(next(self._graph_ids)))  # first run captures, then replays
        return ro


def right_pad(rows: list[list[int]], pad_id: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, attention_mask, position_ids [rows, width (default the longest)] of a right-padded batch, as a
    fused graph takes it: each row from column 0, its padding after it repeating its last position (0 ..
    len - 1, len - 1 ...)."""
    width = width or max(map(len, rows))
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = row
        mask[r, :len(row)] = 1
    return ids, mask, np.cumsum(mask, axis=1) - 1


class Decoder:
    """`slots` rows of `capacity` positions over one session.

    Args:
        spec: the model's dims, ids and IO names (ModelSpec.from_manifest).
        session: the onnxruntime InferenceSession of a fused (in-place KV) graph.
        slots, capacity: rows and positions per row of the KV cache.
        device: "cpu" or "cuda" (where the KV cache lives).
        graph_id: CUDA graphs: called once per batch bucket for a session-wide unique graph id; None = uncaptured.
        prefault: write the CPU cache once now (a long-lived scheduler: its first prompts then pay no page faults).
        session_graphs: the session was created with enable_cuda_graph, where a run that names no graph is
            captured as graph 0: then every run this Decoder does not capture says gpu_graph_id -1.
        pick: greedy's pick on the device for `decode_greedy` (None: numpy's argmax of the logits).
        mixed: the mixed step graph for `decode_with_chunk` (None: a chunk and a step are two passes).
    """

    def __init__(self, spec: ModelSpec, session, slots: int, capacity: int, device: str = "cpu",
                 graph_id: Callable[[], int] | None = None, prefault: bool = False, session_graphs: bool = False,
                 pick: Pick | None = None, mixed: Mixed | None = None):
        import onnxruntime as ort

        if not spec.in_place_kv:
            raise Gpt2OnnxError("this artifact's graph concatenates its KV cache (exported with --no-fuse); the runtime "
                                "decodes fused graphs only, re-export without --no-fuse")
        self.ort, self.spec, self.session = ort, spec, session
        self.slots, self.capacity, self.device, self.graph_id, self.pick = slots, capacity, device, graph_id, pick
        self.mixed = mixed
        self.kv_names = spec.kv_names
        self.row_bytes = spec.n_head * capacity * spec.head_dim * spec.kv_dtype.itemsize
        self._kv = self._alloc_kv(prefault)  # [slots, heads, capacity, head_dim] per layer and tensor
        self._spare: list | None = None  # reorder's second set, made at its first call
        self._set = 0  # which of the two sets `_kv` is (bindings are cached per set)
        # host inputs of a decode step [slots, ...]; a step over b rows reads the first b
        self.ids = np.full((slots, 1), spec.pad_token_id, np.int64)
        self.pos = np.zeros((slots, 1), np.int64)
        self._inputs = {1: (self.ids, self.pos)}  # width -> (ids, positions) [slots, width], made once per width
        self.mask = np.zeros((slots, capacity), np.int64)
        # [slots, 1, vocab]: the CPU graph writes each pass's logits here (bound by address); on CUDA only
        # prompt passes do, a fixed-shape pass's come back from its device buffer in one copy (_run)
        self.logits = np.zeros((slots, 1, spec.vocab_size), np.float32)
        self.held = np.zeros(slots, np.int64)  # tokens whose keys and values row r holds
        self.mhi = np.zeros(slots, np.int64)  # mask row r is 1 on [0, mhi), 0 elsewhere (mhi = held + 1 after a step)
        self._rows = np.arange(slots)
        self.keep = np.array(1, np.int64)  # num_logits_to_keep: only the last position's logits, prompt passes too
        # (set, first row, rows, width) -> the binding of a fixed-shape pass, made once: decode steps
        # (first 0, width 1) and fixed-width prompt chunks (one row, `chunk`)
        self._steps: dict[tuple[int, int, int, int], tuple] = {}
        self._picks: dict[tuple, tuple] = {}  # the same keys (and _mixed's) -> the binding of their Pick
        # (set, rows, chunk row, width) -> the binding of a mixed pass (decode_with_chunk), made once
        self._mixed: dict[tuple[int, int, int, int], tuple] = {}
        self.chunk_ids = np.full((1, 0), spec.pad_token_id, np.int64)  # a mixed pass's chunk [1, width] (per width)
        self.chunk_pos = np.zeros((1, 0), np.int64)
        self.chunk_mask = np.zeros((1, capacity), np.int64)  # the chunk row's mask: ones on [0, held + width)
        self.chunk_logits = np.zeros((1, 1, spec.vocab_size), np.float32)  # CPU: its last token's logits
        self._prompt_ro = None  # prompt passes have their own shapes: never captured
        if graph_id is not None or session_graphs:
            self._prompt_ro = ort.RunOptions()
            self._prompt_ro.add_run_config_entry("gpu_graph_id", "-1")

    def _alloc_kv(self, prefault: bool) -> list:
        s = self.spec
        shape = [self.slots, s.n_head, self.capacity, s.head_dim]
        if self.device == "cpu" and prefault:
            # written now: np.zeros maps untouched pages and a slot's first prompt would pay their page
            # faults (measured: up to 35 ms on a 20-token prompt)
            return [np.full(shape, 0, s.kv_dtype) for _ in self.kv_names]
        # onnxruntime's allocator: a one-off generation's cache then reuses the pages an earlier one
        # faulted in (fresh pages from the system cost batch-16 fp32 DialoGPT-small ~35 ms of TTFT)
        return [self.ort.OrtValue.ortvalue_from_shape_and_type(shape, s.kv_dtype, self.device, 0) for _ in self.kv_names]

    def kv_arrays(self) -> list[np.ndarray]:
        """The CPU cache as numpy views [slots, heads, capacity, head_dim] per layer and tensor (no copies)."""
        return [a if isinstance(a, np.ndarray) else a.numpy() for a in self._kv]

    def _ptrs(self, kv: list) -> list[int]:
        return [a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr() for a in kv]

    def close(self) -> None:
        """Release the cache and the bindings (a closed scheduler keeps nothing)."""
        self._kv = self._spare = None
        self._steps.clear()
        self._picks.clear()
        self._mixed.clear()

    # ---- rows --------------------------------------------------------------------------------

    def batch_for(self, n: int) -> int:
        """Rows a step over the first n runs: n, or with CUDA graphs the bucket (power of two) holding n."""
        return n if self.graph_id is None else min(1 << (n - 1).bit_length(), self.slots)

    def capture(self, width: int = 0) -> int:
        """Capture every fixed-shape pass this core can run, now, on empty rows: a long-lived core's (the
        Scheduler's) CUDA graphs are then made at start, not while requests wait on them (vLLM captures its
        batch sizes at start the same way). The decode step of each bucket (with greedy's device pick where
        it runs), and with a `width`, each row's `chunk` of that width and, with the mixed graph, each
        bucket's mixed pass with each row's chunk. Every row is empty before and after. Returns the passes run."""
        if self.graph_id is None or self.held.any():
            return 0
        pad, runs = self.spec.pad_token_id, 0
        buckets = sorted({self.batch_for(n) for n in range(1, self.slots + 1)})
        for b in buckets:
            tokens, idle = np.full(b, pad, np.int64), np.zeros(b, bool)
            self._step(tokens, idle, pick=self.pick is not None and b >= PICK_FROM)
            runs += 1
            if not width or self.mixed is None:
                continue
            for r in range(self.slots):
                if self.can_mix(r, width, b):
                    self.decode_with_chunk(tokens, idle, r, [pad], width, greedy=self.pick is not None, last=False)
                    runs += 1
        if width and self.fits(0, width):
            for r in range(self.slots):
                self.chunk(r, [pad], width)
                runs += 1
        for r in range(self.slots):
            self._set_row(r, 0)
        self.mask[:] = 0
        return runs

    def truncate(self, r: int, n: int) -> None:
        """Row r keeps its first n tokens (a held prefix reused by a new request, or 0: empty)."""
        self._check_row(r)
        if not 0 <= n <= self.held[r]:
            raise Gpt2OnnxError(f"row {r} holds {int(self.held[r])} tokens; it can keep 0 to {int(self.held[r])}, not {n}")
        self._set_row(r, n)

    def _set_row(self, r: int, held: int) -> None:
        self.mask[r, held: max(self.mhi[r], held)] = 0
        self.mask[r, :held] = 1
        self.held[r], self.mhi[r] = held, held

    def reorder(self, parents: np.ndarray) -> None:
        """Row i continues the sequence row parents[i] holds (int64 [k]); rows k.. are left as they are.
        Beam search calls it every step, a generation whose rows finished to pack the live ones into
        rows 0..k-1. On CPU the cache rows are gathered into a second set of buffers, made once, which
        then takes the first one's place: no allocation per token."""
        k = len(parents)
        self.held[:k], self.mhi[:k] = self.held[parents], self.mhi[parents]
        self.mask[:k] = self.mask[parents]
        if self.device != "cpu":  # device buffers: gathered through the host, addresses kept
            for v in self._kv:
                a = v.numpy()
                a[:k] = a[parents]
                v.update_inplace(a)
            return
        if self._spare is None:
            self._spare = self._alloc_kv(prefault=False)
            self._views = self.kv_arrays(), [a.numpy() for a in self._spare]  # views, made once
        (src, dst), (kv, spare) = self._views, (self._kv, self._spare)
        for a, b in zip(src, dst):
            np.take(a, parents, axis=0, out=b[:k], mode="clip")  # [k, heads, capacity, head_dim]; "clip": unbuffered
        self._kv, self._spare, self._set, self._views = spare, kv, 1 - self._set, (dst, src)

    # ---- the passes --------------------------------------------------------------------------

    def prefill(self, first: int, rows: list[list[int]], every: bool = False) -> np.ndarray:
        """Run prompt tokens on rows first .. first + len(rows) - 1, after the tokens each row holds;
        returns the logits of each row's last token [rows, vocab], or with `every` (one row) the
        logits at each of its tokens [S, vocab] in a new array (scoring a prompt: Engine.score).

        One row may extend what it holds (a held prefix, a prompt's next chunk). Several rows run in
        one pass only from empty (held 0): right-padded to the longest, the padding masked out (the
        graph keeps each row's logits at its last real token).
        """
        k, s = len(rows), self.spec
        self._check_open()
        if every and k != 1:
            raise ValueError("every position's logits come one row at a time")
        if not (k and 0 <= first and first + k <= self.slots):  # the pass writes rows first .. first + k - 1 by address
            raise Gpt2OnnxError(f"{k} prompt row{'s' if k != 1 else ''} from row {first} do not fit this decoder's "
                                f"{self.slots} slot{'s' if self.slots != 1 else ''} (rows 0 .. {self.slots - 1})")
        for i, row in enumerate(rows):
            if isinstance(row, (str, bytes, bytearray)) or (len(row) and np.asarray(row).dtype.kind not in "iu"):  # not b"Hi", 13.9
                raise Gpt2OnnxError(f"prompt row {i} must be a list of integer token ids")
            if not len(row) or min(row) < 0 or max(row) >= s.vocab_size:
                what = "is empty" if not len(row) else f"holds an id outside the vocabulary [0, {s.vocab_size})"
                raise Gpt2OnnxError(f"prompt row {i} {what}")
        if k == 1:
            r, row = first, rows[0]
            h = int(self.held[r])
            T = h + len(row)
            # a long prompt over an int8 cache in passes (INT8_KV_PASS); one that does not fit goes on to the
            # refusal below whole, before any pass has run
            pieces = len(row) > INT8_KV_PASS and s.kv_dtype == np.int8 and self.device == "cpu" and not every
            if pieces and T <= self.capacity:
                starts = range(0, len(row), INT8_KV_PASS)
                for a in starts[:-1]:
                    self.prefill(first, [row[a: a + INT8_KV_PASS]])
                return self.prefill(first, [row[starts[-1]:]])  # the last piece's last token's logits
            # one padding column where the pass would leave its last row alone (lone_tail), as `chunk` pads: its
            # position repeats the last (whose logits the graph keeps), and the mask's one more column keeps
            # GQA's past at seqlens_k + 1 - (S + 1) = held
            pad = int(self.lone_tail(len(row), h) and T < self.capacity)
            ids = np.array([[*row, *[s.pad_token_id] * pad]], np.int64)  # [1, S + pad]
            pos = np.minimum(np.arange(h, T + pad, dtype=np.int64), T - 1)[None]  # [1, S + pad]
            mask = np.ones((1, T + pad), np.int64)  # exactly [1, T (+ pad)] for a prompt pass
        else:
            if self.held[first: first + k].any():
                raise ValueError("rows run together in one prompt pass must start empty")
            T = max(map(len, rows))
            pad = int(self.lone_tail(T, 0) and T < self.capacity)  # one more padding column (masked, as the rest)
            ids, mask, pos = right_pad(rows, s.pad_token_id, T + pad)
        if T > self.capacity:
            raise Gpt2OnnxError(f"a prompt of {T} positions does not fit the {self.capacity}-position KV cache")
        n = s.names
        io = self.session.io_binding()
        self._bind_kv(io, first, k)
        io.bind_cpu_input(n.input_ids, ids)
        io.bind_cpu_input(n.position_ids, pos)
        io.bind_cpu_input(n.attention_mask, mask)
        if every:  # num_logits_to_keep 0: the graph keeps every position's hidden state for the head
            out = np.empty((1, ids.shape[1], s.vocab_size), np.float32)
            io.bind_cpu_input(n.logits_to_keep, np.array(0, np.int64))
            io.bind_output(n.logits, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        else:
            io.bind_cpu_input(n.logits_to_keep, self.keep)
            io.bind_output(n.logits, "cpu", 0, np.float32, [k, 1, s.vocab_size], self.logits[first:].ctypes.data)
        self.session.run_with_iobinding(io, self._prompt_ro)
        for i, row in enumerate(rows):
            r = first + i
            self._set_row(r, (int(self.held[r]) if k == 1 else 0) + len(row))
        return out[0, :len(rows[0])] if every else self.logits[first: first + k, 0]

    def lone_tail(self, width: int, held: int) -> bool:
        """Whether a prompt pass of `width` columns over a row holding `held` tokens would leave its last
        query row alone in a block of onnxruntime's CPU attention over a float cache. That attention works
        through a pass's rows in blocks of 2 x head_dim (measured with onnxruntime 1.32 on AVX2: a block of 16,
        32, 64, 128 rows at head sizes 8, 16, 32, 64), and a row alone in its block (a pass of 129 tokens'
        last at head size 64, or any one-token pass over a past) comes out ~2e-6 apart from the same row in a
        block of more. How a prompt is split into passes is up to its batch-mates (a right-padded group's width,
        the scheduler's chunks while others decode, a held prefix), so such a pass gets one padding column:
        every prompt row is then computed in a block of two or more whatever shares its batch, and a
        request's fp32 tokens cannot depend on it (tests/test_runtime.py). Decode steps are one row per
        sequence for every row alike. The int8 cache's attention has no such tail (measured exact)."""
        s = self.spec
        return (self.device == "cpu" and s.kv_dtype != np.int8 and width % (2 * s.head_dim) == 1
                and (width > 1 or held > 0))

    def decode(self, tokens: np.ndarray, live: np.ndarray | None = None) -> np.ndarray:
        """One step over rows 0 .. n-1: row r feeds tokens[r] (int64 [n]) at its next position; a row
        where `live` (bool [n]) is False runs as a harmless idle row (its write lands past its tokens
        and is not kept). Returns logits [n, vocab]. Ids outside the vocabulary are refused."""
        return self._step(tokens, live, pick=False)[: len(tokens), 0]

    def decode_greedy(self, tokens: np.ndarray, live: np.ndarray | None = None) -> np.ndarray:
        """`decode` for rows that all take the argmax of their raw logits: returns each row's next token,
        int64 [n]. With a Pick and a step of PICK_FROM rows or more the argmax runs where the logits lie
        and only the ids reach the host; else it is numpy's over the logits `decode` returns."""
        n = len(tokens)
        if self.pick is None or self.pick.broken or self.batch_for(n) < PICK_FROM:
            return self.decode(tokens, live).argmax(-1)
        return self._step(tokens, live, pick=True)[:n]

    def can_mix(self, r: int, width: int, n: int) -> bool:
        """Whether `decode_with_chunk` can run row r's chunk of `width` columns beside a step over rows
        0 .. n-1 (a row of the step's bucket needs one more free column: its idle write goes after the chunk)."""
        return self.mixed is not None and int(self.held[r]) + width + (r < self.batch_for(n)) <= self.capacity

    def decode_with_chunk(self, tokens: np.ndarray, live: np.ndarray, r: int, chunk: list[int], width: int,
                          greedy: bool = False, last: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """`decode` (or with `greedy` `decode_greedy`) over rows 0 .. n-1 and `chunk` over row r, one pass of
        the mixed graph; returns the step's logits [n, vocab] (ids [n]) and the chunk's last token's [vocab]
        (None without `last`: a chunk that does not end its prompt, whose logits then stay on the device).

        Row r must not decode (live[r] False where r < n). The chunk runs as `chunk` does (fixed shape
        [1, width], right-padded, captured once per bucket, row and width under CUDA graphs); where row r
        is in the step's bucket it runs there as an idle row whose write lands after the chunk's columns,
        so the two attention nodes never write the same column (`can_mix`)."""
        self._check_row(r)
        n, c, h = len(tokens), len(chunk), int(self.held[r])
        if not 1 <= c <= width:
            raise ValueError(f"a {width}-column chunk takes 1 to {width} tokens, got {c}")
        if r < n and live[r]:
            raise ValueError(f"row {r} decodes this step; its prompt chunk cannot run beside it")
        if not self.can_mix(r, width, n):
            raise Gpt2OnnxError(f"a {width}-column chunk does not fit beside the step after the {h} tokens of a "
                                f"{self.capacity}-position row")
        if self.chunk_ids.shape[1] != width:
            self.chunk_ids, self.chunk_pos = np.full((1, width), 0, np.int64), np.zeros((1, width), np.int64)
            self._mixed.clear()  # bindings point at the old arrays
        self.chunk_ids[0, :c], self.chunk_ids[0, c:] = chunk, self.spec.pad_token_id
        self.chunk_pos[0, :c], self.chunk_pos[0, c:] = np.arange(h, h + c), h + c - 1
        self.chunk_mask[0, :h + width], self.chunk_mask[0, h + width:] = 1, 0
        # row r's idle write in the step (if in the bucket) lands after the chunk's columns: onnxruntime
        # runs the step's attention node first in our graphs (1.32 CPU: even with the two nodes swapped in
        # the file, the chunk's columns come out right without this), but nothing promises that order.
        # So the idle row attends over the chunk's columns before the chunk writes them (stale or
        # never-written memory): harmless where every op is per row (its logits are dropped), which is why
        # int8's dynamic quantization, one scale over the pass's rows, is refused a mixed step
        self.held[r] = h + width
        pick = greedy and self.pick is not None and not self.pick.broken and self.batch_for(n) >= PICK_FROM
        out = self._step(tokens, live, pick, chunk_row=r)
        self._set_row(r, h + c)  # the chunk's padding and the idle write are not kept
        if greedy and not pick:
            out = out[:, 0].argmax(-1)
        chunk_logits = None
        if last:  # CPU: written in place by the graph; CUDA: one row copied
            src = self._chunk_src
            chunk_logits = (src if isinstance(src, np.ndarray) else src.numpy())[0, 0]
        return out[:n] if greedy else out[:n, 0], chunk_logits

    def _check_open(self) -> None:
        if self._kv is None:
            raise Gpt2OnnxError("this decoder is closed (its cache is released); make a new one with engine.decoder()")

    def _check_row(self, r: int) -> None:
        """Row r exists: a pass binds its cache by address (row r at r x row_bytes), unchecked by onnxruntime."""
        self._check_open()
        if not 0 <= r < self.slots:
            raise Gpt2OnnxError(f"row {r} is outside this decoder's {self.slots} slots (rows 0 .. {self.slots - 1})")

    def _step(self, tokens: np.ndarray, live: np.ndarray | None, pick: bool, chunk_row: int = -1) -> np.ndarray:
        """A decode step over the bucket holding rows 0 .. n-1: the bucket's logits [b, 1, vocab], or with
        `pick` its argmax ids [b]; with a `chunk_row`, the mixed pass (decode_with_chunk)."""
        n = len(tokens)
        if self._kv is None or not 0 < n <= self.slots:
            self._check_open()
            raise Gpt2OnnxError(f"a step takes 1 to {self.slots} tokens (one per row), got {n}")
        b = self.batch_for(n)
        # a few microseconds a step: ids that are not the vocabulary's (13.9, -5, 50257) would be truncated,
        # wrapped to the table's end by Gather, or fail inside onnxruntime with its own log line
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in "iu" or tokens.min() < 0 or tokens.max() >= self.spec.vocab_size:
            raise Gpt2OnnxError(f"a step's tokens must be integer ids in [0, {self.spec.vocab_size}), got {tokens.tolist()[:8]}")
        self.ids[:n, 0] = tokens
        if b > n:  # bucket padding rows: idle
            self.ids[n:b, 0] = self.spec.pad_token_id
        cols = self.held[:b]  # the column each row writes: its position
        self.pos[:b, 0] = cols
        try:
            self.mask[self._rows[:b], cols] = 1
        except IndexError:  # a full row (checked here, where it costs nothing until it happens)
            r = int(np.argmax(cols >= self.capacity))
            raise Gpt2OnnxError(f"row {r} holds {self.capacity} tokens, its whole capacity; truncate it or make the "
                                "decoder with a larger capacity") from None
        np.add(cols, 1, out=self.mhi[:b])
        out = self._run(0, b, 1, pick, chunk_row)
        if live is None:
            self.held[:n] += 1
        else:
            self.held[:n] += live
        return out

    def fits(self, r: int, width: int) -> bool:
        """Whether a `chunk` of `width` columns fits after the tokens row r holds."""
        return int(self.held[r]) + width <= self.capacity

    def chunk(self, r: int, tokens: list[int], width: int) -> np.ndarray:
        """Row r's next 1 .. width prompt tokens in a pass of fixed shape [1, width]; returns the logits of
        the last of them [vocab].

        Right-padded to `width`: the padding repeats the last position (so the graph keeps the last real
        token's logits) and lands after the row's tokens, where its own next tokens overwrite it. The
        mask gives the row held + width columns, so GroupQueryAttention reads its past as
        seqlens_k + 1 - width = held (a pass over a past takes one row: onnxruntime's GQA refuses more).
        Fixed shapes, so under CUDA graphs it is captured once per row and width and replayed, where
        `prefill` runs uncaptured: a scheduler's decoding rows then wait a replay, not a launch-bound
        prompt pass, while a prompt goes in. The row needs `width` free columns (`fits`).
        """
        self._check_row(r)
        c, h = len(tokens), int(self.held[r])
        if not 1 <= c <= width:
            raise ValueError(f"a {width}-column chunk takes 1 to {width} tokens, got {c}")
        if not self.fits(r, width):
            raise Gpt2OnnxError(f"a {width}-column chunk does not fit after the {h} tokens of a {self.capacity}-position row")
        ids, pos = self._inputs_of(width)
        ids[0, :c], ids[0, c:] = tokens, self.spec.pad_token_id
        pos[0, :c], pos[0, c:] = np.arange(h, h + c), h + c - 1
        self.mask[r, :h + width] = 1  # ones on [0, held + width)
        self.mhi[r] = max(self.mhi[r], h + width)
        out = self._run(r, 1, width)
        self._set_row(r, h + c)  # the padding's columns are not kept
        return out[0, 0]

    def _run(self, first: int, b: int, width: int, pick: bool = False, chunk_row: int = -1) -> np.ndarray:
        """Run the fixed-shape pass over rows first .. first + b - 1 on its binding; returns its logits
        [b, 1, vocab] (CPU: rows of self.logits, written in place by the graph; CUDA: the device inputs
        refreshed first, the logits copied once into a new host array), or with `pick` the rows' argmax
        ids [b], the logits left where they lie. With a `chunk_row` it is the mixed pass (decode steps
        only), the chunk's logits left where the graph wrote them (`_chunk_src`)."""
        if chunk_row >= 0:
            io, copies, device_logits, ro, chunk_logits = self._mixed_binding(b, chunk_row, self.chunk_ids.shape[1])
            key = ("mixed", self._set, b, chunk_row, self.chunk_ids.shape[1])  # its pick's binding apart from a step's
            session = self.mixed.session
            self.mixed.runs += 1
        else:
            key = (self._set, first, b, width)
            io, copies, device_logits, ro = self._binding(first, b, width)
            session = self.session
        for host, ov in copies:  # CUDA: refresh the fixed-address device copies
            ov.update_inplace(host)
        session.run_with_iobinding(io, ro)
        if chunk_row >= 0:
            self._chunk_src = chunk_logits
        if pick:
            try:
                if key not in self._picks:
                    self._picks[key] = self.pick.bind(self.logits[first:] if device_logits is None else device_logits, b)
                return self.pick.run(self._picks[key])
            except Exception as e:  # onnxruntime raises its own types; the step itself ran: pick on the host
                self.pick.fail(e)
        logits = self.logits[first: first + b] if device_logits is None else device_logits.numpy()
        return logits[:, 0].argmax(-1) if pick else logits

    def _inputs_of(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        if width not in self._inputs:
            self._inputs[width] = (np.full((self.slots, width), self.spec.pad_token_id, np.int64),
                                   np.zeros((self.slots, width), np.int64))
        return self._inputs[width]

    # ---- bindings ----------------------------------------------------------------------------

    def _bind_kv(self, io, first: int, rows: int, names: list[tuple[str, str]] | None = None) -> None:
        s = self.spec
        shape = [rows, s.n_head, self.capacity, s.head_dim]
        for ptr, (past, present) in zip(self._ptrs(self._kv), names or self.kv_names):
            at = ptr + first * self.row_bytes
            io.bind_input(past, self.device, 0, s.kv_dtype, shape, at)
            io.bind_output(present, self.device, 0, s.kv_dtype, shape, at)

    def _mixed_binding(self, b: int, r: int, width: int) -> tuple:
        """The IO binding of a mixed pass: a decode step's over rows 0 .. b-1 plus row r's chunk of `width`
        columns, its cache bound at row r's slot of the same buffers; made once per set, bucket, row, width."""
        key = (self._set, b, r, width)
        if key in self._mixed:
            return self._mixed[key]
        s, n = self.spec, self.spec.names
        io = self.mixed.session.io_binding()
        self._bind_kv(io, 0, b)
        self._bind_kv(io, r, 1, s.names.chunk_kv(s.n_layer))
        ids, pos = self._inputs_of(1)
        host = {n.input_ids: ids[:b], n.position_ids: pos[:b], n.attention_mask: self.mask[:b],
                n.chunk_ids: self.chunk_ids, n.chunk_position_ids: self.chunk_pos, n.chunk_mask: self.chunk_mask}
        outs = {n.logits: self.logits[:b], n.chunk_logits: self.chunk_logits}
        copies, device = self._bind_host(io, host, outs)
        self._mixed[key] = (io, copies, device.get(n.logits), self.mixed.run_options(), device.get(n.chunk_logits, self.chunk_logits))
        return self._mixed[key]

    def _bind_host(self, io, host: dict[str, np.ndarray], outs: dict[str, np.ndarray]) -> tuple[list, dict]:
        """Bind host int64 inputs and float32 outputs: by address on the CPU; on CUDA to device buffers at
        fixed addresses (the inputs refreshed from `host` before each run). Returns (copies, device outputs)."""
        copies, device = [], {}
        if self.device == "cpu":
            for name, a in host.items():
                io.bind_input(name, "cpu", 0, np.int64, list(a.shape), a.ctypes.data)
            for name, a in outs.items():
                io.bind_output(name, "cpu", 0, np.float32, list(a.shape), a.ctypes.data)
            return copies, device
        ort = self.ort
        for name, a in host.items():
            ov = ort.OrtValue.ortvalue_from_shape_and_type(list(a.shape), np.int64, self.device, 0)
            io.bind_ortvalue_input(name, ov)
            copies.append((a, ov))
        for name, a in outs.items():
            device[name] = ort.OrtValue.ortvalue_from_shape_and_type(list(a.shape), np.float32, self.device, 0)
            io.bind_ortvalue_output(name, device[name])  # captured graphs write device memory only
        return copies, device

    def _binding(self, first: int, b: int, width: int) -> tuple:
        """The IO binding of a fixed-shape pass (a decode step: rows 0 .. b-1, width 1; a chunk: row
        `first`, b 1), made once per cache set: on CPU it points at the host arrays; on CUDA at device
        copies refreshed each pass (fixed addresses, as replays need)."""
        key = (self._set, first, b, width)
        if key in self._steps:
            return self._steps[key]
        ort, n = self.ort, self.spec.names
        io = self.session.io_binding()
        self._bind_kv(io, first, b)
        io.bind_cpu_input(n.logits_to_keep, self.keep)  # read on the host by the graph, never a device value
        ids, pos = self._inputs_of(width)  # rows 0 .. b-1 (a chunk: row 0)
        host = {n.input_ids: ids[:b], n.position_ids: pos[:b], n.attention_mask: self.mask[first: first + b]}
        copies, device = self._bind_host(io, host, {n.logits: self.logits[first: first + b]})
        device_logits = device.get(n.logits)
        if self.graph_id is not None:
            ro = ort.RunOptions()
            ro.add_run_config_entry("gpu_graph_id", str(self.graph_id()))  # first run captures, later ones replay
        else:
            ro = self._prompt_ro  # "-1" on a capturing session (beam search: rows reordered between steps)
        self._steps[key] = (io, copies, device_logits, ro)
        return self._steps[key]
