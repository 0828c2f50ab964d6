"""Token hooks: a callback that may force the next tokens of a sequence while it is being decoded.

A hook is any callable `hook(prompt, generated) -> tokens`: after every token appended to a
sequence (sampled or forced) it sees the prompt ids and the generated ids so far, and returns the
ids to force next (empty: keep sampling). Forced tokens go through the model like sampled ones
(they fill the KV cache; their own logits are ignored), so the continuation conditions on them.
The LMLM fact lookup (decode/lookup.py) is one: when the model writes `<|db_return|>` it forces
the store's value and `<|db_end|>`.

`generate` (decode/generate.py) takes `hook=`, the engine's `Request` has a `hook` field and
`haipai serve --lookup` sets it on every request; all three go through `Forcing` below.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Sequence

TokenHook = Callable[[Sequence[int], Sequence[int]], Sequence[int]]


class Forcing:
    """One sequence's queue of forced tokens: `take` picks the next token, `after` asks the hook."""

    def __init__(self, hook: TokenHook) -> None:
        self.hook, self.queue = hook, deque()

    def take(self, sampled: int) -> int:
        """The token to append: the next forced one, else the sampled one."""
        return self.queue.popleft() if self.queue else int(sampled)

    def after(self, prompt: Sequence[int], generated: Sequence[int]) -> None:
        """Called once the token is appended to `generated`; refills the queue when it is empty."""
        if not self.queue:
            self.queue.extend(int(t) for t in self.hook(prompt, generated))
