"""Artifact trust: every file the runtime opens is listed in the manifest, inside the directory, and checked.

Each test tampers with a copy of the session's tiny artifact (never the fixture itself) and, where it
can, re-hashes the manifest so that the one property under test is the only thing wrong; a control
beside each refusal shows the same copy loads when that property is right.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from gpt2onnx.runtime import Engine, Gpt2OnnxError
from gpt2onnx.runtime.artifact import MANIFEST_NAME, load_manifest

from .conftest import QUIET, assert_one_line_error, run_cli


@pytest.fixture()
def art(tmp_path, tiny_artifact):
    """A private copy of the tiny artifact."""
    d = tmp_path / "art"
    shutil.copytree(tiny_artifact, d)
    return d


def read_manifest(d) -> dict:
    return json.loads((d / MANIFEST_NAME).read_text())


def write_manifest(d, m: dict) -> None:
    (d / MANIFEST_NAME).write_text(json.dumps(m, indent=2))


def entry(path) -> dict:
    data = open(path, "rb").read()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def list_file(d, name: str, path=None) -> None:
    """Add `name` to the manifest with the size and hash of `path` (default: the file of that name in `d`)."""
    m = read_manifest(d)
    m["files"][name] = entry(path if path is not None else d / name)
    write_manifest(d, m)


def refused(d, *needles: str, verify: str = "sha256") -> str:
    with pytest.raises(Gpt2OnnxError) as e:
        load_manifest(str(d), verify=verify)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_untampered_copy_loads(art):
    for verify in ("sha256", "size"):
        m = load_manifest(str(art), verify=verify)
        assert {"model.onnx", "tokenizer.json"} <= set(m.raw["files"])
    assert m.file("tokenizer.json") == os.path.join(str(art), "tokenizer.json")


@pytest.mark.parametrize("verify", ["none", "", "SHA256", None, "md5"])
def test_verify_modes_other_than_sha256_and_size_are_refused(art, verify):
    msg = refused(art, "'sha256'", "'size'", verify=verify)
    assert repr(verify) in msg


@pytest.mark.parametrize("path, needle", [(None, "got NoneType"), (5, "got int"), (["a"], "got list")])
def test_an_artifact_path_that_is_no_path_is_one_line(path, needle):
    """Engine.load(None) was a TypeError out of os.path; Engine.load(5) said '5 is a file' (os.path took the
    int for a file descriptor)."""
    with pytest.raises(Gpt2OnnxError, match=f"the artifact path must be a string or path, {needle}"):
        Engine.load(path)


def test_a_pathlib_path_loads(art):
    import pathlib

    assert Engine.load(pathlib.Path(art), provider="cpu").n_positions > 0


def test_engine_load_refuses_verify_none(art):
    from gpt2onnx.runtime import Engine

    with pytest.raises(Gpt2OnnxError, match="'sha256' or 'size'"):
        Engine.load(str(art), provider="cpu", verify="none")


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.json"])
def test_manifest_must_list_what_the_runtime_opens(art, name):
    m = read_manifest(art)
    del m["files"][name]
    write_manifest(art, m)
    refused(art, f"does not list {name}", "re-export", verify="size")


def test_manifest_file_refuses_unlisted_names(art):
    m = load_manifest(str(art))
    with pytest.raises(Gpt2OnnxError, match="does not list vocab.json"):
        m.file("vocab.json")


@pytest.mark.parametrize("make_name, needle", [
    (lambda d: "../outside.json", "'..'"),
    (lambda d: "sub/../../outside.json", "'..'"),
    (lambda d: "..", "'..'"),
    (lambda d: str(d.parent / "outside.json"), "absolute path"),
    (lambda d: "sub/tokenizer.json", "path separator"),
    (lambda d: "sub\\tokenizer.json", "path separator"),
    (lambda d: "", "not a file name"),
    (lambda d: MANIFEST_NAME, "cannot list itself"),
])
def test_names_outside_the_directory_are_refused(art, make_name, needle):
    # the file really exists where the name points and its size and hash match: only the name is wrong
    outside = art.parent / "outside.json"
    shutil.copy(art / "tokenizer.json", outside)
    (art / "sub").mkdir()
    shutil.copy(art / "tokenizer.json", art / "sub" / "tokenizer.json")
    list_file(art, make_name(art), outside)
    refused(art, needle, "re-export", verify="size")


def test_symlink_outside_the_directory_is_refused(art):
    outside = art.parent / "elsewhere-tokenizer.json"
    os.replace(art / "tokenizer.json", outside)
    os.symlink(outside, art / "tokenizer.json")  # same bytes, same hash: only the link is wrong
    refused(art, "tokenizer.json", "outside the artifact directory")
    # a relative link that climbs out is the same thing
    os.unlink(art / "tokenizer.json")
    os.symlink(os.path.join("..", outside.name), art / "tokenizer.json")
    refused(art, "outside the artifact directory", verify="size")


def test_symlink_inside_the_directory_is_accepted(art):
    os.replace(art / "tokenizer.json", art / "tokenizer.real.json")
    os.symlink("tokenizer.real.json", art / "tokenizer.json")
    load_manifest(str(art))


def test_manifest_symlinked_from_outside_is_refused(art):
    outside = art.parent / "manifest.json"
    os.replace(art / MANIFEST_NAME, outside)
    os.symlink(outside, art / MANIFEST_NAME)
    refused(art, MANIFEST_NAME, "outside the artifact directory")


def test_stray_unlisted_external_data_is_refused(art):
    (art / "weights.data").write_bytes(b"\0" * 4096)
    refused(art, "weights.data", "does not list", verify="size")
    list_file(art, "weights.data")  # listed (and so checked), it is accepted
    load_manifest(str(art))


def test_other_unlisted_files_are_ignored(art):
    (art / "README.txt").write_text("notes")
    load_manifest(str(art))


def _externalize(art, location: str) -> None:
    """Rewrite model.onnx so its initializers live in the external file `location` (relative to art)."""
    import onnx

    model = onnx.load(str(art / "model.onnx"))
    tmp = art / "model-ext.onnx"
    onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=1024)
    if location != "weights.bin":
        model = onnx.load(str(tmp), load_external_data=False)
        for t in model.graph.initializer:
            for kv in t.external_data:
                if kv.key == "location":
                    kv.value = location
        tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, art / "model.onnx")
    list_file(art, "model.onnx")


def test_external_data_referenced_by_the_model_must_be_listed(art, engine):
    _externalize(art, "weights.bin")
    assert (art / "weights.bin").stat().st_size > 0
    # not *.data and not model.onnx*: only reading model.onnx finds it
    refused(art, "reads weights from 'weights.bin'", "does not list", verify="size")
    list_file(art, "weights.bin")
    load_manifest(str(art))
    from gpt2onnx.runtime import Engine  # and the listed artifact runs

    assert Engine.load(str(art), provider="cpu").generate([[1, 2, 3]], max_new_tokens=2) == engine.generate([[1, 2, 3]], max_new_tokens=2)


@pytest.mark.parametrize("location", ["../weights.bin", "/tmp/weights.bin", "sub/weights.bin"])
def test_external_data_outside_the_directory_is_refused(art, location):
    _externalize(art, location)
    list_file(art, "weights.bin")  # listing a same-named file inside does not help
    refused(art, f"reads weights from {location!r}", verify="size")


def test_export_lists_its_external_data_page_aligned(tmp_path, engine):
    """The weights go to model.onnx.data, each large tensor on a 4096-byte boundary (so onnxruntime
    maps them instead of copying), and the manifest lists the file."""
    import onnx

    from gpt2onnx.export import convert
    from gpt2onnx.runtime import Engine

    out = convert.export(convert.ExportOptions("synthetic:tiny", str(tmp_path / "big")), log=QUIET)
    assert set(load_manifest(out).raw["files"]) == {"model.onnx", "model.onnx.data", "tokenizer.json", "pick.onnx"}
    m = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
    ext = [{e.key: e.value for e in t.external_data} for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(ext) >= 4 * 2 + 2  # every layer's matrices and the embeddings, at least
    assert all(int(e["offset"]) % 4096 == 0 for e in ext)
    assert os.path.getsize(os.path.join(out, "model.onnx")) < 100_000  # the graph alone
    assert Engine.load(out, provider="cpu").generate([[1, 2, 3]], max_new_tokens=2) == engine.generate([[1, 2, 3]], max_new_tokens=2)


def test_unparsable_model_is_refused_under_size(art):
    (art / "model.onnx").write_bytes(b"\x0a\xff\xff\xff")  # a length that runs past the file
    list_file(art, "model.onnx")
    refused(art, "not a readable ONNX file", "re-export", verify="size")


def test_tokenizer_larger_than_the_vocabulary_is_refused(art):
    """A tokenizer.json swapped for another model's (its hash listed again) would hand the model ids its
    embedding has no row for: the load says so in one line instead of failing inside a step."""
    from tokenizers import Tokenizer

    Engine.load(str(art), provider="cpu")
    tok = Tokenizer.from_file(str(art / "tokenizer.json"))
    n = read_manifest(art)["config"]["vocab_size"]
    assert tok.get_vocab_size(with_added_tokens=True) == n
    tok.add_tokens(["<|extra|>"])
    tok.save(str(art / "tokenizer.json"))
    list_file(art, "tokenizer.json")
    with pytest.raises(Gpt2OnnxError, match=f"tokenizer.json has more tokens than the model's vocabulary of {n} ") as e:
        Engine.load(str(art), provider="cpu")
    assert "\n" not in str(e.value)


def test_modified_tokenizer_byte(art):
    data = bytearray((art / "tokenizer.json").read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, different content
    (art / "tokenizer.json").write_bytes(bytes(data))
    refused(art, "tokenizer.json", "sha256")
    load_manifest(str(art), verify="size")  # sizes only: a same-size change passes, as documented
    (art / "tokenizer.json").write_bytes(bytes(data) + b" ")
    refused(art, "tokenizer.json", "bytes", verify="size")


@pytest.mark.parametrize("meta", [
    "not an object",
    None,
    {"bytes": "123", "sha256": "0" * 64},
    {"bytes": True, "sha256": "0" * 64},
    {"bytes": 1.0, "sha256": "0" * 64},
    {"bytes": -1, "sha256": "0" * 64},
    {"sha256": "0" * 64},
    {"bytes": 1},
    {"bytes": 1, "sha256": "0" * 63},
    {"bytes": 1, "sha256": "g" * 64},
    {"bytes": 1, "sha256": 7},
])
def test_malformed_entries_are_refused(art, meta):
    m = read_manifest(art)
    m["files"]["tokenizer.json"] = meta
    write_manifest(art, m)
    refused(art, "malformed entry for tokenizer.json", verify="size")


@pytest.mark.parametrize("tamper, needles", [
    (lambda m: {**m, "format_version": m["format_version"] - 1}, ["format version", "re-export"]),
    (lambda m: {k: v for k, v in m.items() if k != "io"}, ["lacks io", "re-export"]),
    (lambda m: {**m, "config": {k: v for k, v in m["config"].items() if k != "n_positions"}}, ["config lacks n_positions", "re-export"]),
    (lambda m: {**m, "precision": "fp8"}, ["unknown precision 'fp8'", "re-export"]),
    (lambda m: [m], ["is not a JSON object", "re-export"]),
], ids=["format_version", "io", "config", "precision", "not-an-object"])
def test_manifest_fields_are_checked(art, tamper, needles):
    """Each field the runtime relies on, wrong alone (nothing else in the copy is touched)."""
    write_manifest(art, tamper(read_manifest(art)))
    refused(art, *needles, verify="size")
    assert_one_line_error(run_cli("info", str(art)), *needles)


def _edit(section: str | None, key: str, value):
    def tamper(m):
        (m[section] if section else m)[key] = value
        return m
    return tamper


@pytest.mark.parametrize("tamper, needles", [
    (_edit("config", "vocab_size", "x"), ["config.vocab_size is 'x', not a positive integer"]),
    (_edit("config", "eos_token_id", None), ["config.eos_token_id is None"]),
    (_edit("config", "n_head", 5), ["n_embd 64 is not a multiple of n_head 5"]),
    (_edit("config", "vocab_size", 1000), ["eos_token_id 50256 is outside the vocabulary"]),
    (_edit(None, "source", None), ["source is not an object"]),
    (_edit(None, "io", {}), ["io lacks its inputs, outputs or kv"]),
    (_edit(None, "format_version", "4"), ["format version '4'"]),
], ids=["type", "null", "n_head", "vocab", "source", "io", "version-string"])
def test_edited_manifest_values_are_refused_at_load(art, tamper, needles):
    """The manifest is not hashed: a hand edit of what the runtime computes with is one line, for info
    too, never an internal error inside onnxruntime."""
    write_manifest(art, tamper(read_manifest(art)))
    refused(art, *needles, verify="size")
    assert_one_line_error(run_cli("info", str(art)), *needles)


@pytest.mark.parametrize("tamper, needles", [
    (_edit("config", "n_layer", 3), ["built with n_layer 2 (manifest 3)"]),
    (_edit("config", "n_positions", 4096), ["built with n_positions 128 (manifest 4096)"]),
    (_edit("config", "n_embd", 128), ["built with n_embd 64 (manifest 128)"]),
], ids=["n_layer", "n_positions", "n_embd"])
def test_manifest_dims_must_be_the_graphs(art, tamper, needles):
    """Well-typed but not what the graph was built with (model.onnx carries its dims): refused at load."""
    from gpt2onnx.runtime import Engine

    write_manifest(art, tamper(read_manifest(art)))
    load_manifest(str(art), verify="size")  # the manifest alone is well-formed
    with pytest.raises(Gpt2OnnxError, match="the manifest was edited") as e:
        Engine.load(str(art), provider="cpu", verify="size")
    assert all(n in str(e.value) for n in needles), str(e.value)
    assert_one_line_error(run_cli("generate", str(art), "--ids", "1,2", "--max-new-tokens", "2"), *needles)


def test_kv_dtype_must_be_the_graphs(art):
    from gpt2onnx.runtime import Engine

    write_manifest(art, _edit("io", "kv", {**read_manifest(art)["io"]["kv"], "dtype": "int8"})(read_manifest(art)))
    with pytest.raises(Gpt2OnnxError, match=r"should be tensor\(int8\).*the graph has tensor\(float\)"):
        Engine.load(str(art), provider="cpu", verify="size")


def test_missing_artifact_directory_and_manifest(tmp_path):
    refused(tmp_path / "none", "does not exist", "gpt2onnx export")
    refused(tmp_path, "has no gpt2onnx.json", "not a gpt2onnx artifact")
    (tmp_path / "model.onnx").write_text("x")
    refused(tmp_path / "model.onnx", "is a file; pass the artifact directory")


def test_files_must_be_an_object(art):
    m = read_manifest(art)
    m["files"] = list(m["files"])
    write_manifest(art, m)
    refused(art, "`files` is not an object", verify="size")


def test_cli_refuses_a_tampered_artifact_in_one_line(art):
    m = read_manifest(art)
    del m["files"]["model.onnx"]
    write_manifest(art, m)
    assert_one_line_error(run_cli("info", str(art)), "does not list model.onnx")
    assert_one_line_error(run_cli("generate", str(art), "hello", "--provider", "cpu"), "does not list model.onnx")


def test_cli_refuses_a_symlink_outside_in_one_line(art):
    outside = art.parent / "elsewhere-tokenizer.json"
    os.replace(art / "tokenizer.json", outside)
    os.symlink(outside, art / "tokenizer.json")
    for args in (["info", str(art)], ["generate", str(art), "hello", "--provider", "cpu"]):
        assert_one_line_error(run_cli(*args), "outside the artifact directory")


def test_the_pick_graph_is_checked_like_every_file(art):
    """pick.onnx is listed and hashed (a changed byte is refused on load, as for model.onnx), and a pick
    graph whose input or output is not the manifest's is refused when the engine opens it."""
    import onnx

    from gpt2onnx.runtime import Engine

    good = (art / "pick.onnx").read_bytes()
    data = bytearray(good)
    data[-1] ^= 0x01
    (art / "pick.onnx").write_bytes(bytes(data))
    refused(art, "pick.onnx", "sha256")
    model = onnx.load_from_string(good)
    model.graph.output[0].name = model.graph.node[0].output[0] = "ids"
    (art / "pick.onnx").write_bytes(model.SerializeToString())
    list_file(art, "pick.onnx")
    Engine.load(str(art), provider="cpu")  # the cpu provider does not open it unless asked
    with pytest.raises(Gpt2OnnxError, match="pick.onnx in .* does not match its manifest .*re-export it"):
        Engine.load(str(art), provider="cpu", device_pick=True)


@pytest.mark.parametrize("field, value", [("parity", "x"), ("weights", "x"), ("quantization", 5), ("fused_ops", [1])])
def test_info_refuses_an_edited_descriptive_field_in_one_line(art, field, value):
    """`info` reads fields the runtime never computes with; edited to another type they were an internal error."""
    m = read_manifest(art)
    m[field] = value
    write_manifest(art, m)
    assert_one_line_error(run_cli("info", str(art)), "a descriptive field of gpt2onnx.json", "re-export")


def test_an_io_name_the_graph_lacks_is_refused_at_load(art):
    """The decode core binds the names the manifest's io gives: one the graph lacks failed inside onnxruntime."""
    from gpt2onnx.runtime import Engine

    m = read_manifest(art)
    m["io"]["logits_to_keep"] = "zzz"
    write_manifest(art, m)
    with pytest.raises(Gpt2OnnxError, match="has no 'zzz', a name its manifest's io gives"):
        Engine.load(str(art))
