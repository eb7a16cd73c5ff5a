"""What a program embedding the runtime relies on beyond the tokens: schedulers that end with the
program or with their last reference, a fork that does not leave a scheduler that never answers,
finished requests that keep only their output, and inputs of the wrong kind refused in one line."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import time
import weakref

import numpy as np
import pytest

from gpt2onnx.runtime import Gpt2OnnxError, Scheduler, SchedulerConfig


def test_a_scheduler_dropped_without_close_is_freed(engine):
    """Its loop's thread held it: the scheduler, its thread and its KV cache (289 MB a scheduler at
    DialoGPT-small's 16 x 1024 slots) stayed alive for the life of the process."""
    sched = Scheduler(engine, SchedulerConfig(max_batch=2))
    assert sched.submit([15496, 11], max_new_tokens=3).result(timeout=30).tokens
    ref, thread = weakref.ref(sched), sched.thread
    del sched
    deadline = time.time() + 10
    while (ref() is not None or thread.is_alive()) and time.time() < deadline:
        gc.collect()
        time.sleep(0.1)
    assert ref() is None and not thread.is_alive()


@pytest.mark.parametrize("end", ["return", "raise RuntimeError('the host failed')", "sys.exit(3)"])
def test_a_program_that_ends_while_its_scheduler_decodes_exits_with_its_own_status(tiny_artifact, end):
    """The loop's thread was still inside onnxruntime while the interpreter finalized: C++'s "terminate called
    without an active exception", SIGABRT (exit 134) instead of the program's own status."""
    script = textwrap.dedent(f"""
        import sys
        from gpt2onnx.runtime import Engine, Scheduler, SchedulerConfig
        def main():
            sched = Scheduler(Engine.load({tiny_artifact!r}, threads=1), SchedulerConfig(max_batch=4))
            handles = [sched.submit([15496, 11, i + 1], max_new_tokens=120, eos_token_id=-1) for i in range(4)]
            next(iter(handles[0]))  # decoding now
            {end}
        main()
    """)
    want = {"return": 0, "sys.exit(3)": 3}.get(end, 1)
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert r.returncode == want and "terminate called" not in r.stderr, (r.returncode, r.stderr[-500:])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
def test_a_forked_child_is_told_to_make_its_own_scheduler(engine):
    """The child's copy accepted requests that never ran (its loop's thread stayed in the parent): result()
    without a timeout waited forever. Its submit says so now; the child's own Scheduler works."""
    sched = Scheduler(engine, SchedulerConfig(max_batch=2))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        try:
            try:
                sched.submit([15496, 11], max_new_tokens=2)
                msg = "accepted"
            except Gpt2OnnxError as e:
                msg = str(e)
            with Scheduler(engine, SchedulerConfig(max_batch=1)) as own:
                msg += f"|{len(own.submit([15496, 11], max_new_tokens=2).result(timeout=30).tokens)}"
            os.write(write, msg.encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    msg = os.read(read, 1000).decode()
    os.close(read)
    assert status == 0 and msg.startswith("this scheduler was made in another process") and msg.endswith("|2"), msg
    assert sched.submit([15496, 11], max_new_tokens=2).result(timeout=30).tokens  # the parent's still works
    sched.close()


def test_a_finished_request_keeps_only_its_output(engine):
    """A kept Handle held its request's vocabulary-wide penalty arrays (252 KB each with presence and repetition
    penalties): a job table of 10,000 finished requests held 2.5 GB."""
    with Scheduler(engine, SchedulerConfig(max_batch=2)) as sched:
        h = sched.submit([15496, 11], max_new_tokens=4, presence_penalty=0.5, repetition_penalty=1.2, no_repeat_ngram_size=2)
        h.result(timeout=30)
        req = h.request
        assert req.seen is None and req.counts is None and req.row is None and len(req.tokens) == 4


def test_leaving_a_with_block_on_an_error_does_not_wait_for_every_request(engine):
    with pytest.raises(RuntimeError), Scheduler(engine, SchedulerConfig(max_batch=1)) as sched:
        handles = [sched.submit([15496, 11, i], max_new_tokens=100, eos_token_id=-1) for i in range(6)]
        raise RuntimeError("the host failed")
    assert all(h.result().finish_reason == "cancelled" or len(h.result().tokens) < 100 for h in handles[1:])


@pytest.mark.parametrize("prompts", [{"Hello": 1}, [{11, 40}], {(15496, 11)}])
def test_prompts_of_the_wrong_kind_are_refused(engine, prompts):
    """A dict generated from its keys' text, a set from its ids in hash order."""
    with pytest.raises(Gpt2OnnxError, match="list") as e:
        engine.generate(prompts, max_new_tokens=2)
    assert e.value.param == "prompt"


def test_options_of_the_wrong_kind_are_one_line_errors(engine):
    with pytest.raises(Gpt2OnnxError, match="cache"):
        engine.generate([[15496, 11]], max_new_tokens=2, cache="x")
    with pytest.raises(Gpt2OnnxError, match="SchedulerConfig"):
        Scheduler(engine, {"max_batch": 2})
    with Scheduler(engine, SchedulerConfig(max_batch=1)) as sched:
        h = sched.submit([15496, 11], max_new_tokens=2)
        with pytest.raises(Gpt2OnnxError, match="timeout"):
            h.result(timeout="1")
        h.result(timeout=30)


def test_the_decoder_api_refuses_ids_that_are_not_the_vocabulary(engine):
    """engine.decoder(...).decode took 13.9 as 13, -5 as a row of the table's end, 50257 as an onnxruntime
    error with a red log line; prefill took bytes as ids."""
    dec = engine.decoder(1, 32)
    with pytest.raises(Gpt2OnnxError):
        dec.prefill(0, [b"Hi"])
    logits = dec.prefill(0, [[15496, 11]])
    for bad in (np.array([13.9]), np.array([-5]), np.array([engine.vocab_size])):
        with pytest.raises(Gpt2OnnxError, match="token"):
            dec.decode(bad)
    assert dec.decode(np.array([int(logits.argmax(-1)[0])])).shape[-1] == engine.vocab_size


def test_an_engine_pickles_as_its_load_and_a_scheduler_says_what_to_pass(engine):
    """multiprocessing's spawn pickles its arguments: an Engine was "cannot pickle InferenceSession"."""
    import pickle

    again = pickle.loads(pickle.dumps(engine))
    assert again is not engine and again.manifest.path == engine.manifest.path
    assert again.generate([[15496, 11]], max_new_tokens=4) == engine.generate([[15496, 11]], max_new_tokens=4)
    with Scheduler(engine, SchedulerConfig(max_batch=1)) as sched, pytest.raises(TypeError, match="pass the Engine"):
        pickle.dumps(sched)
