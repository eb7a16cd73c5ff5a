"""Bad input that once reached a traceback, a silent wrong artifact or a half-replaced directory: a
checkpoint whose config.json and weights disagree, another architecture, a signal during `--force`'s
swap, a link as -o, a full disk, an empty --api-key, --debug after the command."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from gpt2onnx.export import checkpoints
from gpt2onnx.runtime.errors import Gpt2OnnxError

from .conftest import QUIET, assert_one_line_error, run_cli


def _edited_checkpoint(tiny, path, **config) -> str:
    checkpoints.save_hf_checkpoint(tiny, str(path))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **config}))
    return str(path)


def test_another_architecture_is_refused_before_its_weights_load(tmp_path, tiny, monkeypatch):
    """A llama config.json once instantiated a 7B-parameter model (killed for memory) before the
    model_type check; a hub id would download every weight first."""
    import transformers

    path = _edited_checkpoint(tiny, tmp_path / "ck", model_type="llama")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded before the architecture was checked"))
    with pytest.raises(Gpt2OnnxError, match=r"is a 'llama' model; only GPT-2-family checkpoints"):
        checkpoints.load(path)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    del cfg["model_type"]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Gpt2OnnxError, match="has no model_type in its config.json"):
        checkpoints.load(path)


def _gpt2_config(**kw):
    import transformers

    return transformers.GPT2Config(**{"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 1000, "bos_token_id": 999,
                                      "eos_token_id": 999, **kw})


@pytest.mark.parametrize("kw, needle", [
    ({"n_inner": 192}, "n_inner=192; gpt2onnx supports GPT-2's MLP width 4 x n_embd only"),  # was: a weight-shape error
    ({"n_embd": 60}, "head size n_embd / n_head = 15 is not a multiple of 8"),  # was: onnxruntime's error after the build
    ({"activation_function": "relu"}, "activation_function='relu'; gpt2onnx supports GELU's tanh approximation only"),
    ({"eos_token_id": None, "bos_token_id": None}, "sets no eos_token_id"),  # was: vocab_size - 1, a stop HF never makes
    ({"vocab_size": 500}, "eos_token_id 999 is outside its vocabulary 0..499"),  # was: IndexError in the parity check
    ({"pad_token_id": 5000}, "pad_token_id 5000 is outside its vocabulary 0..999"),  # was: exported, then refused at load
])
def test_configs_the_graph_does_not_implement_are_refused(kw, needle):
    from gpt2onnx.export.graph import model_config

    with pytest.raises(Gpt2OnnxError, match=re.escape(needle)):
        model_config(_gpt2_config(**kw))


def test_the_stop_token_is_the_one_transformers_generate_stops_on():
    """generation_config.json's eos_token_id is what generate stops on (it was ignored: the artifact stopped on
    config.json's); a list of them gives the first and a note; gelu_pytorch_tanh is gelu_new's function."""
    import transformers

    from gpt2onnx.export.graph import model_config

    cfg = _gpt2_config(activation_function="gelu_pytorch_tanh")
    assert model_config(cfg).eos_token_id == 999
    assert model_config(cfg, transformers.GenerationConfig(eos_token_id=42)).eos_token_id == 42
    notes = []
    got = model_config(cfg, transformers.GenerationConfig(eos_token_id=[7, 8]), notes=notes)
    assert got.eos_token_id == 7 and got.pad_token_id == 7 and notes == [  # no pad id: padding with the stop token
        "note: the checkpoint stops on 2 ids (7, 8); the artifact's eos_token_id is 7: pass the others as stop_token_ids"]
    notes = []
    model_config(cfg, transformers.GenerationConfig(eos_token_id=42, no_repeat_ngram_size=3, do_sample=True), notes=notes)
    assert notes == ["note: the checkpoint's generation_config.json sets do_sample=True, no_repeat_ngram_size=3, which "
                     "transformers' generate applies by default; gpt2onnx takes generation options per request"]
    notes = []
    model_config(cfg, transformers.GenerationConfig.from_model_config(cfg), notes=notes)
    assert notes == []  # what transformers derives from a config alone sets nothing to say
    assert model_config(_gpt2_config(n_embd=48, n_head=4), fused=False).head_dim == 12  # a plain graph takes any head size


def test_a_classifier_checkpoint_is_refused_as_one(tmp_path, tiny):
    path = _edited_checkpoint(tiny, tmp_path / "ck", architectures=["GPT2ForSequenceClassification"])
    with pytest.raises(Gpt2OnnxError, match="is a GPT2ForSequenceClassification; gpt2onnx exports GPT-2 language models"):
        checkpoints.load(path)


@pytest.mark.parametrize("edit, needles", [
    ({"n_positions": 256}, ["do not have the shapes its config.json gives", "size mismatch"]),  # was: internal error, 2 lines
    ({"model_type": "gpt_neo"}, ["is a 'gpt_neo' model"]),  # was: internal error (size mismatch)
    ({"n_layer": 3}, ["lacks 12 weights its config.json needs", "transformer.h.2."]),  # was: exported, layer 2 random
    ({"n_layer": 1}, ["has no place for", "transformer.h.1."]),  # was: exported, layer 1 dropped
    ("truncate", ["cannot read the weights", "damaged"]),  # was: internal error: SafetensorError
])
def test_checkpoint_whose_weights_and_config_disagree(tmp_path, tiny, edit, needles):
    path = _edited_checkpoint(tiny, tmp_path / "ck", **(edit if isinstance(edit, dict) else {}))
    if edit == "truncate":
        weights = tmp_path / "ck" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = run_cli("export", path, "-o", str(tmp_path / "out"))
    assert_one_line_error(r, *needles)
    assert "Some weights" not in r.stdout and sorted(os.listdir(tmp_path)) == ["ck"]


_SIGNAL_BETWEEN_RENAMES = """
import os, signal, sys
from gpt2onnx import cli
rename = os.rename
def renamed(a, b):
    rename(a, b)
    if b.endswith(".old"):  # the old artifact moved aside, the new one not yet in its place
        os.kill(os.getpid(), signal.SIGTERM)
os.rename = renamed
sys.exit(cli.main(sys.argv[1:]))
"""


def test_signal_during_force_replace_leaves_a_whole_artifact(tmp_path, tiny_artifact):
    """The final directory is the old artifact or the new complete one: a SIGTERM between the two
    renames once left neither (the new one deleted, the old one hidden as .art.tmp-*.old)."""
    from gpt2onnx.runtime.artifact import load_manifest

    out = tmp_path / "art"
    shutil.copytree(tiny_artifact, out)
    r = subprocess.run([sys.executable, "-c", _SIGNAL_BETWEEN_RENAMES, "export", "synthetic:tiny", "-o", str(out),
                        "--force", "--seed", "5"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 130 and "interrupted" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert os.listdir(tmp_path) == ["art"], os.listdir(tmp_path)
    assert load_manifest(str(out)).raw["source"]["seed"] == 5


def test_force_onto_a_link_to_an_artifact(tmp_path, tiny_artifact):
    """`-o current --force` where current -> an artifact: the link is replaced, its target kept, and no
    stray `.current.tmp-*.old` link is left beside them."""
    from gpt2onnx.export.convert import ExportOptions, export

    shutil.copytree(tiny_artifact, tmp_path / "v1")
    os.symlink("v1", tmp_path / "current")
    export(ExportOptions("synthetic:tiny", str(tmp_path / "current"), force=True, seed=3), log=QUIET)
    assert sorted(os.listdir(tmp_path)) == ["current", "v1"]
    assert not os.path.islink(tmp_path / "current")
    assert json.loads((tmp_path / "current" / "gpt2onnx.json").read_text())["source"]["seed"] == 3
    assert json.loads((tmp_path / "v1" / "gpt2onnx.json").read_text())["source"]["seed"] == 0


def test_interrupted_export_removes_the_directories_it_created(tmp_path):
    out = tmp_path / "new" / "deeper" / "art"
    p = subprocess.Popen([sys.executable, "-m", "gpt2onnx.cli", "export", "synthetic:tiny", "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out.parent.is_dir() and os.listdir(out.parent)) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, "the export ended before it was signalled"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "interrupted" in err, err
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def test_full_disk_is_an_error_not_a_bug(tmp_path, monkeypatch):
    """ENOSPC while writing the weights (DialoGPT-large fp32 is 3 GB) was 'internal error: OSError ...
    (rerun with --debug)'."""
    from gpt2onnx.export import convert

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(convert, "_weight_file", full)  # every graph's weights go through it
    with pytest.raises(Gpt2OnnxError, match=r"cannot write .*/sub/art: No space left on device; free space there or choose another -o"):
        convert.export(convert.ExportOptions("synthetic:tiny", str(tmp_path / "sub" / "art")), log=QUIET)
    assert os.listdir(tmp_path) == []


def test_empty_api_key_is_refused(tiny_artifact):
    """`--api-key "$KEY"` with KEY unset served every route without a key, silently."""
    assert_one_line_error(run_cli("serve", tiny_artifact, "--port", "0", "--api-key", "", timeout=60), "the API key is empty")


def test_debug_after_the_command():
    """An internal error says 'rerun with --debug': appended at the end it was 'unrecognized arguments'."""
    from gpt2onnx.cli import build_parser

    parser = build_parser()
    for cmd in (["info", "a"], ["generate", "a", "hi"], ["chat", "a"], ["export", "m", "-o", "x"], ["serve", "a"]):
        assert parser.parse_args([*cmd, "--debug"]).debug is True
        assert parser.parse_args(["--debug", *cmd]).debug is True
        assert parser.parse_args(cmd).debug is False


def test_bench_refuses_a_context_it_cannot_run(tiny_artifact, tmp_path):
    """--context 0 was accepted and failed after the warm-up, as a worker's internal error."""
    assert_one_line_error(run_cli("bench", tiny_artifact, "--out", str(tmp_path / "r"), "--context", "0"), "--context takes positive")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag, value", [("--request-timeout-s", "nan"), ("--shutdown-timeout-s", "-1")])
def test_serve_timeouts_name_their_flag(tiny_artifact, flag, value):
    assert_one_line_error(run_cli("serve", tiny_artifact, "--port", "0", flag, value, timeout=60), flag, value)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_stdout_is_an_error_not_a_bug(tiny_artifact):
    """`generate A hi > /dev/full` was 'internal error: OSError ... (rerun with --debug)'."""
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "gpt2onnx.cli", "generate", tiny_artifact, "hi", "--max-new-tokens", "2"],
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert_one_line_error(r, "cannot write the output: No space left on device")
