"""Incremental detokenization with stop strings: token ids in, text deltas out.

A byte-level BPE token can hold part of a UTF-8 character, and a stop string can span tokens, so a
delta is never cut from one token alone. The whole completion is decoded again after every token (a
completion is at most the model's context long) and only the text that can no longer change is
released: text before an incomplete character (decoded as U+FFFD) and before a tail that could still
grow into a stop string is held back. This is the scheme of vLLM's detokenizer and stop checker
(vllm/engine/output_processor/stop_checker.py): the stop string itself is not returned, and
finish_reason is "stop".
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"  # what decoding an incomplete UTF-8 sequence yields


class TextStream:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = (), eos_id: int | None = None) -> None:
        self.tok, self.stop, self.eos_id = tokenizer, stop, eos_id
        self.ids: list[int] = []
        self.text = ""  # the completion so far, up to the stop string once one is found
        self.sent = 0  # characters of self.text already released
        self.stopped = False  # a stop string was found: the completion is over

    def push(self, tokens: list[int]) -> str:
        """Add generated tokens; returns the text that became final (possibly "")."""
        if self.stopped:
            return ""
        self.ids += [t for t in tokens if t != self.eos_id]  # end-of-text is no text
        self.text = self.tok.decode(self.ids)
        cut = self._find_stop()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held())

    def finish(self) -> str:
        """The generation ended: release everything (an incomplete character stays as U+FFFD)."""
        return self._release(len(self.text))

    def _find_stop(self) -> int | None:
        if not self.stop:
            return None
        longest = max(map(len, self.stop))
        start = max(0, self.sent - longest + 1)  # a new match must end in text not yet released
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held(self) -> int:
        """Characters at the end that may still change: an incomplete character, a possible stop prefix."""
        text = self.text
        held = 0
        while held < len(text) and text[len(text) - 1 - held] == REPLACEMENT:
            held += 1
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):  # longest tail that is a prefix of s
                if text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        delta, self.sent = self.text[self.sent:upto], upto
        return delta
