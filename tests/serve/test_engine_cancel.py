"""Engine.cancel (what `haipai serve` calls when a client leaves) and the finish reasons it reports."""

from __future__ import annotations

import threading

import pytest
import torch

from haipai_lightning.decode.engine import Engine, Request
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter
from helpers import tiny_config

V = 61


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(one_thread):
    torch.manual_seed(0)
    m = HaipaiModel(tiny_config(vocab_size=V, init_std=0.3, tie_embeddings=False), router=ExpertChoiceRouter).eval()
    with torch.no_grad():  # spread the untrained gates so tokens really exit at different depths
        for p in m.router.parameters():
            p.mul_(40)
    return m


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, V, (k,), generator=g).tolist() for k in (3, 5, 3, 4, 6)[:n]]


def test_cancelling_frees_the_slot_and_leaves_the_others_unchanged(model):
    alone = Engine(model, max_batch=2).generate(prompts(4), max_new_tokens=10)
    e = Engine(model, max_batch=2)
    reqs = [e.submit(Request(p, 10)) for p in prompts(4)]
    for _ in range(3):
        e.tick()
    assert reqs[0].output and reqs[0].finish_reason is None
    e.cancel(reqs[0])  # in a slot
    e.cancel(reqs[3])  # still queued
    e.tick()
    assert reqs[0].finish_reason == reqs[3].finish_reason == "cancelled"
    assert e.slot_req[0] is reqs[2]  # the freed slot went to the next queued request at once
    e.run()
    assert reqs[3].output == [] and len(reqs[0].output) < 10
    assert [r.output for r in reqs[1:3]] == alone[1:3]  # greedy outputs do not depend on the batch
    assert [r.finish_reason for r in reqs[1:3]] == ["length", "length"]
    assert e.stats["cancelled"] == 2 and e.active() == 0 and not e.queue


def test_run_ends_when_the_only_request_is_cancelled(model):
    e = Engine(model, max_batch=1)
    req = e.submit(Request(prompts(1)[0], 30))
    e.tick()
    e.cancel(req)
    e.run()  # a tick that only frees a slot is progress, not a spin
    assert req.finish_reason == "cancelled" and e.active() == 0
    e.cancel(req)  # cancelling a finished request does nothing
    assert e.generate([prompts(1)[0]], max_new_tokens=3)[0]


def test_eos_finishes_with_stop(model):
    e = Engine(model, max_batch=2)
    first = e.generate([prompts(1)[0]], max_new_tokens=6)[0]
    req = e.submit(Request(prompts(1)[0], 6, eos_id=first[2]))
    e.run()
    assert req.output == first[: first.index(first[2]) + 1] and req.finish_reason == "stop"


def test_cancel_from_another_thread_while_running(model):
    e = Engine(model, max_batch=2)
    reqs = [e.submit(Request(p, 40)) for p in prompts(2)]
    started = threading.Event()

    def drive():
        while e.queue or e.active():
            e.tick()
            started.set()

    t = threading.Thread(target=drive)
    t.start()
    started.wait(10)
    e.cancel(reqs[1])
    t.join(30)
    assert not t.is_alive()
    assert reqs[0].finish_reason == "length" and len(reqs[0].output) == 40
    assert reqs[1].finish_reason in ("cancelled", "length")  # it may have finished before the flag was read
