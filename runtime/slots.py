"""The Scheduler's KV cache: one row ("slot") per request, each with its own length.

Per layer and tensor one buffer [slots, heads, capacity, head_dim] holds every slot's keys and
values, bound as both GroupQueryAttention's past and present so the op writes in place. The
graph derives each row's length from its mask row (seqlens_k [B] = last real column), so rows of
different lengths decode together: row r feeding a token at position L_r has mask[r, :L_r + 1] = 1
and the op appends at L_r. A decode step runs the first n slots (n = 1 + the highest decoding
slot; with CUDA graphs n is padded to its bucket 1, 2, 4, 8 ...); a slot in that range that is not
decoding is run as a harmless row whose write lands just past its valid tokens.

A prompt (or a chunk of one) is run batch-1 on its own slot, bound by address to that slot's
part of the buffers, so it is written straight into place.
"""

from __future__ import annotations

import numpy as np


class SlotCache:
    def __init__(self, engine, slots: int, capacity: int, graph: bool = False):
        e, ort = engine, engine.ort
        self.e, self.slots, self.capacity, self.graph = e, slots, capacity, graph
        shape = [slots, e.n_head, capacity, e.head_dim]
        self.slot_shape = [1, e.n_head, capacity, e.head_dim]
        self.slot_bytes = e.n_head * capacity * e.head_dim * e.kv_dtype.itemsize
        if e.device == "cpu":
            # written now, not on first use: np.zeros maps untouched pages, and a slot's first prompt
            # would pay their page faults (measured: up to 35 ms on a 20-token prompt)
            self._kv = [np.full(shape, 0, e.kv_dtype) for _ in range(2 * e.n_layer)]
            self.kv_ptr = [a.ctypes.data for a in self._kv]
        else:
            self._kv = [ort.OrtValue.ortvalue_from_shape_and_type(shape, e.kv_dtype, e.device, 0) for _ in range(2 * e.n_layer)]
            self.kv_ptr = [v.data_ptr() for v in self._kv]
        # host copies of the decode inputs, [slots, ...]; the first n rows are a step's inputs
        self.ids = np.full((slots, 1), e.pad_token_id, np.int64)
        self.pos = np.zeros((slots, 1), np.int64)
        self.mask = np.zeros((slots, capacity), np.int64)
        self.mask[:, 0] = 1
        self.mlen = np.ones(slots, np.int64)  # mask[r, :mlen[r]] = 1, the rest 0
        self.logits = np.zeros((slots, 1, e.vocab_size), np.float32)
        self.prefill_logits = np.zeros((1, 1, e.vocab_size), np.float32)
        self.keep = np.array(1, np.int64)
        self._bindings: dict[int, tuple] = {}  # batch n -> (io binding, device input copies, run options)
        self._prefill_ro = None
        if graph:
            self._prefill_ro = ort.RunOptions()
            self._prefill_ro.add_run_config_entry("gpu_graph_id", "-1")  # prompt passes are never captured

    def batch_for(self, n: int) -> int:
        """Rows a step over n slots runs: n, or with CUDA graphs the bucket (power of two) holding n."""
        if not self.graph:
            return n
        return min(1 << (n - 1).bit_length(), self.slots)

    def _bind_kv(self, io, first: int, rows: int) -> None:
        dev, dt = self.e.device, self.e.kv_dtype
        shape = [rows, *self.slot_shape[1:]]
        for ptr, (past, present) in zip(self.kv_ptr, self.e.kv_names):
            at = ptr + first * self.slot_bytes
            io.bind_input(past, dev, 0, dt, shape, at)
            io.bind_output(present, dev, 0, dt, shape, at)

    def set_len(self, r: int, n: int) -> None:
        """Mask row r: ones on [0, n)."""
        old = self.mlen[r]
        if n > old:
            self.mask[r, old:n] = 1
        elif n < old:
            self.mask[r, n:old] = 0
        self.mlen[r] = n

    def feed(self, r: int, token: int, at: int) -> None:
        """Row r runs `token` at position `at` in the next decode step."""
        self.ids[r, 0], self.pos[r, 0] = token, at
        self.set_len(r, at + 1)

    def idle(self, r: int, held: int) -> None:
        """Row r is in the step's range but not decoding: its write lands at `held`, past its valid tokens."""
        self.feed(r, self.e.pad_token_id, held)

    def prefill(self, slot: int, ids: list[int], start: int) -> np.ndarray:
        """Run prompt tokens `ids` at positions start.. on `slot` (attending to its first `start`
        cached tokens); returns the logits of the last one [vocab]."""
        e = self.e
        io = e.session.io_binding()
        self._bind_kv(io, slot, 1)
        end = start + len(ids)
        io.bind_cpu_input("input_ids", np.array([ids], np.int64))  # [1, S]
        io.bind_cpu_input("position_ids", np.arange(start, end, dtype=np.int64)[None])  # [1, S]
        io.bind_cpu_input("attention_mask", np.ones((1, end), np.int64))  # exactly [1, T] for a prompt pass
        io.bind_cpu_input("num_logits_to_keep", self.keep)
        io.bind_output("logits", "cpu", 0, np.float32, [1, 1, e.vocab_size], self.prefill_logits.ctypes.data)
        e.session.run_with_iobinding(io, self._prefill_ro)
        return self.prefill_logits[0, 0]

    def decode(self, n: int) -> np.ndarray:
        """One decode step over the first n slots (their rows of ids, pos and mask set by feed /
        idle); returns logits [n, vocab]."""
        b = self.batch_for(n)
        io, copies, device_logits, ro = self._binding(b)
        for host, ov in copies:  # CUDA: refresh the device copies in place
            ov.update_inplace(host[:b])
        self.e.session.run_with_iobinding(io, ro)
        if device_logits is not None:
            self.logits[:b] = device_logits.numpy()
        return self.logits[:n, 0]

    def _binding(self, b: int) -> tuple:
        """The IO binding of a step over b rows, made once: on CPU it points at the host arrays; on
        CUDA at device copies refreshed each step (fixed addresses, as captured graphs need)."""
        if b in self._bindings:
            return self._bindings[b]
        e, ort = self.e, self.e.ort
        io = e.session.io_binding()
        self._bind_kv(io, 0, b)
        host = {"input_ids": self.ids, "position_ids": self.pos, "attention_mask": self.mask}
        copies, device_logits, ro = [], None, None
        if e.device == "cpu":
            for name, a in host.items():
                io.bind_input(name, "cpu", 0, np.int64, [b, a.shape[1]], a.ctypes.data)
            io.bind_cpu_input("num_logits_to_keep", self.keep)
            io.bind_output("logits", "cpu", 0, np.float32, [b, 1, e.vocab_size], self.logits.ctypes.data)
        else:
            for name, a in host.items():
                ov = ort.OrtValue.ortvalue_from_shape_and_type([b, a.shape[1]], np.int64, e.device, 0)
                io.bind_ortvalue_input(name, ov)
                copies.append((a, ov))
            self._keep_device = ort.OrtValue.ortvalue_from_numpy(self.keep, e.device, 0)
            io.bind_ortvalue_input("num_logits_to_keep", self._keep_device)
            device_logits = ort.OrtValue.ortvalue_from_shape_and_type([b, 1, e.vocab_size], np.float32, e.device, 0)
            io.bind_ortvalue_output("logits", device_logits)
        if self.graph:
            ro = ort.RunOptions()
            ro.add_run_config_entry("gpu_graph_id", str(1000 + b))  # the engine's own graphs use small ids
        self._bindings[b] = (io, copies, device_logits, ro)
        return self._bindings[b]
