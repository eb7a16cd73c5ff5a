"""The buffers of one `Engine.generate` call: KV cache, mask, ids, positions, logits, allocated once.

(The Scheduler keeps its own slot buffers in slots.py; this is the single-caller path.)
"""

from __future__ import annotations

import threading
import time

import numpy as np

from .request import Stats


class GraphBuffers:
    """The device buffers the captured decode graph of each batch size reads, made once per engine.
    Captured graphs replay fixed addresses, so generations of one batch size take turns: `lock`
    is held for a whole generation, and `owner` is the state whose keys and values they hold."""

    def __init__(self):
        self.sets: dict[int, dict] = {}  # batch size -> buffers
        self.owner: dict[int, DecodeState] = {}
        self.lock = threading.Lock()

    def get(self, e, B: int, capacity: int) -> dict:
        ort = e.ort
        if B not in self.sets:
            shape = [B, e.n_head, capacity, e.head_dim]
            self.sets[B] = {
                "id": str(len(self.sets) + 1),
                "kv": [ort.OrtValue.ortvalue_from_shape_and_type(shape, e.kv_dtype, e.device, 0) for _ in range(2 * e.n_layer)],
                "input_ids": ort.OrtValue.ortvalue_from_shape_and_type([B, 1], np.int64, e.device, 0),
                "position_ids": ort.OrtValue.ortvalue_from_shape_and_type([B, 1], np.int64, e.device, 0),
                "attention_mask": ort.OrtValue.ortvalue_from_shape_and_type([B, capacity], np.int64, e.device, 0),
                "num_logits_to_keep": ort.OrtValue.ortvalue_from_numpy(np.array(1, np.int64), e.device, 0),
                "logits": ort.OrtValue.ortvalue_from_shape_and_type([B, 1, e.vocab_size], np.float32, e.device, 0),
            }
        return self.sets[B]


class DecodeState:
    """The buffers of one generation, allocated once: KV cache, mask, ids, positions, logits.

    With a shared-buffer artifact the KV cache is [batch, heads, capacity, head_dim] per layer and
    key/value tensor, bound as both past and present, so the attention op writes each new token's
    keys and values in place; the decode inputs have fixed shapes ([B, 1] ids and positions, a
    [B, capacity] mask whose future columns are 0) and are bound once, then written in place.
    Otherwise present = concat(past, new) and is fed back each step.
    `compact(keep)` drops finished rows (one copy of the cache) so they stop costing work;
    `reorder(parents)` makes each row continue another row's sequence (beam search).
    `graph=False` runs uncaptured even on a CUDA-graph engine (beam search reorders rows between steps).
    """

    def __init__(self, engine, rows: list[list[int]], max_new_tokens: int, capacity: int | None = None, graph: bool = True):
        self.e, self.ort = engine, engine.ort
        ort = self.ort
        self.B, self.S0 = len(rows), max(map(len, rows))
        self.graph = engine.cuda_graph and graph
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
        self.pos = np.clip(np.cumsum(self.mask[:, : self.S0], axis=1) - 1, 0, None)  # [B, S0]
        self.T = self.S0
        self.next_pos = self.pos[:, -1:].copy()  # [B, 1]
        self.keep_one = np.array(1, np.int64)
        if self.graph:
            kv = self._graph_buffers()["kv"]
            engine.graph_buffers.owner[B] = self  # a later state of this batch size overwrites this cache
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
        return self.e.graph_buffers.get(self.e, self.B, self.capacity)

    def _bind(self, kv: list) -> None:
        """(Re)allocate the per-batch buffers for self.B rows and bind the outputs and the cache."""
        e, B = self.e, self.B
        self.kv = kv
        self.spare: list | None = None  # reorder's second set of cache buffers, made at its first call
        self.ids = np.zeros((B, 1), np.int64)
        self.logits = np.empty((B, 1, e.vocab_size), np.float32)
        self.io = e.session.io_binding()
        self.logits_ov = self.ort.OrtValue.ortvalue_from_numpy(self.logits)  # shares memory
        self.io.bind_ortvalue_output("logits", self.logits_ov)
        self.io.bind_cpu_input("num_logits_to_keep", self.keep_one)  # 1 for every pass, prompt included
        if e.shared_kv:
            for j, (past, present) in enumerate(e.kv_names):
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

    def reorder(self, parents: np.ndarray) -> None:
        """Row i continues the sequence row parents[i] held (int64 [B]; rows with equal masks and
        positions, as the beams of one prompt are). On CPU the cache rows are gathered into a second
        set of buffers, made once, which is then bound in place of the first: no allocation per token."""
        e = self.e
        if not e.shared_kv:  # plain graphs: the cache is a new output every step anyway
            self.kv = [self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[parents]), e.device, 0) for v in self.kv]
        elif e.device != "cpu":  # device buffers: gathered through the host, addresses kept
            for v in self.kv:
                v.update_inplace(np.ascontiguousarray(v.numpy()[parents]))
        else:
            if self.spare is None:
                shape = [self.B, e.n_head, self.capacity, e.head_dim]
                self.spare = [self.ort.OrtValue.ortvalue_from_shape_and_type(shape, e.kv_dtype, e.device, 0) for _ in self.kv]
                self.arrays = [v.numpy() for v in self.kv], [v.numpy() for v in self.spare]  # views, no copies
            (src, dst), (kv, spare) = self.arrays, (self.kv, self.spare)
            for j, (past, present) in enumerate(e.kv_names):
                np.take(src[j], parents, axis=0, out=dst[j], mode="clip")  # [B, heads, capacity, head_dim]; "clip": unbuffered
                self.io.bind_ortvalue_input(past, spare[j])
                self.io.bind_ortvalue_output(present, spare[j])
            self.kv, self.spare, self.arrays = spare, kv, (dst, src)

    def _run_concat(self, ids: np.ndarray, pos: np.ndarray) -> None:
        """Plain graphs: the mask is exactly [B, T] and the cache comes back as new outputs."""
        io = self.io
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("position_ids", pos)
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(self.mask[:, : self.T]))
        for j, (past, present) in enumerate(self.e.kv_names):
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
                and (not self.graph or self.e.graph_buffers.owner.get(1) is self))

    def extend(self, row: list[int]) -> np.ndarray:
        """A prompt pass over the tokens of `row` past the cached ones (batch 1, can_extend true):
        they attend to the cache and append to it; returns the next logits [1, vocab]."""
        t = time.perf_counter()
        P, new = self.T, row[self.T:]
        self.stats = Stats(batch=1, prompt_tokens=len(row), cached_tokens=P)
        self.fed = list(row)
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
