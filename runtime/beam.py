"""Beam search as transformers' `generate(num_beams=K, do_sample=False)` runs it (4.57), returning
each prompt's best hypothesis (num_return_sequences=1).

The K beams of prompt b are rows b*K .. b*K + K - 1 of one Decoder (decoder.py): the engine's loop
(Engine._run_beams) hands each step's logits to `Beams.advance`, then gathers the KV cache rows by
`Beams.parents` and feeds `Beams.tokens`. One step, per prompt:

    scores     = log_softmax(logits), then the repetition penalty, no-repeat n-grams and
                 min_new_tokens (-inf), plus each beam's running score                 [K, vocab]
    candidates = the best max(2, 1 + stop tokens) * K (beam, token) pairs, best first
    finished   = those among the first K that end in a stop token or reach max_new_tokens, scored
                 score / new_tokens ** length_penalty (new tokens only, the stop token included);
                 the prompt keeps its best K hypotheses
    running    = the first K candidates that did not finish: the next step's beams

At the first step only beam 0 is live (the others start at -1e9), so the K beams differ. A prompt
stops taking hypotheses once it holds K and either early_stopping is True or no running beam can
beat the worst of them any more (transformers' heuristic: the best running score divided by
(its new tokens, or max_new_tokens with "never" and length_penalty > 0) ** length_penalty). The
search ends when no prompt takes hypotheses, or at max_new_tokens.

Stop strings end a candidate whose new text holds one, as transformers' StopStringCriteria ends a
beam (the hypothesis keeps its tokens; its text is cut before the stop string, as generate_text's).

Differences from transformers, both for a prompt's tokens not to depend on its batch-mates: n-gram
bans and the repetition penalty look at the prompt's own tokens, not at the padding of a batch. A
stop string is looked for in the new text only (as OpenAI's and generate_text's), so one that
begins in the prompt and ends in the first new token does not end the beam.
"""

from __future__ import annotations

import numpy as np

from .request import Request, Token
from .sampling import ngram_bans

NEG = np.float32(-1e9)  # transformers' score for a beam that must not be chosen


class Beams:
    """The bookkeeping of one beam search over `reqs` (one GenerationConfig, num_beams K each)."""

    def __init__(self, reqs: list[Request], vocab: int):
        cfg = self.cfg = reqs[0].cfg
        B, K = len(reqs), cfg.num_beams
        self.reqs, self.K, self.V = reqs, K, vocab
        self.stop_ids = np.array(sorted(reqs[0].stop_ids), np.int64)
        self.keep = max(2, 1 + len(self.stop_ids)) * K  # candidates per prompt: at least K of them go on
        self.t = 0  # new tokens of every running beam
        # each beam's row, left-aligned: its prompt, then its new tokens  [B*K, longest prompt + max_new_tokens]
        self.plen = np.repeat([len(r.ids) for r in reqs], K)
        self.rows = np.zeros((B * K, int(self.plen.max()) + cfg.max_new_tokens), np.int64)
        for b, r in enumerate(reqs):
            self.rows[b * K:(b + 1) * K, : len(r.ids)] = r.ids
        self.spare_rows = np.empty_like(self.rows)
        self.running = np.full((B, K), NEG, np.float32)  # cumulative log-probabilities, best first
        self.running[:, 0] = 0
        self.scores = np.empty((B * K, vocab), np.float32)  # work buffers, reused every step
        self.work = np.empty((B * K, vocab), np.float32)
        self.lse = np.empty((B * K, 1), np.float32)
        self.hyps: list[list[tuple[np.float32, np.ndarray]]] = [[] for _ in reqs]  # (score, new tokens), best first
        self.open = np.ones(B, bool)  # prompts still taking hypotheses
        self.parents = np.arange(B * K, dtype=np.int64)  # the row whose sequence each row continues
        self.tokens = np.zeros(B * K, np.int64)  # the token each row feeds next

    def advance(self, logits: np.ndarray) -> bool:
        """Take every beam's next-token logits [B*K, vocab]: record the hypotheses that end, choose the
        next beams (`parents`, `tokens`). Returns whether the search goes on."""
        K, V = self.K, self.V
        s = self._log_probs(logits)
        s += self.running.reshape(-1, 1)
        last = self.t + 1 >= self.cfg.max_new_tokens
        for b in range(len(self.reqs)):
            flat = s[b * K:(b + 1) * K].reshape(-1)  # [K * vocab]
            top = np.argpartition(flat, -self.keep)[-self.keep:]
            top = top[np.lexsort((top, -flat[top]))]  # best first; a tie to the lower index
            score, beam, token = flat[top], top // V, top % V
            stops = np.isin(token, self.stop_ids) | last
            if self.cfg.stop:
                stops |= self._ends_text(b, beam, token)
            if self.open[b]:
                self._finish(b, [(score[j], beam[j], token[j]) for j in range(K) if stops[j]])
            go = np.argsort(stops, kind="stable")[:K]  # the best K that go on (at the last step, any K)
            self.parents[b * K:(b + 1) * K] = b * K + beam[go]
            self.tokens[b * K:(b + 1) * K] = token[go]
            self.running[b] = np.where(stops[go], score[go] + NEG, score[go])
        np.take(self.rows, self.parents, axis=0, out=self.spare_rows, mode="clip")
        self.rows, self.spare_rows = self.spare_rows, self.rows
        self.rows[np.arange(len(self.rows)), self.plen + self.t] = self.tokens
        self.t += 1
        self._close()
        return not last and bool(self.open.any())

    def finish(self) -> list[Token]:
        """Feed each prompt's best hypothesis to its request; returns their Token events."""
        events = []
        for b, r in enumerate(self.reqs):
            for t in self.hyps[b][0][1]:
                if r.done:  # a stop string ended the text
                    break
                events.append(r.accept(int(t)))
        return events

    def _ends_text(self, b: int, beam: np.ndarray, token: np.ndarray) -> np.ndarray:
        """Which candidates (beam, token) of prompt b put a stop string into their new text: they end there,
        as hypotheses scored at that length (transformers' StopStringCriteria in beam search). A running
        beam's text holds none, so any occurrence is the new token's."""
        decode, rows, start = self.reqs[b].text.decode, self.rows[b * self.K:(b + 1) * self.K], self.plen[b * self.K]
        return np.array([any(s in decode([*rows[k, start: start + self.t].tolist(), int(t)]) for s in self.cfg.stop)
                         for k, t in zip(beam, token)], bool)

    def _log_probs(self, logits: np.ndarray) -> np.ndarray:
        """log_softmax(logits [B*K, vocab]) in float32, then the processors transformers applies to
        beam scores, in its order: repetition penalty, no-repeat n-grams, min_new_tokens."""
        cfg, s, lse = self.cfg, self.scores, self.lse
        np.max(logits, axis=1, keepdims=True, out=lse)
        np.subtract(logits, lse, out=s)
        np.exp(s, out=self.work)
        np.sum(self.work, axis=1, keepdims=True, out=lse)
        np.log(lse, out=lse)
        s -= lse
        p, n = cfg.repetition_penalty, cfg.no_repeat_ngram_size
        for i in range(len(s)) if p != 1.0 or n else ():
            row = self.rows[i, : self.plen[i] + self.t]
            if p != 1.0:
                v = s[i, row]
                s[i, row] = np.where(v < 0, v * p, v / p)
            if n:
                s[i, ngram_bans(row, n)] = -np.inf
        if self.t < cfg.min_new_tokens:
            s[:, self.stop_ids] = -np.inf
        return s

    def _finish(self, b: int, ended: list) -> None:
        """Add the hypotheses that end this step, (score, beam, last token) each, to prompt b's best K."""
        if not ended:
            return
        norm = np.float32((self.t + 1) ** self.cfg.length_penalty)
        for score, beam, token in ended:
            i = b * self.K + beam
            self.hyps[b].append((score / norm, np.append(self.rows[i, self.plen[i]: self.plen[i] + self.t], token)))
        self.hyps[b] = sorted(self.hyps[b], key=lambda h: -h[0])[: self.K]

    def _close(self) -> None:
        """Stop the prompts that hold K hypotheses and take no more (early_stopping, or the heuristic)."""
        cfg = self.cfg
        n = cfg.max_new_tokens if cfg.early_stopping == "never" and cfg.length_penalty > 0 else self.t
        best_possible = self.running[:, 0] / np.float32(n ** cfg.length_penalty)
        for b in np.flatnonzero(self.open):
            if len(self.hyps[b]) == self.K and (cfg.early_stopping is True or best_possible[b] <= self.hyps[b][-1][0]):
                self.open[b] = False
