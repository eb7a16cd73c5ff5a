"""A trained reference chat model: GPT-2 trained here the way DialoGPT was, on conversations.

Trained DialoGPT weights cannot be downloaded everywhere this project runs, and seeded random
weights give flat logits that say little about what a precision costs. This module trains a small
GPT-2 (a causal LM over conversations, each turn followed by `<|endoftext|>`, GPT-2's byte-level BPE
conventions with 50257 ids, tied embeddings) on the English conversations of the `chatterbot-corpus`
package plus the shipped `data/sample.txt`, with a held-out split kept out of training.

`trained:chat` is trained once and cached, not shipped: its weights are 28 MB (the 50257 x width
embedding is most of them), too big for the repository, while training costs a few minutes on a
2-core CPU and is seeded. The cache directory is keyed by a hash of the settings, the training data
and this module's `TRAIN_VERSION`, so a change to any of them trains a new model instead of reusing
a stale one. Training repeats bit for bit on one machine, not across CPUs (float reductions round
by instruction set), so the test model `trained:chat-tiny` ships instead (`SHIPPED`, in data/chat-tiny/:
fp16 weights, 6.7 MB): every machine tests the same weights, and its golden replies hold everywhere.

    python -m gpt2onnx.export.train chat              # train (or find) it; prints the directory
    gpt2onnx export trained:chat -o artifacts/chat    # the same export path as any checkpoint
    python -m gpt2onnx.export.train chat-tiny --ship  # retrain the shipped one and replace it (then
                                                      # re-record the goldens: python -m tests.test_trained)
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources

from gpt2onnx.runtime.errors import Gpt2OnnxError

TRAIN_VERSION = 2  # bump when the training code changes what it produces
DEFAULT_CACHE = os.path.join("artifacts", "trained")  # relative to the working directory (make, pytest: the repo root)
EOT = "<|endoftext|>"


@dataclass(frozen=True)
class TrainConfig:
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int = 256  # conversations here are short (the longest is ~200 tokens)
    learned_vocab: int = 8000  # BPE ids learned from the training split; the rest of the 50257 are filler merges
    epochs: int = 6
    batch: int = 16  # conversations per step
    lr: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    dropout: float = 0.1
    holdout_every: int = 10  # one first turn in ten (and every conversation that opens with it) is held out
    seed: int = 0
    threads: int = 2  # fixed so the float reductions, and so the weights, repeat on a given machine


# Sizes chosen by measurement on the 2-core development machine (figures in README, "A trained reference model").
PRESETS = {
    "chat": TrainConfig(n_layer=4, n_embd=128, n_head=4, epochs=8, lr=4e-3),
    # for tests: the same data and code path, shipped (SHIPPED): training it took 2.9 minutes on 2 cores
    # (data/chat-tiny/training.json)
    "chat-tiny": TrainConfig(n_layer=2, n_embd=64, n_head=2, epochs=4, batch=32, lr=3e-3),
}


# Presets whose weights ship in the package (data/NAME/), unpacked into the cache on first use.
SHIPPED = ("chat-tiny",)
SHIPPED_FILES = ("config.json", "generation_config.json", "special_tokens_map.json", "tokenizer_config.json",
                 "model.safetensors", "heldout.json")  # + tokenizer.json.xz, and training.json (written last)


# --- data ---------------------------------------------------------------------------------------

def _corpus_files() -> list[str]:
    try:
        import chatterbot_corpus
    except ImportError:
        raise Gpt2OnnxError("training the reference model needs chatterbot-corpus; install it with "
                            "`pip install 'gpt2onnx[export]'`") from None
    files = sorted(glob.glob(os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english", "*.yml")))
    if not files:
        raise Gpt2OnnxError("chatterbot-corpus has no English conversations (data/english/*.yml)")
    return files


def conversations() -> list[list[str]]:
    """Every conversation, as a list of turns: the corpus's English YAML files in name order, then
    the shipped text's lines four at a time (its lines alternate like turns of one long exchange)."""
    import yaml

    from .checkpoints import sample_text

    out = []
    for path in _corpus_files():
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        for conv in doc.get("conversations") or []:
            turns = [" ".join(str(t).split()) for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                out.append(turns)
    lines = [ln.strip() for ln in sample_text().splitlines() if ln.strip()]
    out += [lines[i: i + 4] for i in range(0, len(lines), 4) if len(lines[i: i + 4]) >= 2]
    return out


def split(convs: list[list[str]], holdout_every: int) -> tuple[list[list[str]], list[list[str]]]:
    """(train, held out). A conversation is held out by a hash of its first turn, so no opening seen
    in training is scored (the corpus repeats an opening with different replies)."""
    def held(c):
        key = c[0].lower().strip(" ?!.")
        return int(hashlib.sha256(key.encode()).hexdigest(), 16) % holdout_every == 0

    return [c for c in convs if not held(c)], [c for c in convs if held(c)]


def encode_conversation(tokenizer, turns: list[str], eos_id: int) -> list[int]:
    """DialoGPT's format, the runtime's (runtime/chat.py): each turn's tokens followed by `<|endoftext|>`."""
    from gpt2onnx.runtime.chat import encode_turns, joined

    return joined(encode_turns(tokenizer, turns, eos_id))


def data_key(cfg: TrainConfig) -> str:
    """Hash of the settings, the training data and TRAIN_VERSION: the cache directory's name."""
    from .checkpoints import sample_text

    h = hashlib.sha256(json.dumps({"cfg": asdict(cfg), "version": TRAIN_VERSION}, sort_keys=True).encode())
    for path in _corpus_files():
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    h.update(sample_text().encode())
    return h.hexdigest()[:16]


# --- training -----------------------------------------------------------------------------------

def train(cfg: TrainConfig, out: str, log: Callable[[str], None] = print) -> dict:
    """Train a GPT-2 on the training split and write a Hugging Face checkpoint directory to `out`
    (config.json with n_ctx, model.safetensors, tokenizer files, training.json, heldout.json).
    Returns the training record (settings, cost, losses, held-out perplexity)."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    from .checkpoints import EOS_ID, VOCAB_SIZE, bpe_tokenizer_json

    t0, cpu0 = time.perf_counter(), time.process_time()
    train_convs, held = split(conversations(), cfg.holdout_every)
    tok = Tokenizer.from_str(bpe_tokenizer_json(["\n".join(c) for c in train_convs], cfg.learned_vocab))
    assert tok.get_vocab_size() == VOCAB_SIZE and tok.token_to_id(EOT) == EOS_ID
    rows = [encode_conversation(tok, c, EOS_ID)[: cfg.n_positions] for c in train_convs]
    held_rows = [encode_conversation(tok, c, EOS_ID)[: cfg.n_positions] for c in held]
    config = transformers.GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=cfg.n_positions, n_ctx=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, tie_word_embeddings=True,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = transformers.GPT2LMHeadModel(config)
            losses, curve = _fit(model, rows, cfg, log, held_rows)
        model.eval()
        ppl = perplexity(model, held_rows)
    finally:
        torch.set_num_threads(threads)
    minutes = (time.perf_counter() - t0) / 60
    record = {
        "settings": asdict(cfg), "train_version": TRAIN_VERSION, "key": data_key(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": {"train_conversations": len(rows), "train_tokens": sum(map(len, rows)),
                 "heldout_conversations": len(held_rows), "heldout_tokens": sum(map(len, held_rows))},
        "loss_first_last": [losses[0], losses[-1]], "steps": len(losses),
        "heldout_perplexity_by_epoch": curve,
        "heldout_perplexity": ppl,
        "minutes": round(minutes, 2),
        "cpu_minutes": round((time.process_time() - cpu0) / 60, 2),  # all threads; beside wall minutes, shows a busy machine
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, torch {torch.__version__}",
    }
    _save(model, tok, out, record, held)
    log(f"trained {record['parameters'] / 1e6:.1f}M parameters in {minutes:.1f} min; held-out perplexity {ppl:.1f}")
    return record


def _fit(model, rows: list[list[int]], cfg: TrainConfig, log, held_rows) -> tuple[list[float], list[float]]:
    """AdamW with warm-up and cosine decay; each step a batch of whole conversations of similar
    length (shuffled, then sorted within groups of 8 batches, so little of a batch is padding), the
    LM head run only on real positions (at width 256 the 50257-wide head is most of the work)."""
    import torch

    steps_per_epoch = math.ceil(len(rows) / cfg.batch)
    total = steps_per_epoch * cfg.epochs
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), fused=True)  # one pass over the 50257-row table, not ten
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps)
                                              * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))
    model.train()
    losses, curve, gen = [], [], torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(rows), generator=gen).tolist()
        group = 8 * cfg.batch
        order = [i for g in range(0, len(order), group) for i in sorted(order[g: g + group], key=lambda i: len(rows[i]))]
        batches = [order[b * cfg.batch: (b + 1) * cfg.batch] for b in range(steps_per_epoch)]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            batch = [rows[i] for i in batches[b]]
            loss = _loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()  # the held-out curve chose the epochs; it costs one forward pass over the split
        curve.append(round(perplexity(model, held_rows), 3))
        model.train()
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {sum(losses[-steps_per_epoch:]) / steps_per_epoch:.3f}, "
            f"held-out perplexity {curve[-1]:.2f} ({time.perf_counter() - t0:.0f} s)")
    return losses, curve


def _loss(model, batch: list[list[int]], reduction: str = "mean"):
    """Next-token cross-entropy over the real tokens of a right-padded batch of conversations."""
    import torch

    width = max(map(len, batch))
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, row in enumerate(batch):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, width]
    real = mask[:, 1:].bool()  # positions whose next token is real
    h = hidden[:, :-1][real]  # [N, width]
    logits = model.lm_head(h)  # [N, vocab]
    return torch.nn.functional.cross_entropy(logits, ids[:, 1:][real], reduction=reduction)


def perplexity(model, rows: list[list[int]], batch: int = 64) -> float:
    """exp(mean next-token NLL) over every token of `rows` but each conversation's first."""
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            part = [r for r in rows[i: i + batch] if len(r) > 1]
            nll += float(_loss(model, part, reduction="sum"))
            n += sum(len(r) - 1 for r in part)
    return math.exp(nll / n)


def _save(model, tok, out: str, record: dict, held: list[list[str]]) -> None:
    from .checkpoints import Checkpoint, save_hf_checkpoint

    save_hf_checkpoint(Checkpoint(model, tok, "trained"), out)
    with open(os.path.join(out, "heldout.json"), "w", encoding="utf-8") as f:
        json.dump(held, f, indent=0, ensure_ascii=False)
    with open(os.path.join(out, "training.json"), "w", encoding="utf-8") as f:  # written last: marks it complete
        json.dump(record, f, indent=2)


# --- the cache ----------------------------------------------------------------------------------

def cached(name: str, cache_dir: str = DEFAULT_CACHE, log: Callable[[str], None] = print) -> str:
    """The checkpoint directory of preset `name`: the shipped weights unpacked (`SHIPPED`), else
    trained first if the cache lacks it.

    Raises:
        Gpt2OnnxError: an unknown preset, or chatterbot-corpus missing (training only).
    """
    _preset(name)
    return _unpack_shipped(name, cache_dir) if name in SHIPPED else trained(name, cache_dir, log)


def _preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise Gpt2OnnxError(f"unknown trained model {name!r}; choose one of: " + ", ".join(f"trained:{n}" for n in PRESETS))
    return PRESETS[name]


def trained(name: str, cache_dir: str = DEFAULT_CACHE, log: Callable[[str], None] = print) -> str:
    """The checkpoint directory of preset `name` trained on this machine (trained first if the cache lacks it)."""
    cfg = _preset(name)
    path = os.path.abspath(os.path.join(cache_dir, f"{name}-{data_key(cfg)}"))
    if os.path.isfile(os.path.join(path, "training.json")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    log(f"training trained:{name} once ({cfg.n_layer} layers x {cfg.n_embd}, {cfg.epochs} epochs; a few minutes on 2 cores) "
        f"into {path}")
    _import_trainers()
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=os.path.dirname(path))
    try:
        train(cfg, tmp, log)
        _publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _import_trainers() -> None:
    """What train() and its checkpoint writer import, imported before the cache directory exists: a signal
    inside a compiled module's import may abort the process past the clean-up (convert._import_writers)."""
    import safetensors.torch  # noqa: F401
    import tokenizers  # noqa: F401
    import torch  # noqa: F401
    import transformers
    import yaml  # noqa: F401

    transformers.GPT2LMHeadModel  # noqa: B018 - the lazy module imports the model's code (and its extensions) here


def _publish(tmp: str, path: str) -> None:
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished the same directory first: keep its copy
        if not os.path.isfile(os.path.join(path, "training.json")):
            raise


# --- the shipped reference weights --------------------------------------------------------------

def _shipped(name: str):
    return resources.files("gpt2onnx.export").joinpath("data", name)


def _unpack_shipped(name: str, cache_dir: str) -> str:
    """The shipped checkpoint as an ordinary Hugging Face directory in the cache (its tokenizer.json is
    shipped xz-compressed: 3.2 MB -> 0.1 MB), named by the shipped weights' hash."""
    import lzma

    src = _shipped(name)
    weights = src.joinpath("model.safetensors").read_bytes()
    path = os.path.abspath(os.path.join(cache_dir, f"{name}-shipped-{hashlib.sha256(weights).hexdigest()[:16]}"))
    if os.path.isfile(os.path.join(path, "training.json")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=os.path.dirname(path))
    try:
        for f in SHIPPED_FILES:
            with open(os.path.join(tmp, f), "wb") as out:
                out.write(weights if f == "model.safetensors" else src.joinpath(f).read_bytes())
        with open(os.path.join(tmp, "tokenizer.json"), "wb") as out:
            out.write(lzma.decompress(src.joinpath("tokenizer.json.xz").read_bytes()))
        with open(os.path.join(tmp, "training.json"), "wb") as out:  # written last: marks it complete
            out.write(src.joinpath("training.json").read_bytes())
        _publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ship(name: str, cache_dir: str = DEFAULT_CACHE, log: Callable[[str], None] = print) -> str:
    """Train preset `name` here (or take it from the cache) and replace its shipped copy: weights in
    fp16 (the shipped weights are the reference: loaded back they are exact in fp32), tokenizer.json
    xz-compressed, training.json with the held-out perplexity of the fp16 weights beside the trained
    ones. Returns the package directory written. The golden replies then need re-recording."""
    import lzma

    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    from .checkpoints import EOS_ID, dtype_kwarg

    src = trained(name, cache_dir, log)
    dst = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", name)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=os.path.dirname(dst))
    try:
        for f in SHIPPED_FILES:
            if f == "model.safetensors":
                half = {k: v.to(torch.float16).contiguous() for k, v in load_file(os.path.join(src, f)).items()}
                save_file(half, os.path.join(tmp, f), metadata={"format": "pt"})
            elif f == "config.json":
                with open(os.path.join(src, f), encoding="utf-8") as fi:
                    config = json.load(fi)
                with open(os.path.join(tmp, f), "w", encoding="utf-8") as fo:
                    json.dump({**config, "dtype": "float16"}, fo, indent=2)
            else:
                shutil.copyfile(os.path.join(src, f), os.path.join(tmp, f))
        with open(os.path.join(src, "tokenizer.json"), "rb") as fi, open(os.path.join(tmp, "tokenizer.json.xz"), "wb") as fo:
            fo.write(lzma.compress(fi.read(), preset=9 | lzma.PRESET_EXTREME))
        with open(os.path.join(src, "training.json"), encoding="utf-8") as f:
            record = json.load(f)
        model = transformers.GPT2LMHeadModel.from_pretrained(tmp, **dtype_kwarg(torch.float32)).eval()
        tok = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
        n = record["settings"]["n_positions"]
        rows = [encode_conversation(tok, c, EOS_ID)[:n] for c in heldout(src)]
        record["shipped"] = {"dtype": "float16", "heldout_perplexity": perplexity(model, rows)}
        with open(os.path.join(tmp, "training.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        shutil.rmtree(dst, ignore_errors=True)
        os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst))
    log(f"shipped {name} in {dst} ({size / 1e6:.1f} MB); held-out perplexity {record['heldout_perplexity']:.1f} trained, "
        f"{record['shipped']['heldout_perplexity']:.1f} in fp16; re-record the golden replies: python -m tests.test_trained")
    return dst


def heldout(path: str) -> list[list[str]]:
    """The held-out conversations a trained checkpoint directory was kept from."""
    with open(os.path.join(path, "heldout.json"), encoding="utf-8") as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m gpt2onnx.export.train", description="Train (or find cached) a reference chat model.")
    p.add_argument("name", choices=sorted(PRESETS), help="preset")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"where trained models are kept (default {DEFAULT_CACHE})")
    p.add_argument("--ship", action="store_true", help="train here and replace the shipped weights of a preset in SHIPPED")
    args = p.parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.ship and args.name not in SHIPPED:
        p.error(f"only {', '.join(SHIPPED)} ship with the package")
    print(ship(args.name, args.cache_dir, log) if args.ship else cached(args.name, args.cache_dir, log))


if __name__ == "__main__":
    main()
