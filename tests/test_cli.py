"""The CLI through subprocess, and every bad input: one line on stderr, non-zero exit, no traceback."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from .conftest import assert_one_line_error, run_cli


@pytest.mark.parametrize("cmd", ["export", "generate", "chat", "info", "serve", "bench"])
def test_help(cmd):
    r = run_cli(cmd, "--help")
    assert r.returncode == 0 and "usage: gpt2onnx " + cmd in r.stdout


def test_generate_json_text_and_ids(tiny_artifact, engine):
    r = run_cli("generate", tiny_artifact, "Hello, how are you?", "Hi", "--json", "--max-new-tokens", "6", "--provider", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    expected = engine.generate([engine.encode("Hello, how are you?"), engine.encode("Hi")], max_new_tokens=6)
    assert out["ids"] == expected
    assert out["text"] == [engine.decode(x) for x in expected]
    assert "synthetic weights" in r.stderr
    r = run_cli("generate", tiny_artifact, "--ids", "1,2,3;4,5", "--json", "--max-new-tokens", "4")
    assert json.loads(r.stdout)["ids"] == engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=4)


def test_generate_stream_and_timing(tiny_artifact, engine):
    r = run_cli("generate", tiny_artifact, "Hello", "--stream", "--max-new-tokens", "8", "--timing")
    assert r.returncode == 0, r.stderr
    assert r.stdout == engine.generate_text("Hello", max_new_tokens=8) + "\n" and r.stdout.strip()
    assert "ms/token" in r.stderr


def test_info(tiny_artifact):
    r = run_cli("info", tiny_artifact)
    assert r.returncode == 0 and "GroupQueryAttention 2" in r.stdout and "max_abs_logit_diff" in r.stdout
    assert json.loads(run_cli("info", tiny_artifact, "--json").stdout)["precision"] == "fp32"
    assert "batch_invariance: max_abs_logit_diff 0, invariant True" in r.stdout
    model_line = next(ln for ln in r.stdout.splitlines() if ln.startswith("file         model.onnx:"))
    assert " kB " in model_line and "0.0 MB" not in model_line  # a small graph file is not "0.0 MB"


def test_info_says_what_makes_int8_capturable():
    from gpt2onnx.runtime.artifact import _cuda_fix

    assert "int8 is for the CPU" in _cuda_fix("int8", "cpu", "int8") and "--provider cuda" in _cuda_fix("fp32", "cpu", "float32")
    assert "float16 cache, not float32" in _cuda_fix("fp32", "cuda", "float32")


def test_info_into_a_closed_pipe_stops_quietly(tiny_artifact):
    """`gpt2onnx info A | head -1`: the reader leaves before the output ends; no 'internal error: BrokenPipeError'
    and no 'Exception ignored' at exit, but the quiet status a process killed by SIGPIPE would give."""
    cli = subprocess.Popen([sys.executable, "-m", "gpt2onnx.cli", "info", tiny_artifact], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    cli.stdout.close()  # gone before the CLI writes anything: its write meets no reader, every time
    assert cli.wait(timeout=60) == 141 and cli.stderr.read() == b""


def test_chat_loop(tiny_artifact, engine):
    r = run_cli("chat", tiny_artifact, "--max-new-tokens", "5", input="Hello!\n/reset\nHow are you?\n")
    assert r.returncode == 0, r.stderr
    replies = [engine.chat(max_new_tokens=5).send(m) for m in ("Hello!", "How are you?")]  # /reset: each a first turn
    assert all(replies) and r.stdout == "".join(f"{t}\n" for t in replies)
    assert "history cleared" in r.stderr


def test_chat_on_stdin_sends_each_line_as_typed(tiny_artifact, engine):
    """The stdin loop stripped each line, so "hi  " ran other tokens than engine.chat, --say and the server send
    for the same text; only the line ending goes now (Enter alone still sends nothing)."""
    r = run_cli("chat", tiny_artifact, "--max-new-tokens", "5", input="Hello!  \n\n  How are you?\n")
    assert r.returncode == 0, r.stderr
    chat = engine.chat(max_new_tokens=5)
    assert r.stdout == "".join(f"{chat.send(m)}\n" for m in ("Hello!  ", "  How are you?"))


def test_export_refuses_existing_dir_then_force(tmp_path, tiny_artifact):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert_one_line_error(run_cli("export", "synthetic:tiny", "-o", str(out)), "already exists", "--force")
    assert (out / "keep.txt").exists()
    # --force replaces an artifact, never a directory of something else
    assert_one_line_error(run_cli("export", "synthetic:tiny", "-o", str(out), "--force"), "not an artifact", "remove it yourself")
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    assert run_cli("export", "synthetic:tiny", "-o", str(out), "--force").returncode == 0  # an empty directory is fine
    (out / "notes.txt").write_text("y")  # inside an artifact: replaced with it
    r = run_cli("export", "synthetic:tiny", "-o", str(out), "--force", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert not (out / "notes.txt").exists() and json.loads((out / "gpt2onnx.json").read_text())["source"]["seed"] == 3
    assert not [p for p in os.listdir(tmp_path) if p != "art"]  # no temp dirs left behind


def test_export_never_replaces_the_current_directory(tmp_path, monkeypatch):
    from gpt2onnx.export.convert import ExportOptions, export
    from gpt2onnx.runtime.errors import Gpt2OnnxError

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "precious.txt").write_text("x")
    monkeypatch.chdir(tmp_path / "sub")
    for out, match in ((".", "current directory"), (str(tmp_path), "current directory"), ("", "-o is empty")):
        with pytest.raises(Gpt2OnnxError, match=match):
            export(ExportOptions("synthetic:tiny", out, force=True), log=lambda m: None)
    assert (tmp_path / "sub" / "precious.txt").read_text() == "x"


@pytest.mark.parametrize("where, needles", [
    ("{file}/x", ["{file} is a file, not a directory"]),
    ("{file}/x/y", ["{file} is a file, not a directory"]),
    ("{file}", ["{file} is a file", "directory path for -o"]),
    ("/proc/self/gpt2onnx-x", ["/proc/self is not writable"]),  # procfs: refused even to root
])
def test_export_refuses_bad_output_location_first(tmp_path, monkeypatch, where, needles):
    """Checked before the checkpoint is loaded: one line, nothing built, nothing written."""
    from gpt2onnx.export import checkpoints
    from gpt2onnx.export.convert import ExportOptions, export
    from gpt2onnx.runtime.errors import Gpt2OnnxError

    (tmp_path / "file").write_text("x")
    fill = lambda s: s.format(file=tmp_path / "file")  # noqa: E731
    monkeypatch.setattr(checkpoints, "load", lambda *a, **k: pytest.fail("the checkpoint was loaded before the output was checked"))
    with pytest.raises(Gpt2OnnxError) as e:
        export(ExportOptions("synthetic:tiny", fill(where), force=True))
    for n in needles:
        assert fill(n) in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "x"
    assert_one_line_error(run_cli("export", "synthetic:tiny", "-o", fill(where)), *map(fill, needles))


def test_make_clean_removes_only_untracked_build_outputs():
    """`make clean` once deleted the committed reports/: every path it removes must be untracked."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(["make", "-n", "-C", root, "clean"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    removed = [w for ln in r.stdout.splitlines() if ln.startswith("rm ") for w in ln.split()[1:] if not w.startswith("-")]
    assert "artifacts" in removed and "reports" not in removed
    tracked = subprocess.run(["git", "-C", root, "ls-files", "--", *removed], capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: cannot tell tracked files from build outputs")
    assert tracked.stdout == "", tracked.stdout


@pytest.fixture()
def damaged(tmp_path, tiny_artifact):
    def make(kind: str) -> str:
        d = tmp_path / kind
        shutil.copytree(tiny_artifact, d)
        model = d / "model.onnx"
        if kind == "bad-json":
            (d / "gpt2onnx.json").write_text("{not json")
        elif kind == "missing-model":
            model.unlink()
        elif kind == "truncated":
            data = model.read_bytes()
            model.write_bytes(data[: len(data) // 2])
        elif kind == "sha-mismatch":
            data = bytearray(model.read_bytes())
            data[-100] ^= 0xFF
            model.write_bytes(bytes(data))
        return str(d)
    return make


@pytest.mark.parametrize("kind, needle", [
    ("bad-json", "not valid JSON"),
    ("missing-model", "missing model.onnx"),
    ("truncated", "truncated"),
    ("sha-mismatch", "sha256"),
])
def test_damaged_artifact(damaged, kind, needle):
    assert_one_line_error(run_cli("generate", damaged(kind), "hello"), needle, "re-export")


@pytest.mark.parametrize("args, needles", [
    (["generate", "/nonexistent/art", "hi"], ["does not exist"]),
    (["generate", "{art}", "hi", "--provider", "tpu"], ["--provider: invalid choice: 'tpu'", "'auto', 'cpu', 'cuda'"]),
    (["generate", "{art}", "hi", "--provider", "cuda"], ["cuda is not available", "CPUExecutionProvider"]),
    (["generate", "{art}", "hi", "--threads", "0"], ["threads must be an integer from 1"]),  # --threads reaches the engine
    (["generate", "{art}", ""], ["prompt 0 is empty"]),
    (["generate", "{art}", "hi", ""], ["prompt 1 is empty"]),
    (["generate", "{art}", "word " * 300], ["longer than the 128-position context", "--truncate"]),
    (["generate", "{art}", "hello there my friend", "--max-new-tokens", "127"], ["runs past the 128-position context"]),
    (["generate", "{art}", "hi", "--max-new-tokens", "500"], ["leaves no room"]),
    # the runtime's messages name the flags, not the Python options behind them
    (["generate", "{art}", "hi", "--max-new-tokens", "0"], ["--max-new-tokens must be >= 1"]),
    (["generate", "{art}", "hi", "--num-beams", "2", "--sample"], ["drop --sample or set --num-beams=1"]),
    (["generate", "{art}", "hello there my friend", "--max-new-tokens", "126"], ["lower --max-new-tokens, or pass --truncate to"]),
    (["serve", "{art}", "--max-batch", "0"], ["--max-batch must be from 1"]),
    (["generate", "{art}", "hi", "--frobnicate"], ["unrecognized arguments: --frobnicate", "see `gpt2onnx generate --help`"]),
    (["chat", "{art}", "--truncate"], ["unrecognized arguments: --truncate", "see `gpt2onnx chat --help`"]),  # chat fits itself
    (["generate", "{art}", "--ids", "1,2,99999"], ["outside the vocabulary"]),
    (["generate", "{art}", "--ids", "1,x"], ["comma-separated"]),
    (["generate", "{art}"], ["either prompt text or --ids"]),
    (["info", "/nonexistent/art"], ["does not exist"]),
    (["export", "synthetic:huge", "-o", "/tmp/never"], ["unknown synthetic model"]),
    (["export", "synthetic:tiny", "-o", "/tmp/never", "--precision", "fp8"], ["invalid choice: 'fp8'", "'int4'", "gpt2onnx export --help"]),
    (["export", "synthetic:tiny", "-o", "/tmp/never", "--kv-dtype", "bf16"], ["invalid choice: 'bf16'", "'float16'"]),
    (["export", "synthetic:tiny", "-o", "/tmp/never", "--provider", "auto"], ["invalid choice: 'auto'", "'cpu', 'cuda'"]),
    (["export", "synthetic:tiny"], ["required: -o/--output"]),
    (["export", "synthetic:tiny", "-o", "/tmp/never", "--precision", "int8", "--provider", "cuda"], ["int8 artifacts run on the cpu provider only"]),
    (["export", "synthetic:tiny", "-o", "/tmp/never", "--precision", "fp16", "--kv-dtype", "int8"], ["int8 KV cache is for the CPU precisions"]),
    (["export", "synthetic:tiny", "-o", "/tmp/never", "--no-fuse", "--kv-dtype", "int8"], ["--kv-dtype needs the fused graph"]),
    (["export", "/nonexistent/checkpoint-dir-xyz", "-o", "/tmp/never"], ["no such local directory"]),
])
def test_bad_input(tiny_artifact, args, needles):
    r = run_cli(*[a.replace("{art}", tiny_artifact) for a in args])
    assert_one_line_error(r, *needles)
    assert not os.path.exists("/tmp/never")


def test_defaults_and_choices_come_from_the_option_objects():
    """One source of defaults: what the CLI passes when a flag is not given is the option object's own."""
    from gpt2onnx import cli
    from gpt2onnx.export.convert import KV_DTYPES, ExportOptions
    from gpt2onnx.runtime.artifact import PRECISIONS
    from gpt2onnx.runtime.sampling import GenerationConfig
    from gpt2onnx.runtime.session import PROVIDERS, SessionConfig

    parser = cli.build_parser()
    a, d = parser.parse_args(["export", "m", "-o", "x"]), ExportOptions("m", "x")
    assert (a.precision, a.target_provider, a.seed, a.kv_dtype, a.no_fuse) == (d.precision, d.provider, d.seed, d.kv_dtype, not d.fuse)
    for cmd in ("generate", "chat"):
        a, d = parser.parse_args([cmd, "art"]), SessionConfig()
        assert (a.provider, a.threads) == (d.provider, d.threads)
        assert cli._generation_config(a) == GenerationConfig()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    choices = lambda cmd, flag: list(next(a for a in subs[cmd]._actions if flag in a.option_strings).choices)  # noqa: E731
    assert choices("export", "--precision") == list(PRECISIONS) and choices("export", "--kv-dtype") == list(KV_DTYPES)
    assert choices("export", "--provider") == list(PROVIDERS)
    assert choices("generate", "--provider") == choices("chat", "--provider") == [SessionConfig().provider, *PROVIDERS]
    for p in PRECISIONS:
        assert parser.parse_args(["export", "m", "-o", "x", "--precision", p]).precision == p


def test_truncate_flag(tiny_artifact, engine):
    r = run_cli("generate", tiny_artifact, "word " * 300, "--truncate", "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    ids = json.loads(r.stdout)["ids"]
    assert ids == engine.generate([engine.encode("word " * 300)], max_new_tokens=4, truncate=True) and len(ids[0]) == 4


def test_non_utf8_input(tiny_artifact):
    import subprocess
    import sys

    # argv that is not UTF-8 (Python maps the bad byte to a surrogate)
    r = subprocess.run([sys.executable.encode(), b"-m", b"gpt2onnx.cli", b"generate", tiny_artifact.encode(), b"caf\xe9"],
                       capture_output=True)
    assert_one_line_error(r, "not valid UTF-8")
    # and in the chat loop, where one bad line does not end the session
    r = run_cli("chat", tiny_artifact, "--max-new-tokens", "3", input=b"caf\xe9\nhello\n")
    assert r.returncode == 0
    assert b"not valid UTF-8" in r.stderr and r.stdout.strip()


def test_mismatched_model_and_manifest(tmp_path, tiny_artifact):
    """A manifest whose hashes match but whose graph is another artifact's (hand-edited) is refused."""
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_artifact, mixed)
    manifest = json.loads((mixed / "gpt2onnx.json").read_text())
    manifest["io"]["inputs"]["extra_input"] = "int64"
    (mixed / "gpt2onnx.json").write_text(json.dumps(manifest))
    assert_one_line_error(run_cli("generate", str(mixed), "hi"), "does not match its manifest", "re-export")


@pytest.mark.parametrize("argv, extra, module", [
    (["export", "synthetic:tiny", "-o", "{tmp}/x"], "export", "torch"),
    (["serve", "{art}"], "serve", "fastapi"),
    (["bench", "{art}", "--out", "{tmp}/r"], "bench", "rich"),
])
def test_missing_extra_is_named_in_one_line(tiny_artifact, tmp_path, argv, extra, module):
    """As in a `pip install .` venv: the command names the extra to install, nothing is written."""
    argv = [a.format(tmp=tmp_path, art=tiny_artifact) for a in argv]
    code = f"import sys; sys.modules[{module!r}] = None; from gpt2onnx.cli import main; sys.exit(main({argv!r}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"gpt2onnx: error: `gpt2onnx {extra}` needs {module}; install it with `pip install 'gpt2onnx[{extra}]'`"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra", [["--precision", "int8"], ["--precision", "int8", "--int8-method", "nbits"],
                                   ["--precision", "int4"]])
def test_quantized_export_says_only_its_own_lines(tmp_path, extra):
    """onnxruntime's MatMulNBits quantizer module sets the root logger to INFO on import; imported before
    quantize_dynamic ran, the int8 export printed two INFO lines per MatMul (~100 for DialoGPT-small)."""
    r = run_cli("export", "synthetic:tiny", "-o", str(tmp_path / "art"), *extra)
    assert r.returncode == 0, r.stderr
    lines = (r.stdout + r.stderr).splitlines()
    ours = ("loading synthetic:tiny", "building the fused float32 graph", "quantizing to", "checking parity", "wrote ")
    assert [line for line in lines if not line.startswith(ours)] == [] and len(lines) == 5, lines


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_export_stopped_by_a_signal_leaves_nothing(tmp_path, sig):
    """Ctrl-C, a service manager's SIGTERM or a closed terminal's SIGHUP while the artifact is being
    written: exit 130, no half-written (hidden) directory beside the output."""
    out = tmp_path / "art"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # a shell's background job (make test &, CI runners) starts with SIGINT ignored, which the child would inherit
    p = subprocess.Popen([sys.executable, "-m", "gpt2onnx.cli", "export", "synthetic:tiny", "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not any(n.startswith(".art.tmp-") for n in os.listdir(tmp_path)) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, "the export ended before it was signalled"
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


@pytest.mark.parametrize("module", ["numpy", "gpt2onnx.runtime.scheduler", "gpt2onnx.benchmarks.settings", "onnxruntime"])
def test_ctrl_c_while_the_command_starts_is_one_line(tiny_artifact, tmp_path, module):
    """A Ctrl-C in the first ~0.3 s of any command lands while the CLI's modules load or its parser is built
    (benchmarks.settings), before the command's own handling: made deterministic by raising KeyboardInterrupt
    at one import as the `gpt2onnx` script's entry point (read from the installed metadata, not named here) is
    called. One line, exit 130."""
    code = f"""if True:
        import sys, importlib.abc, importlib.metadata
        class Stop(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == {module!r}:
                    raise KeyboardInterrupt
        sys.meta_path.insert(0, Stop())
        (script,) = importlib.metadata.entry_points(group="console_scripts", name="gpt2onnx")
        sys.exit(script.load()(["generate", {tiny_artifact!r}, "hi", "--max-new-tokens", "2"]))
    """
    # run from an empty directory: the checkout's own (ignored) gpt2onnx.egg-info, left by a `pip install .`,
    # would be found before the venv's metadata
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert (r.returncode, r.stderr) == (130, "gpt2onnx: interrupted\n")


@pytest.mark.parametrize("job", ["export fp32", "export int4", "train"])
def test_no_extension_is_imported_once_a_half_written_directory_exists(tmp_path, job):
    """The test above, made deterministic: a signal inside a compiled module's import can abort the process
    (onnx's nanobind import runs Python; std::terminate, exit -6, past the clean-up), so every extension an
    export (or the reference model's first training, into its cache) needs is imported before its
    temporary directory is made."""
    out = str(tmp_path / "art")
    run = (f"assert main(['export', 'synthetic:tiny', '-o', {out!r}, '--precision', {job.split()[-1]!r}]) == 0" if job != "train"
           else "from gpt2onnx.export import train; train._fit = lambda *a: ([1.0], [1.0]); "  # every import, no steps
                f"train.trained('chat-tiny', {out!r}, log=lambda m: None)")
    code = f"""if True:
        import sys, tempfile
        from gpt2onnx.cli import main
        made, orig = {{}}, tempfile.mkdtemp
        def mkdtemp(*a, **k):
            if ".tmp-" in k.get("prefix", "") and not made:
                made.update(dict.fromkeys(sys.modules))
            return orig(*a, **k)
        tempfile.mkdtemp = mkdtemp
        {run}
        assert made, "no half-written directory was made by tempfile.mkdtemp"
        print(sorted(m for m in sys.modules if m not in made and (getattr(sys.modules[m], "__file__", None) or "").endswith(".so")))
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


@pytest.mark.parametrize("args, needles", [
    (["generate", "{art}", "hi", "--temperature", "0.5"], ["--temperature only applies with --sample"]),
    (["generate", "{art}", "hi", "--seed", "3"], ["--seed only applies with --sample"]),
    (["generate", "{art}", "hi", "--length-penalty", "2"], ["--length-penalty only applies with --num-beams"]),
    (["export", "synthetic:tiny", "-o", "{tmp}/x", "--int4-block-size", "32"], ["--int4-block-size only applies with --precision int4"]),
    (["export", "synthetic:tiny", "-o", "{tmp}/x", "--precision", "int8", "--int4-head-bits", "8"],
     ["--int4-head-bits only applies with --precision int4"]),
    (["export", "synthetic:tiny", "-o", "{tmp}/x", "--precision", "int4", "--int8-method", "nbits"], ["--int8-method only applies"]),
    (["export", "synthetic:tiny", "-o", "{tmp}/x", "--keep-float", "lm_head"], ["--keep-float only applies with --precision int8 or int4"]),
    (["serve", "{art}", "--replicas", "2"], ["--replicas only applies with --ray"]),
    (["export", "synthetic:tiny", "-o", "{tmp}/x", "--precision", "int4", "--int4-block-size", "0"], ["one of 16, 32, 64, 128, 256", "got 0"]),
    (["export", "synthetic:tiny", "-o", "{tmp}/x", "--precision", "int4", "--int4-block-size", "512"], ["one of 16, 32, 64, 128, 256", "got 512"]),
    (["export", "synthetic:tiny", "-o", "{tmp}/x", "--seed", "99999999999999999999999"], ["--seed (synthetic weights) must be an integer from 0"]),
    (["export", "synthetic:tiny", "-o", "{tmp}/x", "--seed", "-1"], ["--seed (synthetic weights) must be an integer from 0", "got -1"]),
    (["export", "synthetic:tiny", "-o", "{tmp}/x", "--precision", "int4", "--int4-accuracy-level", "9"], ["accuracy level", "got 9"]),
])
def test_flags_that_would_be_ignored_are_refused(tmp_path, tiny_artifact, args, needles):
    assert_one_line_error(run_cli(*[a.format(art=tiny_artifact, tmp=tmp_path) for a in args]), *needles)
    assert not (tmp_path / "x").exists()


def test_export_to_a_long_name(tmp_path):
    """A name near the 255-byte limit is exported (its temporary directory's name is shortened: the name
    plus ".tmp-XXXXXXXX" failed as 'internal error: OSError: File name too long'); one past it is refused first."""
    r = run_cli("export", "synthetic:tiny", "-o", str(tmp_path / ("y" * 250)))
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == ["y" * 250] and (tmp_path / ("y" * 250) / "gpt2onnx.json").is_file()
    assert_one_line_error(run_cli("export", "synthetic:tiny", "-o", str(tmp_path / ("z" * 256))), "longer than the 255 bytes")
    assert os.listdir(tmp_path) == ["y" * 250]
