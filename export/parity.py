"""Parity of an exported graph against the PyTorch fp32 model it came from.

`decode_parity` runs a left-padded batch through the prompt pass and `steps` incremental greedy
steps in both, feeding both the same tokens, and compares the logits of every real position.
"""

from __future__ import annotations

import numpy as np

from .graph import ModelConfig

# Written tolerances per precision: max |Δlogit| of the prompt pass and decode steps against the
# PyTorch fp32 model (seeded synthetic weights; see tests/test_precisions.py for the measured figures).
TOLERANCES = {"fp32": 1e-4}


def ort_session(model_path: str, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])


def _kv_dtype(session) -> np.dtype:
    t = next(i.type for i in session.get_inputs() if i.name.startswith("past_key_values."))
    return np.float16 if "float16" in t else np.float32


def _feed(cfg: ModelConfig, ids, mask, pos, past, keep: int) -> dict[str, np.ndarray]:
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "num_logits_to_keep": np.array(keep, np.int64)}
    for i in range(cfg.n_layer):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
    return feed


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, attention_mask, position_ids for a left-padded batch, as transformers builds them."""
    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = row
        mask[r, width - len(row):] = 1
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, pos


def decode_parity(session, torch_model, cfg: ModelConfig, rows: list[list[int]], steps: int = 3) -> dict[str, float]:
    """Max |Δlogit| and top-1 agreement over the prompt pass and `steps` decode steps."""
    import torch

    ids, mask, pos = left_pad(rows, cfg.pad_token_id)
    B = len(rows)
    empty = np.zeros((B, cfg.n_head, 0, cfg.head_dim), _kv_dtype(session))
    outs = session.run(None, _feed(cfg, ids, mask, pos, [empty] * (2 * cfg.n_layer), keep=0))
    with torch.no_grad():
        ref = torch_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          position_ids=torch.from_numpy(pos), use_cache=True)
    real = mask.astype(bool)
    diffs, agree = [np.abs(outs[0] - ref.logits.numpy())[real].max()], [_top1(outs[0][real], ref.logits.numpy()[real])]
    past_t, last = ref.past_key_values, ref.logits[:, -1].numpy()
    for _ in range(steps):
        nxt = last.argmax(-1)[:, None].astype(np.int64)  # both sides get PyTorch's greedy token
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        outs = session.run(None, _feed(cfg, nxt, mask, pos, outs[1:], keep=1))
        with torch.no_grad():
            ref = torch_model(input_ids=torch.from_numpy(nxt), attention_mask=torch.from_numpy(mask),
                              position_ids=torch.from_numpy(pos), past_key_values=past_t, use_cache=True)
        past_t, last = ref.past_key_values, ref.logits[:, -1].numpy()
        diffs.append(np.abs(outs[0][:, -1] - last).max())
        agree.append(_top1(outs[0][:, -1], last))
    return {
        "max_abs_logit_diff": float(max(diffs)),
        "top1_agreement": float(np.mean(agree)),
        "decode_steps": steps,
        "batch": B,
    }


def _top1(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())
