"""The precision table on trained weights.

Every precision of a trained reference model (export/train.py), exported by the normal export path,
measured against the PyTorch fp32 model on the conversations held out of its training:

- teacher-forced, as generation runs it (the opening turn as one prompt pass, then one token per
  step through the KV cache): perplexity of ours and of PyTorch over every token but each
  conversation's first, mean KL(PyTorch || ours) and top-1 agreement at every scored position;
- greedy replies: for each held-out opening turn, the reply the runtime's `Engine.generate` gives
  (batch 1) against PyTorch fp32 greedy through transformers `generate`: the share of prompts whose
  reply is token for token the reference's, and where the replies that differ first differ.

    python -m gpt2onnx.benchmarks.accuracy trained:chat --out reports/accuracy-trained-chat

and, where `make llamacpp` has run, llama.cpp's F32 / Q8_0 / Q4_0 conversions of the same checkpoint
the same two ways (llamacpp_rows), so each precision of ours stands beside llama.cpp's.

writes accuracy.json, accuracy.md and accuracy.png to --out. The benchmark report shows the table
when accuracy.json sits beside its results.json.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time

from gpt2onnx.export.quantize import Int4Config, Int8Config

# The rows: (name, precision, KV cache dtype; None = the export's default for that precision,
# quantizer settings other than the default: ExportOptions' int8 / int4 fields).
VARIANTS = (
    ("fp32", "fp32", None, {}),
    ("fp16", "fp16", None, {}),
    ("fp32 + int8 KV", "fp32", "int8", {}),
    ("int8", "int8", None, {}),  # int8 KV cache by default on the CPU provider
    ("int8 nbits", "int8", None, {"int8": Int8Config(method="nbits")}),  # --int8-method nbits: batch-invariant
    ("int4", "int4", None, {}),  # int8 KV cache by default on the CPU provider; the head 8-bit
    ("int4 + 4-bit head", "int4", None, {"int4": Int4Config(head_bits=4)}),  # export --int4-head-bits 4
    ("int4 + fp16 KV", "int4", "float16", {}),  # export --kv-dtype float16: what the int8 cache costs int4
)
REPLY_TOKENS = 32  # greedy reply length cap (replies end earlier at <|endoftext|>)


def heldout_rows(ckpt, convs: list[list[str]]) -> list[tuple[int, list[int]]]:
    """(prompt length, ids) per held-out conversation: the opening turn + EOS is the prompt."""
    from gpt2onnx.export.train import encode_conversation

    eos = ckpt.model.config.eos_token_id
    n = ckpt.model.config.n_positions
    return [(len(encode_conversation(ckpt.tokenizer, c[:1], eos)), encode_conversation(ckpt.tokenizer, c, eos)[:n]) for c in convs]


def reference_logits(torch_model, rows: list[tuple[int, list[int]]]) -> list:
    """PyTorch fp32's logits [T, vocab] over each held-out conversation, computed once for every row of the table."""
    from gpt2onnx.export import parity

    return [parity.reference_logits(torch_model, ids) for _, ids in rows]


def teacher_forced(session, cfg, rows: list[tuple[int, list[int]]], refs: list) -> dict:
    """Perplexities, mean KL and top-1 agreement over the held-out conversations against their
    reference logits `refs`, each run as a prompt pass over its opening turn and then one token per
    step (the KV cache path): the export's own teacher-forced loop (export/parity.py), scoring every
    token but each conversation's first."""
    from gpt2onnx.export import parity

    runs = []
    for (p, ids), ref in zip(rows, refs):
        ours = parity.graph_logits(session, cfg, ids, prefill=p)
        runs.append((ids, ref[:-1], ours[:-1]))  # predictions of tokens 1..T-1
    return parity.forced_figures(runs)


def reference_replies(torch_model, prompts: list[list[int]], max_new_tokens: int = REPLY_TOKENS) -> list[list[int]]:
    """PyTorch fp32 greedy replies through transformers `generate` (EOS included when reached)."""
    import torch

    eos = torch_model.config.eos_token_id
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch_model.generate(torch.tensor([p]), attention_mask=torch.ones((1, len(p)), dtype=torch.long),
                                       max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                       eos_token_id=eos, pad_token_id=eos)
            out.append(ids[0, len(p):].tolist())
    return out


def llamacpp_rows(model: str, hf: str, cache: str, rows: list[tuple[int, list[int]]], prompts: list[list[int]],
                  ref_replies: list[list[int]], refs: list, eos: int, log=print) -> list[dict]:
    """llama.cpp at each precision beside ours: the trained checkpoint `hf` converted to GGUF F32 / Q8_0 /
    Q4_0 as the bench converts it (engines/llamacpp.py, into `cache`), run through llama-cpp-python as the
    bench runs it, teacher-forced the way ours is (the opening turn as one pass, then one token per step;
    every position's logits kept) against PyTorch fp32's logits `refs` (reference_logits), and its greedy replies (temperature 0,
    up to REPLY_TOKENS, `eos` included) against PyTorch's."""
    import numpy as np
    from llama_cpp import Llama

    from gpt2onnx.benchmarks.engines import llamacpp
    from gpt2onnx.export import parity
    from gpt2onnx.runtime.session import physical_cores

    out = []
    for precision, gtype in llamacpp.GGUF_TYPES.items():
        gguf = llamacpp.gguf_model(hf, cache, precision, log=log)
        llm = Llama(gguf, n_ctx=0, logits_all=True, n_threads=physical_cores(), n_threads_batch=physical_cores(), use_mmap=False,
                    flash_attn=True, verbose=False)
        t = time.perf_counter()
        runs = []
        for (p, ids), ref in zip(rows, refs):
            llm.reset()
            llm.eval(ids[:p])
            for tok in ids[p:]:
                llm.eval([tok])
            theirs = np.array(llm.scores[: len(ids)], np.float64)  # row t predicts token t + 1
            runs.append((ids, ref[:-1], theirs[:-1]))
        replies = []
        for prompt in prompts:
            llm.reset()
            reply = []
            for tok in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
                reply.append(int(tok))
                if tok == eos or len(reply) == REPLY_TOKENS:
                    break
            replies.append(reply)
        row = {"model": model, "variant": f"llama.cpp {gtype}", "precision": precision, "kv_dtype": "float16",
               **parity.forced_figures(runs), **reply_agreement(replies, ref_replies)}
        out.append(row)
        log(f"llama.cpp {gtype}: perplexity {row['perplexity']:.3f} ({row['perplexity_change_pct']:+.2f}%), KL {row['mean_kl']:.2e}, "
            f"top-1 {row['top1_agreement']:.4f}, greedy replies {row['greedy_agreement']:.3f} ({time.perf_counter() - t:.0f} s)")
        del llm
    return out


def reply_agreement(ours: list[list[int]], ref: list[list[int]]) -> dict:
    """Share of replies equal token for token, and the first differing position of the others."""
    first = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), min(len(o), len(r)))
             for o, r in zip(ours, ref) if o != r]
    return {
        "prompts": len(ref),
        "greedy_agreement": 1.0 - len(first) / len(ref),
        "diverged": len(first),
        "first_divergence_median": float(statistics.median(first)) if first else None,
        "first_divergence_mean": float(statistics.mean(first)) if first else None,
    }


def measure(model: str, out: str, artifacts: str, log=print, force: bool = False, limit: int | None = None,
            llamacpp: bool = False) -> dict:
    """Export every variant of `model` (a trained:NAME) into `artifacts`, measure each against
    PyTorch fp32 on its held-out conversations (the first `limit` of them, default all), and with
    `llamacpp` llama.cpp's conversions too (llamacpp_rows; skipped, saying why, where `make llamacpp`
    has not run); write accuracy.json / .md / .png into `out`; returns what accuracy.json holds."""
    import warnings

    from gpt2onnx.export import checkpoints, parity, train
    from gpt2onnx.export.convert import ExportOptions, export
    from gpt2onnx.export.graph import model_config
    from gpt2onnx.runtime import Engine

    ckpt = checkpoints.load(model)
    path = train.cached(model.split(":", 1)[1], log=log)
    with open(os.path.join(path, "training.json"), encoding="utf-8") as f:
        record = json.load(f)
    convs = train.heldout(path)[:limit]
    rows = heldout_rows(ckpt, convs)
    cfg = model_config(ckpt.model.config)
    # greedy replies: each distinct opening turn once (the corpus repeats openings with other replies)
    prompts = list({tuple(ids[:p]): ids[:p] for p, ids in rows}.values())
    t = time.perf_counter()
    ref = reference_replies(ckpt.model, prompts)
    refs = reference_logits(ckpt.model, rows)  # every variant's teacher-forced figures are against these
    log(f"PyTorch fp32 greedy replies to {len(prompts)} held-out prompts and logits over {len(rows)} conversations in "
        f"{time.perf_counter() - t:.0f} s")
    results = []
    for name, precision, kv, quant in VARIANTS:
        art = os.path.join(artifacts, f"{model.split(':', 1)[1]}-{name.replace(' + ', '-').replace(' ', '')}")
        opts = ExportOptions(model, art, precision=precision, kv_dtype=kv, force=True, **quant)
        if force or not _usable(art, opts):
            log(f"exporting {model} {name}")
            export(opts, log=lambda m: None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fp16 on the CPU provider: slower, measured anyway
            engine = Engine.load(art, provider="cpu")
        t = time.perf_counter()
        figs = teacher_forced(parity.ort_session(engine.manifest.file("model.onnx")), cfg, rows, refs)
        ours = [engine.generate([p], max_new_tokens=REPLY_TOKENS)[0] for p in prompts]
        row = {"model": model, "variant": name, "precision": precision, "kv_dtype": engine.manifest.raw["io"]["kv"]["dtype"],
               **figs, **reply_agreement(ours, ref), "tolerances": engine.manifest.raw["accuracy"]["tolerances"],
               "export_check": engine.manifest.raw["accuracy"]["teacher_forced"]}
        results.append(row)
        log(f"{name}: perplexity {row['perplexity']:.3f} ({row['perplexity_change_pct']:+.2f}%), KL {row['mean_kl']:.2e}, "
            f"top-1 {row['top1_agreement']:.4f}, greedy replies {row['greedy_agreement']:.3f} ({time.perf_counter() - t:.0f} s)")
    skipped = None
    if llamacpp:
        from gpt2onnx.benchmarks.engines.llamacpp import missing

        skipped = missing()
        if skipped:
            log(f"no llama.cpp rows: {skipped}")
        else:
            results += llamacpp_rows(model, path, artifacts, rows, prompts, ref, refs, ckpt.model.config.eos_token_id, log)
    doc = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "training": record,
        "heldout": {"conversations": len(rows), "prompts": len(prompts), "reply_tokens": REPLY_TOKENS,
                    "examples": [{"prompt": ckpt.tokenizer.decode(p[:-1]), "reference_reply": ckpt.tokenizer.decode(r, skip_special_tokens=True)}
                                 for p, r in list(zip(prompts, ref))[:8]]},
        "rows": results,
        **({"llamacpp_skipped": skipped} if skipped else {}),
    }
    from .results import publish

    def fill(tmp: str) -> None:
        with open(os.path.join(tmp, "accuracy.json"), "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, ensure_ascii=False)
        with open(os.path.join(tmp, "accuracy.md"), "w", encoding="utf-8") as f:
            f.write("\n".join(markdown(doc)) + "\n")
        plot([doc], os.path.join(tmp, "accuracy.png"))

    publish(out, fill)
    return doc


def _usable(art: str, opts) -> bool:
    """An artifact left by an earlier run serves again if it is whole and quantized as `opts` asks: an
    int8 of the same method, an int4 of the same head width (one exported before the 8-bit head became
    the default records none: 4 bits)."""
    from gpt2onnx.runtime.artifact import load_manifest

    try:
        m = load_manifest(art, verify="size")
    except Exception:  # absent or damaged: export again
        return False
    q = m.raw.get("quantization") or {}
    if opts.precision == "int8":
        return ("MatMulNBits" in q.get("method", "")) == (opts.int8.method == "nbits")
    if opts.precision == "int4":
        return q.get("head_bits", 4) == opts.int4.head_bits
    return True


def table(rows: list[dict]) -> list[str]:
    """One markdown row per model and precision."""
    L = ["| model | precision | KV cache | perplexity (PyTorch fp32) | Δ perplexity | mean KL | top-1 | greedy replies equal | "
         "first divergence median / mean |", "|" + "---|" * 9]
    for r in rows:
        greedy = "—" if r.get("greedy_agreement") is None else f"{r['greedy_agreement']:.3f} ({r['prompts'] - r['diverged']}/{r['prompts']})"
        div = "—" if r.get("first_divergence_median") is None else f"{r['first_divergence_median']:.0f} / {r['first_divergence_mean']:.1f}"
        L.append(f"| {r['model']} | {r['variant']} | {r['kv_dtype']} | {r['perplexity']:.3f} ({r['perplexity_pytorch']:.3f}) | "
                 f"{r['perplexity_change_pct']:+.2f}% | {r['mean_kl']:.2e} | {r['top1_agreement']:.4f} | {greedy} | {div} |")
    return L


def markdown(doc: dict) -> list[str]:
    tr = doc["training"]
    s = tr["settings"]
    L = [f"# Precision table on trained weights: {doc['model']}", "",
         f"{doc['created']}. A GPT-2 of {s['n_layer']} layers x {s['n_embd']} ({tr['parameters'] / 1e6:.1f}M parameters, "
         f"vocabulary 50257, tied embeddings) trained here on {tr['data']['train_conversations']} conversations "
         f"({tr['data']['train_tokens']} tokens) in {tr['minutes']:.1f} min ({tr['machine']}); held-out perplexity "
         f"{tr['heldout_perplexity']:.2f}.",
         f"Measured on the {doc['heldout']['conversations']} held-out conversations against the PyTorch fp32 model: "
         "teacher-forced (opening turn as a prompt pass, then one token per step through the KV cache) and greedy replies "
         f"to each of their {doc['heldout']['prompts']} distinct opening turns (≤ {doc['heldout']['reply_tokens']} tokens; "
         "ours through `Engine.generate`, batch 1; "
         "the reference through transformers `generate`). First divergence: the reply token index where a reply that "
         "differs first differs.", ""]
    L += table(doc["rows"])
    if any(r["variant"].startswith("llama.cpp") for r in doc["rows"]):
        L += ["", "llama.cpp rows: the same checkpoint converted to GGUF with llama.cpp's converter and quantizer defaults "
                  "(its Q4_0 keeps the tied embedding and output matrix at a higher precision: Q6_K, or Q8_0 where rows are "
                  "not a multiple of 256; ours int4 keeps it in 8-bit blocks of 128, or 4-bit with --int4-head-bits 4), run through "
                  "llama-cpp-python with its f16 KV cache: teacher-forced the same way (the opening turn in one pass, then "
                  "one token per step), greedy replies at temperature 0."]
    if doc.get("llamacpp_skipped"):
        L += ["", f"No llama.cpp rows: {doc['llamacpp_skipped']}."]
    L += ["", "Reference replies (PyTorch fp32 greedy):", ""]
    L += [f"- {e['prompt']!r} → {e['reference_reply']!r}" for e in doc["heldout"]["examples"]]
    return L


def plot(docs: list[dict], path: str) -> None:
    """Mean KL (log scale) and top-1 agreement by precision, one bar group per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [r["variant"] for r in docs[0]["rows"]]
    w = 0.8 / len(docs)
    for k, doc in enumerate(docs):
        by = {r["variant"]: r for r in doc["rows"]}
        xs = [i + k * w for i in range(len(names))]
        ax.bar(xs, [max(by[n]["mean_kl"], 1e-12) if n in by else 0 for n in names], w, label=doc["model"])
        ax2.bar(xs, [by[n]["top1_agreement"] if n in by else 0 for n in names], w, label=doc["model"])
    for a in (ax, ax2):
        a.set_xticks([i + 0.4 - w / 2 for i in range(len(names))], names, rotation=15)
        a.grid(alpha=0.3, axis="y")
        a.legend()
    ax.set(yscale="log", ylabel="mean KL(PyTorch fp32 || ours)", title="KL on held-out conversations")
    lo = min(r["top1_agreement"] for d in docs for r in d["rows"])
    ax2.set(ylabel="top-1 agreement", ylim=(min(0.9, lo - 0.01), 1.0), title="Top-1 agreement with PyTorch fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from .settings import ToolParser

    p = ToolParser(prog="python -m gpt2onnx.benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="trained:chat", help="a trained:NAME model (default trained:chat)")
    p.add_argument("--out", default="reports/accuracy-trained-chat", help="where accuracy.json/.md/.png go")
    p.add_argument("--artifacts", default="artifacts", help="where the exported variants are kept")
    p.add_argument("--force", action="store_true", help="export every variant again")
    p.add_argument("--limit", type=int, help="measure the first N held-out conversations only (default all)")
    p.add_argument("--no-llamacpp", action="store_true", help="leave out llama.cpp's rows (measured where `make llamacpp` ran)")
    args = p.parse_args(argv)
    p.at_least(args, limit=1)
    if not args.model.startswith("trained:"):  # synthetic weights have no held-out text to be accurate on
        p.error(f"accuracy is measured on trained weights and their held-out conversations: give trained:chat or "
                f"trained:chat-tiny, not {args.model!r}")
    p.output_dir(args.out)
    p.output_dir(args.artifacts, "--artifacts")
    p.run(measure, args.model, args.out, args.artifacts, log=lambda m: print(m, flush=True), force=args.force, limit=args.limit,
          llamacpp=not args.no_llamacpp)


if __name__ == "__main__":
    main()
