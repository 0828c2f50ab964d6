"""Parameter-sharing strategies: which unique layer runs at which depth.

The MoR paper (arXiv 2507.10524, section 2.1) names four strategies for an
effective depth of L layers and Nr recursions:

    cycle            the block of L/Nr layers is reused Nr times:   0 1 | 0 1 | 0 1
    sequence         each of L/Nr layers is repeated Nr times:      0 0 0 | 1 1 1
    middle_cycle     first and last layers unique, the middle cycled  (the paper's best)
    middle_sequence  first and last layers unique, the middle in sequence

A `Schedule` lists the unique layers of the prelude, the shared block and the
coda, and the execution order as (unique layer id, recursion step) pairs. The
recursion step of a prelude/coda layer is None. Routers act on *steps*: at step
r the shared block runs once on the tokens that are still active.
"""

from __future__ import annotations

from dataclasses import dataclass

from haipai_lightning.config import ModelConfig


@dataclass(frozen=True)
class Schedule:
    prelude: tuple[int, ...]  # unique layer ids run once before the recursions
    shared: tuple[int, ...]  # unique layer ids of the shared block
    coda: tuple[int, ...]  # unique layer ids run once after the recursions
    n_recursions: int
    cycle: bool  # True: a step is one pass through the whole shared block

    @property
    def n_unique(self) -> int:
        return len(self.prelude) + len(self.shared) + len(self.coda)

    def order(self) -> list[tuple[int, int | None]]:
        """Execution order of every layer application: (unique id, recursion step or None)."""
        out: list[tuple[int, int | None]] = [(i, None) for i in self.prelude]
        if self.cycle:
            out += [(i, r) for r in range(self.n_recursions) for i in self.shared]
        else:
            out += [(i, r) for i in self.shared for r in range(self.n_recursions)]
        return out + [(i, None) for i in self.coda]

    def step_slices(self) -> list[tuple[int, int]]:
        """For cycle strategies: [start, end) into `order()` of each recursion step."""
        start = len(self.prelude)
        k = len(self.shared)
        return [(start + r * k, start + (r + 1) * k) for r in range(self.n_recursions)]


def make_schedule(cfg: ModelConfig) -> Schedule:
    L, nr = cfg.n_layers, cfg.n_recursions
    middle = cfg.sharing.startswith("middle") and nr > 1
    cycle = cfg.sharing.endswith("cycle")
    if middle:
        k = (L - 2) // nr
        return Schedule((0,), tuple(range(1, 1 + k)), (1 + k,), nr, cycle)
    return Schedule((), tuple(range(L // nr)), (), nr, cycle)
