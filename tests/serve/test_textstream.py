"""Incremental detokenization: deltas join to the full text, UTF-8 characters split across tokens and stop
strings split across tokens are handled (the fixture's byte-level BPE tokenizer)."""

from __future__ import annotations

import pytest

from haipai_lightning.io.loader import load_model
from haipai_lightning.serve.textstream import TextStream
from serve_helpers import CKPT


@pytest.fixture(scope="module")
def tok():
    return load_model(str(CKPT))[1]


def feed(ts: TextStream, ids: list[int]) -> list[str]:
    out = [ts.push([i]) for i in ids]
    return out + [ts.finish()]


def test_deltas_join_to_the_decoded_text(tok):
    ids = tok.encode("In the beginning God created 中文 and é.").ids
    deltas = feed(TextStream(tok), ids)
    assert "".join(deltas) == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)  # a split character is held until it is whole


def test_a_character_split_over_tokens_comes_out_whole(tok):
    ids = tok.encode("中").ids
    assert len(ids) == 3
    assert feed(TextStream(tok), ids) == ["", "", "中", ""]


def test_stop_string_across_tokens_ends_the_text_before_it(tok):
    ts = TextStream(tok, stop=("cde",))
    deltas = [ts.push([i]) for i in tok.encode("abcdefgh").ids]
    assert "".join(deltas) == "ab" and ts.stopped
    assert deltas[:3] == ["a", "b", ""]  # "c" may start the stop string: held back
    assert ts.push(tok.encode("zz").ids) == "" and ts.finish() == ""


def test_held_prefix_is_released_when_it_does_not_become_a_stop(tok):
    ts = TextStream(tok, stop=("xyz", "q"))
    assert [ts.push([i]) for i in tok.encode("axy").ids] == ["a", "", ""]
    assert ts.push(tok.encode("w").ids) == "xyw" and not ts.stopped
    assert ts.push(tok.encode("q").ids) == "" and ts.stopped and ts.text == "axyw"


def test_end_of_text_is_no_text(tok):
    eos = tok.token_to_id("<|endoftext|>") or 0
    ts = TextStream(tok, eos_id=eos)
    assert ts.push(tok.encode("ab").ids + [eos]) == "ab" and ts.finish() == ""
