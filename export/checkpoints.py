"""Checkpoints: local Hugging Face directories, hub ids, and seeded synthetic DialoGPT models.

`load(spec)` returns a `Checkpoint`: the transformers GPT-2 model (fp32, eval mode), its tokenizer
as a `tokenizers.Tokenizer`, and a source string for the manifest. torch and transformers are
imported inside the functions that need them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from gpt2onnx.runtime.errors import Gpt2OnnxError

EOS_ID = 50256
VOCAB_SIZE = 50257


@dataclass(frozen=True)
class SyntheticSpec:
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int = 1024
    # HF's default 0.02 for the real shapes (realistic activation ranges); the tiny test model uses a
    # wide init so its greedy output varies token to token instead of repeating one token.
    initializer_range: float = 0.02


# The exact DialoGPT architectures (GPT-2 small / medium / large) plus a tiny one for tests.
SYNTHETIC = {
    "dialogpt-small": SyntheticSpec(12, 768, 12),
    "dialogpt-medium": SyntheticSpec(24, 1024, 16),
    "dialogpt-large": SyntheticSpec(36, 1280, 20),
    "tiny": SyntheticSpec(2, 64, 4, 128, initializer_range=0.2),
}


@dataclass
class Checkpoint:
    model: Any  # transformers.GPT2LMHeadModel, fp32, eval()
    tokenizer: Any  # tokenizers.Tokenizer
    source: str  # "synthetic:NAME", "trained:NAME", a hub id, or an absolute path
    seed: int | None = None

    @property
    def synthetic(self) -> bool:
        return self.source.startswith("synthetic:")


def sample_text() -> str:
    """The text the project ships for tokenizer training and teacher-forced accuracy."""
    return resources.files("gpt2onnx.export").joinpath("data/sample.txt").read_text("utf-8")


def load(spec: str, seed: int = 0) -> Checkpoint:
    """Load `synthetic:NAME`, `trained:NAME`, a local Hugging Face directory, or a hub id.

    Raises:
        Gpt2OnnxError: unknown synthetic name, a directory that is not a GPT-2 checkpoint, or a
            hub id that cannot be fetched.
    """
    if spec.startswith("synthetic:"):
        name = spec.split(":", 1)[1]
        if name not in SYNTHETIC:
            raise Gpt2OnnxError(
                f"unknown synthetic model {name!r}; choose one of: "
                + ", ".join(f"synthetic:{n}" for n in SYNTHETIC)
            )
        return Checkpoint(synthetic_model(name, seed), synthetic_tokenizer(), spec, seed)
    if spec.startswith("trained:"):  # trained here once and cached (export/train.py), then an ordinary directory
        from . import train

        ckpt = _load_hf(train.cached(spec.split(":", 1)[1]))
        ckpt.source = spec
        return ckpt
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise Gpt2OnnxError(f"{spec} has no config.json; pass a Hugging Face checkpoint directory")
        return _load_hf(os.path.abspath(spec))
    if os.path.exists(spec):
        raise Gpt2OnnxError(f"{spec} is a file; pass a checkpoint directory, a hub id or synthetic:NAME")
    if spec.startswith((os.sep, ".", "~")) or spec.count("/") > 1:  # a path, not a hub id
        raise Gpt2OnnxError(f"no such local directory {spec!r}; pass a checkpoint directory, a hub id or synthetic:NAME")
    return _load_hf(spec, offline=_hub_unreachable(spec))


# A hub id is first probed with one request of at most this many seconds; when the hub does not answer,
# only the local hub cache is read. Without the probe huggingface_hub retries each file five times with
# backoff (about 50 s and 26 lines of warnings for one checkpoint) before failing.
HUB_PROBE_TIMEOUT_S = 5.0
# tokenizer files a GPT-2 checkpoint directory must hold, one of these sets (transformers builds the
# fast tokenizer from vocab.json and merges.txt when tokenizer.json is missing)
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def _hub_unreachable(repo_id: str) -> str | None:
    """One request to the hub about `repo_id`, without retries: None when the hub answers in time
    (whatever the answer: a missing or gated repo is transformers' to report), else why it did not."""
    import requests
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)  # HfApi() reads HF_ENDPOINT now, not at import
    except (requests.HTTPError, ValueError):  # it answered (404, 401 ...), or the id is malformed
        return None
    except OfflineModeIsEnabled:
        return "HF_HUB_OFFLINE is set"
    except requests.Timeout:
        return f"{constants.ENDPOINT} did not answer within {HUB_PROBE_TIMEOUT_S:g} s"
    except OSError:  # requests' ConnectionError: no route, no name resolution, connection refused
        return f"cannot connect to {constants.ENDPOINT}"
    return None


def dtype_kwarg(dtype) -> dict[str, Any]:
    """`from_pretrained`'s dtype keyword: `dtype` since transformers 4.56, which warns on the older
    `torch_dtype` that transformers 4.45-4.55 need."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def _load_hf(name_or_path: str, offline: str | None = None) -> Checkpoint:
    """Load a local checkpoint directory, or a hub id: from the hub, or from the local hub cache only
    when `offline` says why the hub cannot be reached."""
    import transformers

    if os.path.isdir(name_or_path) and not any(
        all(os.path.isfile(os.path.join(name_or_path, f)) for f in files) for files in TOKENIZER_FILES
    ):
        raise Gpt2OnnxError(
            f"{name_or_path} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt); save the "
            f"checkpoint's tokenizer there with tokenizer.save_pretrained({name_or_path!r})"
        )
    from safetensors import SafetensorError

    local = {"local_files_only": True} if offline else {}
    try:
        # config.json alone first: another architecture is refused before its weights are read (or downloaded)
        config = transformers.PretrainedConfig.get_config_dict(name_or_path, **local)[0]
        model_type = config.get("model_type")
        if model_type != "gpt2":
            what = f"is a {model_type!r} model" if model_type else "has no model_type in its config.json"
            raise Gpt2OnnxError(f"{name_or_path} {what}; only GPT-2-family checkpoints (model_type 'gpt2') are supported")
        heads = [a for a in config.get("architectures") or [] if a not in LM_ARCHITECTURES]
        if heads:  # a classifier or a two-headed model: its extra weights are not a language model's
            raise Gpt2OnnxError(f"{name_or_path} is a {heads[0]}; gpt2onnx exports GPT-2 language models "
                                f"({', '.join(LM_ARCHITECTURES)})")
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # its paragraph on missing or unused weights: refused below in one line
        try:
            model, loading = transformers.AutoModelForCausalLM.from_pretrained(
                name_or_path, **dtype_kwarg("float32"), **local, output_loading_info=True)
        finally:
            transformers.logging.set_verbosity(verbosity)
        hf_tok = transformers.AutoTokenizer.from_pretrained(name_or_path, use_fast=True, **local)
    except (OSError, ValueError) as e:  # missing files, unreachable hub, malformed hub id
        if offline:  # not a directory here, not in the hub cache
            raise Gpt2OnnxError(
                f"no such local directory {name_or_path!r}, and the hub is unreachable ({offline}); pass a "
                "checkpoint directory or synthetic:NAME, or connect to the hub"
            ) from None
        raise Gpt2OnnxError(
            f"cannot load checkpoint {name_or_path!r} ({str(e).splitlines()[0]}); pass a local "
            "directory with config.json, weights and tokenizer files, or synthetic:NAME"
        ) from None
    except SafetensorError as e:  # a truncated or damaged weights file
        raise Gpt2OnnxError(f"cannot read the weights of {name_or_path} ({e}); the file is damaged, save the checkpoint again") from None
    except RuntimeError as e:  # torch's "size mismatch for weight: copying a param with shape ..."
        if "size mismatch" not in str(e):
            raise
        raise Gpt2OnnxError(f"the weights of {name_or_path} do not have the shapes its config.json gives "
                            f"({' '.join(ln.strip() for ln in str(e).splitlines())}); fix config.json or save the checkpoint again") from None
    # transformers fills weights the file lacks with random values and drops ones the config has no place
    # for (a config.json edited to more or fewer layers): either gives an artifact of another model
    missing = loading["missing_keys"]
    extra = [k for k in loading["unexpected_keys"] if not k.endswith(("attn.bias", "attn.masked_bias"))]  # old GPT-2 buffers
    if missing or extra:
        what = f"lacks {len(missing)} weights its config.json needs (first {missing[0]})" if missing else \
            f"holds {len(extra)} weights its config.json has no place for (first {extra[0]})"
        raise Gpt2OnnxError(f"{name_or_path} {what}; fix config.json (n_layer, n_embd ...) or save the checkpoint again")
    if not getattr(hf_tok, "is_fast", False):
        raise Gpt2OnnxError(f"{name_or_path} has no fast tokenizer (tokenizer.json); save one with transformers first")
    return Checkpoint(model.eval(), hf_tok.backend_tokenizer, name_or_path)


LM_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")  # config.json's architectures a causal LM loads from (tied head)


def synthetic_model(name: str, seed: int = 0):
    """A GPT2LMHeadModel with the named architecture and weights drawn from `seed`."""
    import torch
    import transformers

    s = SYNTHETIC[name]
    config = transformers.GPT2Config(
        # n_ctx as real GPT-2 / DialoGPT configs carry it (llama.cpp's GGUF converter reads it)
        vocab_size=VOCAB_SIZE, n_positions=s.n_positions, n_ctx=s.n_positions, n_embd=s.n_embd, n_layer=s.n_layer,
        n_head=s.n_head, initializer_range=s.initializer_range, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
        # a synthetic model needs no dropout; tie weights as DialoGPT does
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(config)
    return model.eval()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in GPT-2's id order (ids 0..255)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _synthetic_tokenizer_json() -> str:
    return bpe_tokenizer_json([sample_text()], learned_vocab=4000)


def bpe_tokenizer_json(texts: list[str], learned_vocab: int) -> str:
    """A GPT-2-compatible byte-level BPE tokenizer of exactly 50257 ids (`<|endoftext|>` = 50256), as
    JSON: merges learned from `texts` up to `learned_vocab` ids, the rest filled deterministically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    byte_chars = list(_bytes_to_unicode().values())  # GPT-2 id order
    # Merges learned from the given text make common words single tokens, so prompts have
    # realistic token counts; the rest of the vocabulary is filled with pair merges.
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    learner.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=learned_vocab, initial_alphabet=byte_chars, show_progress=False),
    )
    import json

    learned = json.loads(learner.to_str())["model"]["merges"]
    merges: list[tuple[str, str]] = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned]
    vocab = {c: i for i, c in enumerate(byte_chars)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    merges = [m for m in merges if vocab.get(m[0] + m[1], EOS_ID) < EOS_ID]
    # Deterministic filler: every pair of byte symbols in id order until the vocabulary is full.
    for a in byte_chars:
        if len(vocab) >= EOS_ID:
            break
        for b in byte_chars:
            if len(vocab) >= EOS_ID:
                break
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
                merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(["<|endoftext|>"])
    assert tok.get_vocab_size() == VOCAB_SIZE and tok.token_to_id("<|endoftext|>") == EOS_ID
    return tok.to_str()


def synthetic_tokenizer():
    """A GPT-2-compatible byte-level BPE tokenizer of exactly 50257 ids, `<|endoftext|>` = 50256."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_synthetic_tokenizer_json())


def save_hf_checkpoint(ckpt: Checkpoint, path: str) -> None:
    """Write `ckpt` as a Hugging Face directory (config, safetensors weights, tokenizer files)."""
    import transformers

    ckpt.model.save_pretrained(path)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=ckpt.tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=ckpt.model.config.n_positions,
    )
    hf_tok.save_pretrained(path)
