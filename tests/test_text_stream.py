"""Incremental detokenization with stop strings (runtime/request.py, TextStream) against the plain
definition: the text ends before the earliest-starting stop string generated, and a piece is shown
once no stop string can still start inside it. The stream reads each new character once per stop
string (KMP automata); it used to test every tail of every length each token (62 ms a token on the
scheduler's thread with 16 stop strings of 6,200 characters)."""

from __future__ import annotations

import random

from gpt2onnx.runtime.request import TextStream


def reference(pieces: list[str], stops: tuple[str, ...]) -> tuple[list[str], str, bool]:
    """What a reader sees after each token, by the definition, recomputed from the whole text each time."""
    text, sent, shown = "", 0, []
    for p in pieces:
        text += p
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            cut = min(hits)
            shown.append(text[sent:cut])
            return shown, text[:cut], True
        hold = max((n for s in stops for n in range(1, len(s)) if len(text) - n >= sent and text.endswith(s[:n])), default=0)
        shown.append(text[sent:len(text) - hold])
        sent = len(text) - hold
    shown.append(text[sent:])
    return shown, text, False


def test_pieces_and_cut_equal_the_definition():
    rng = random.Random(7)
    for _ in range(3000):
        pieces = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 16))]
        stops = tuple("".join(rng.choice("ab c") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3)))
        t = TextStream(lambda ids, p=pieces: "".join(p[i] for i in ids), stops)
        got = []
        for i in range(len(pieces)):
            got.append(t.push(i))
            if t.stopped:
                break
        if not t.stopped:
            got.append(t.finish())
        want, text, stopped = reference(pieces, stops)
        assert (got, t.text, t.stopped) == (want, text, stopped), (pieces, stops)


def test_a_long_stop_string_holds_back_only_what_could_begin_it():
    piece = " smörgåsbord"
    stops = (piece * 40 + "!", "x" * 500)
    t = TextStream(lambda ids: piece * len(ids), stops)
    shown = "".join(t.push(i) for i in range(60))
    assert not t.stopped and shown == (piece * 60)[: -40 * len(piece)]  # the last 40 pieces may still begin the first
    t = TextStream(lambda ids: "yz" * len(ids), stops)
    assert "".join(t.push(i) for i in range(60)) == "yz" * 60  # nothing of it can: shown at once
