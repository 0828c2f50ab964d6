"""Continuous depth-wise batching for MoR decoding (MoR paper, section 2.3 and Figure 4a).

Because every recursion step applies the *same* shared block, tokens that sit at different
recursion depths -- of different sequences -- can run through the block together in one
batched call; each attends to its own sequence's cache of its own step. A token that the
router lets exit early goes straight to the coda and the head, and its sequence's next token
enters the recursion at once, so the batch stays full of useful work. Finished requests free
their slot for the next request in the queue (FIFO).

One engine tick:
    1. admit queued requests into free slots (one batched prefill per prompt length, filling the caches);
    2. new tokens run embedding + prelude, entering recursion step 0;
    3. every in-flight token runs ONE shared-block pass together, whatever its step; right after
       it, each token is routed for its next step (expert-choice: sigmoid threshold of that step's
       gate; token-choice: its depth);
    4. tokens that exited run coda + head, a token is sampled, the sequence continues next tick.
A token of recursion depth d thus costs d ticks.

Per-request compute budgets cap the mean recursion depth of the generated tokens. Mixture-of-Depths
layers run through their gates (`HaipaiModel._mod`, the causal 0.5 threshold), in the prelude / coda
and, in a vanilla Nr=1 model whose layers all form the "shared" block, in the block pass.
A request's `token_budget` (decode/token_budget.py) appends the budget token of a model trained with
length budgets to its prompt; the model then ends its continuation, at the end token, near that length.

A request can be cancelled from any thread (`Engine.cancel`, e.g. when an HTTP client of `haipai serve`
disconnects): the flag is read at the start of the next tick, which drops the request from the queue or
frees its slot for the next request.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from haipai_lightning.model.cache import KVView, LayerKV, RowView
from haipai_lightning.decode.hooks import Forcing, TokenHook
from haipai_lightning.decode.sampling import SamplingConfig, sample_next
from haipai_lightning.decode.token_budget import nearest_budget, token_budget_error
from haipai_lightning.model.mixers.attention import KVShare
from haipai_lightning.model.decoder import HaipaiModel

PRE, REC, POST, DONE = 0, 1, 2, 3


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    depth_budget: float | None = None  # cap on the mean recursion depth of generated tokens (1..Nr)
    eos_id: int | None = None
    output: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)  # recursion steps each generated token ran
    # "stop" (eos_id sampled), "length" (max_new_tokens reached) or "cancelled"; None while it runs
    # (the names of the OpenAI API's finish_reason, which haipai serve reports)
    finish_reason: str | None = None
    cancelled: bool = False  # set by Engine.cancel (any thread); the engine acts on it at its next tick
    # target length of the continuation (decode/token_budget.py): the prompt is followed by the budget token
    # of the trained budget nearest to it, and generation ends at eos_id (which it needs)
    token_budget: int | None = None
    hook: TokenHook | None = None  # may force the next tokens (decode/hooks.py), e.g. the LMLM fact lookup
    forcing: Forcing | None = field(default=None, repr=False)  # the hook's queue, made at the first emitted token


class _Apps:
    """model-cache-like object: application a -> its LayerKV seen through fixed cache rows."""

    def __init__(self, engine: "Engine", slots: torch.Tensor) -> None:
        self.engine, self.slots, self.seen = engine, slots, 0

    def __getitem__(self, a: int) -> RowView:
        e = self.engine
        layer_id, r = e.model.order[a]
        if r is None:
            return RowView(e.kv_unshared[a], self.slots)
        j = e.model.schedule.shared.index(layer_id)
        return RowView(e.kv_block[j], r * e.S + self.slots)


class Engine:
    """Batch generation with continuous depth-wise batching. Greedy outputs equal one-at-a-time generation."""

    def __init__(self, model: HaipaiModel, max_batch: int = 8, max_len: int | None = None,
                 budget_tokens: dict[int, int] | None = None, compress=None) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"Engine max_batch={max_batch!r} must be an integer >= 1: the number of request slots "
                             "decoded together (haipai generate --batch_size)")
        if not model.schedule.cycle:
            raise ValueError("Engine needs a cycle sharing strategy (cycle or middle_cycle)")
        for need in ("decode_start", "decode_continues", "decode_combine"):  # the router contract (routing/base.py)
            if not callable(getattr(model.router, need, None)):
                raise ValueError(f"Engine needs a router with {need}() (haipai_lightning.Router); "
                                 f"{type(model.router).__name__} has none")
        self.model = model.eval()
        self.budget_tokens = dict(budget_tokens or {})  # {budget length: token id} (token_budget.budget_tokens)
        self.S, self.L = max_batch, max_len or model.cfg.max_seq_len
        self.nr = model.schedule.n_recursions
        sch = model.schedule
        self.pre_apps = list(range(len(sch.prelude)))
        n_rec = len(sch.shared) * self.nr
        self.post_apps = list(range(len(sch.prelude) + n_rec, len(model.order)))
        # a KV-quantized model (kv8 / kv4: quant/kv_cache.py) gives its own layer caches, int8 / int4 codes
        new_kv = getattr(getattr(model, "kv_cache_factory", None), "layer", None) or LayerKV
        self.kv_unshared = {a: new_kv(self.L, rows=self.S) for a in self.pre_apps + self.post_apps}
        # one cache per layer of the shared block; row r * S + s = step r of slot s
        self.kv_block = [new_kv(self.L, rows=self.nr * self.S) for _ in sch.shared]
        # Mixture-of-Depths gates inside the shared block: a vanilla (Nr=1) model's layers are all
        # "shared" (block layer j = application len(prelude) + j); the block pass routes them through the gate
        self.block_gates: dict[int, int] = {}
        for j in range(len(sch.shared)):
            apps = [len(sch.prelude) + r * len(sch.shared) + j for r in range(self.nr)]
            gated = [a for a in apps if str(a) in model.mod_gates]
            if gated and self.nr > 1:  # HaipaiModel gates shared applications only when Nr=1
                raise ValueError(f"Engine: Mixture-of-Depths gates on recursion-step applications {gated}: only a "
                                 "vanilla Nr=1 model gates its shared layers")
            if gated:
                self.block_gates[j] = gated[0]
        self.queue: deque[Request] = deque()
        self.slot_req: list[Request | None] = [None] * self.S
        D = model.cfg.d_model
        dev = model.embed.weight.device
        self.stage = torch.full((self.S,), DONE, dtype=torch.long, device=dev)
        self.step = torch.zeros(self.S, dtype=torch.long, device=dev)  # next recursion step to run
        self.pos = torch.zeros(self.S, dtype=torch.long, device=dev)  # position of the in-flight token
        self.tok = torch.zeros(self.S, dtype=torch.long, device=dev)
        self.h = torch.zeros(self.S, 1, D, device=dev)
        self.rstate: torch.Tensor | None = None  # (S, m) the router's per-token decode state (router.decode_start)
        self.allowed = torch.full((self.S,), self.nr, dtype=torch.long, device=dev)
        self.generators: list[torch.Generator | None] = [None] * self.S
        # issue #21: a compress.config.CompressConfig compresses every prompt's prefill (compress/prefill.py)
        self.compress = compress
        self.stats = {"ticks": 0, "block_passes": 0, "block_tokens": 0, "tokens": 0, "cancelled": 0}

    # -------------------------------------------------------------- public API
    def submit(self, req: Request) -> Request:
        if len(req.prompt) == 0 or req.max_new_tokens < 1:
            raise ValueError("a request needs a non-empty prompt and max_new_tokens >= 1")
        if req.token_budget is not None:
            why = token_budget_error(req.token_budget, self.budget_tokens, req.max_new_tokens)
            if why is None and req.eos_id is None:
                why = "needs the request's eos_id: generation ends at the end token"
            if why:
                raise ValueError(f"Request token_budget={req.token_budget!r} {why}")
        if len(self._prompt(req)) + req.max_new_tokens > self.L:
            raise ValueError(f"prompt + max_new_tokens exceeds the engine's max_len={self.L}")
        self.queue.append(req)
        return req

    def _prompt(self, req: Request) -> list[int]:
        """The tokens prefilled for `req`: its prompt, then its budget token when it has a token budget."""
        if req.token_budget is None:
            return req.prompt
        return req.prompt + [self.budget_tokens[nearest_budget(self.budget_tokens, req.token_budget)]]

    def cancel(self, req: Request) -> None:
        """Stop `req` (queued or in flight) at the next tick and free its slot; safe from any thread.

        Only a flag is written here (one attribute store, atomic under the GIL); the engine's own thread
        removes the request in `_reap` at the start of its next tick, so no slot state is touched while a
        tick runs. Cancelling a finished request does nothing.
        """
        req.cancelled = True

    def active(self) -> int:
        """Requests holding a slot."""
        return sum(r is not None for r in self.slot_req)

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 64, **kw) -> list[list[int]]:
        reqs = [self.submit(Request(list(p), max_new_tokens, **kw)) for p in prompts]
        self.run()
        return [r.output for r in reqs]

    @torch.no_grad()
    def run(self) -> None:
        while self.queue or any(r is not None for r in self.slot_req):
            before = self._progress()
            self.tick()
            if self._progress() == before:  # nothing admitted, run or emitted: it would spin forever
                raise RuntimeError(f"Engine made no progress in a tick ({len(self.queue)} queued, slot stages "
                                   f"{self.stage.tolist()}, max_batch={self.S})")

    def _progress(self) -> tuple[int, int, int, int]:
        """(queued requests, tokens emitted, block-pass tokens, cancelled): a tick with any request in flight
        emits a token or runs a block pass (a prelude leads to one of them in the same tick); admitting shrinks
        the queue; reaping a cancelled request frees its slot."""
        return len(self.queue), self.stats["tokens"], self.stats["block_tokens"], self.stats["cancelled"]

    # ------------------------------------------------------------------ a tick
    @torch.no_grad()
    def tick(self) -> None:
        self.stats["ticks"] += 1
        self._reap()
        self._admit()
        pre = (self.stage == PRE).nonzero().flatten()
        if len(pre):
            self._prelude(pre)
            self._decide(pre)
        rec = (self.stage == REC).nonzero().flatten()
        if len(rec):
            self._recurse(rec)
        post = (self.stage == POST).nonzero().flatten()
        if len(post):
            self._finish(post)

    def _reap(self) -> None:
        """Drop cancelled requests: from the queue, and from their slots (freed for `_admit` right after)."""
        if any(r.cancelled for r in self.queue):
            for r in [r for r in self.queue if r.cancelled]:
                r.finish_reason = r.finish_reason or "cancelled"
                self.stats["cancelled"] += 1
            self.queue = deque(r for r in self.queue if not r.cancelled)
        for s, req in enumerate(self.slot_req):
            if req is not None and req.cancelled:
                req.finish_reason = req.finish_reason or "cancelled"
                self.stats["cancelled"] += 1
                self.slot_req[s], self.stage[s] = None, DONE

    def _admit(self) -> None:
        by_len: dict[int, list[int]] = {}  # prompt length -> newly filled slots
        for s in range(self.S):
            if self.slot_req[s] is None and self.queue:
                req = self.queue.popleft()
                self.slot_req[s] = req
                self._reset_slot(s)
                if req.sampling.seed is not None and req.sampling.temperature > 0:
                    self.generators[s] = torch.Generator(device=self.h.device).manual_seed(req.sampling.seed)
                by_len.setdefault(len(self._prompt(req)), []).append(s)
        dev = self.h.device
        for n, group in by_len.items():  # one batched prefill per prompt length
            slots = torch.tensor(group, device=dev)
            prompts = torch.tensor([self._prompt(self.slot_req[s]) for s in group], device=dev)  # (G, n)
            if self.compress is not None:  # only the kept prompt tokens' keys/values enter the slots' rows
                from haipai_lightning.compress.prefill import engine_prefill

                logits = engine_prefill(self.model, prompts, _Apps(self, slots), self.compress)
            else:
                logits = self.model(prompts, cache=_Apps(self, slots)).logits[:, -1]  # (G, V)
            self.pos[slots] = n
            self._emit(slots, logits, torch.full((len(group),), -1, dtype=torch.long, device=dev))

    def _reset_slot(self, s: int) -> None:
        self.allowed[s] = self.nr
        self.generators[s] = None
        for kv in self.kv_unshared.values():
            kv.reset_rows(torch.tensor([s]))
        for kv in self.kv_block:
            kv.reset_rows(torch.arange(self.nr) * self.S + s)

    def _prelude(self, slots: torch.Tensor) -> None:
        m = self.model
        pos = self.pos[slots][:, None]  # (N, 1)
        h = m.embed(self.tok[slots][:, None])  # (N, 1, D)
        h = self._unshared(self.pre_apps, h, slots, pos)
        self.h[slots] = h
        self.stage[slots], self.step[slots] = REC, 0
        st = m.router.decode_start(h)  # e.g. token-choice: the depth each token will run
        if st is not None:
            if self.rstate is None:
                self.rstate = st.new_zeros(self.S, st.size(-1))
            self.rstate[slots] = st
        for i, s in enumerate(slots.tolist()):  # per-request budget on the mean depth
            req = self.slot_req[s]
            if req.depth_budget is not None:
                n, used = len(req.depths), sum(req.depths)
                self.allowed[s] = max(1, min(self.nr, int(req.depth_budget * (n + 1) - used + 1e-9)))

    def _unshared(self, apps: list[int], h: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        m = self.model
        cos, sin = m.rope(pos)
        cache = _Apps(self, slots)
        for a in apps:
            layer = m.layers[m.order[a][0]]
            if str(a) in m.mod_gates:
                h = m._mod(a, layer, h, pos, [], cache)
            else:
                h = layer(h, cos, sin, KVView(cache[a], pos))
        return h

    def _continues(self, slots: torch.Tensor) -> torch.Tensor:
        """Routing decision of each in-flight token at its next step (causal: its own state only)."""
        r = self.step[slots]
        st = self.rstate[slots] if self.rstate is not None else None
        return (r < self.allowed[slots]) & self.model.router.decode_continues(r, self.h[slots], st)

    def _decide(self, slots: torch.Tensor) -> None:
        """Right after a token's prelude or block pass: does it run the next recursion step?

        Deciding here (not at the start of the next tick) lets an exiting token run coda + head
        in this very tick, and its successor enter the recursion in the next one: a token of
        depth d costs d ticks.
        """
        go = self._continues(slots)
        self.stage[slots[~go]] = POST

    def _recurse(self, slots: torch.Tensor) -> None:
        """One shared-block pass for every in-flight token, whatever its recursion step."""
        m = self.model
        shared_kv = m.cfg.kv_mode == "shared"
        groups = [slots[self.step[slots] == 0], slots[self.step[slots] > 0]] if shared_kv else [slots]
        for g in groups:
            if len(g):
                self._block(g, reuse=shared_kv and bool(self.step[g[0]] > 0))
        self.stats["block_passes"] += 1
        self.stats["block_tokens"] += len(slots)
        self.step[slots] += 1
        self._decide(slots)

    def _block(self, slots: torch.Tensor, reuse: bool) -> None:
        """One pass of the shared block for tokens at (possibly) different recursion steps."""
        m, router = self.model, self.model.router
        r = self.step[slots]
        pos = self.pos[slots][:, None]
        cos, sin = m.rope(pos)
        x = h = self.h[slots]
        for j, layer_id in enumerate(m.schedule.shared):
            layer = m.layers[layer_id]
            # row r * S + s: step r of slot s -- keys/values, or a Mamba layer's recurrent state
            kv = KVView(RowView(self.kv_block[j], r * self.S + slots), pos)
            if j in self.block_gates:  # Mixture-of-Depths (Nr=1, so every token is at step 0): through the gate
                x = m._mod(self.block_gates[j], layer, x, pos, [], _Apps(self, slots))
                continue
            share = None
            if m.cfg.kv_mode == "shared":
                if reuse and layer.mixer.cache_kind == "kv":  # the queries read step 1's cache of their sequence
                    share = KVShare({j: self.kv_block[j].read(slots)}, j, True, pos)
                else:
                    share = KVShare({}, j, False, pos)
            x = layer(x, cos, sin, kv, share)
        st = self.rstate[slots] if self.rstate is not None else None
        self.h[slots] = router.decode_combine(r, h, x, st)  # the router's residual combination

    def _finish(self, slots: torch.Tensor) -> None:
        m = self.model
        pos = self.pos[slots][:, None]
        h = self._unshared(self.post_apps, self.h[slots], slots, pos)
        logits = m.head(m.norm(h))[:, -1]  # (N, V)
        self._emit(slots, logits, self.step[slots])
        self.pos[slots] += 1

    def _emit(self, slots: torch.Tensor, logits: torch.Tensor, depths: torch.Tensor) -> None:
        """Sample each slot's next token; finished requests free their slot."""
        slot_list, depth_list = slots.tolist(), depths.tolist()
        greedy = all(self.slot_req[s].sampling.temperature <= 0 for s in slot_list)
        argmax = logits.argmax(-1).tolist() if greedy else None  # one op for the whole batch
        for i, s in enumerate(slot_list):
            req = self.slot_req[s]
            if depth_list[i] >= 0:  # recursion steps the token just processed ran (not for the prompt)
                req.depths.append(depth_list[i])
            nxt = argmax[i] if greedy else int(sample_next(logits[i : i + 1].float(), req.sampling, self.generators[s]))
            if req.hook is not None:  # a forced token replaces the sampled one
                if req.forcing is None:  # the first token: the prompt itself may end in a call
                    req.forcing = Forcing(req.hook)
                    req.forcing.after(req.prompt, req.output)
                nxt = req.forcing.take(nxt)
            req.output.append(nxt)
            if req.hook is not None:
                req.forcing.after(req.prompt, req.output)
            self.stats["tokens"] += 1
            if req.eos_id is not None and nxt == req.eos_id:
                req.finish_reason = "stop"
            elif len(req.output) >= req.max_new_tokens:
                req.finish_reason = "length"
            if req.finish_reason is not None:
                self.slot_req[s], self.stage[s] = None, DONE
            else:
                self.tok[s], self.stage[s] = nxt, PRE
