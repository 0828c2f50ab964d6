"""The synthetic key -> value retrieval task of benchmarks/long_context.py, and its tiny model.

A context of T tokens: BOS, filler words, and `n_pairs` pairs "k1 k2 k3 v ;" (a 3-letter key, a value
token) at random places; at the end a question "? k1 k2 k3" about one of the pairs, whose answer is its
value (chance: 1/20). Only the question's answer is predictable, so the training loss is taken on
answer tokens only (several questions per training context). Everything is generated locally from a
seed. Vocabulary: 26 letters, 20 values, 8 filler words, ";", "?", BOS: 57 tokens.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
import torch.nn.functional as F

from haipai_lightning.config import ModelConfig
from haipai_lightning.model.decoder import HaipaiModel

LETTERS, VALUES, FILLER = 0, 26, 46
SEMI, QMARK, BOS = 54, 55, 56
VOCAB = 57
PAIR_LEN, Q_LEN = 5, 4  # "k k k v ;"   "? k k k" -> v


def make_batch(B: int, T: int, n_pairs: int, n_questions: int, g: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of T-token contexts ending in n_questions questions (each "? k k k v ;", the last one without ";").

    Returns ids (B, T), targets (B, T) for next-token training (-100 except where a question's last key
    letter predicts its value) and needle (B, T) bool: the tokens of the pair the *last* question asks about.
    Keys are 3 letters with distinct last letters within a context; values are one of 20 tokens."""
    tail = n_questions * (Q_LEN + 2) - 1
    body = T - tail
    ids = FILLER + torch.randint(0, 8, (B, T), generator=g)
    ids[:, 0] = BOS
    tgt = torch.full((B, T), -100, dtype=torch.long)
    needle = torch.zeros(B, T, dtype=torch.bool)
    slots = (body - 1) // PAIR_LEN  # non-overlapping places for the pairs
    for b in range(B):
        keys = torch.randint(0, 26, (n_pairs, 3), generator=g)
        keys[:, 2] = torch.randperm(26, generator=g)[:n_pairs]
        vals = torch.randint(0, 20, (n_pairs,), generator=g)
        where = torch.randperm(slots, generator=g)[:n_pairs] * PAIR_LEN + 1
        for i in range(n_pairs):
            s = int(where[i])
            ids[b, s : s + PAIR_LEN] = torch.tensor([*(LETTERS + keys[i]).tolist(), VALUES + int(vals[i]), SEMI])
        asked = torch.randperm(n_pairs, generator=g)[:n_questions]
        p = body
        for j, i in enumerate(asked.tolist()):
            q = [QMARK, *(LETTERS + keys[i]).tolist(), VALUES + int(vals[i])] + ([SEMI] if j < n_questions - 1 else [])
            ids[b, p : p + len(q)] = torch.tensor(q)
            tgt[b, p + 3] = ids[b, p + 4]  # the last key letter predicts the value
            p += len(q)
        s = int(where[asked[-1]])
        needle[b, s : s + PAIR_LEN] = True
    return ids, tgt, needle


def make_repeat_batch(B: int, T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens with one span copied later at a random distance, loss on the copy: dense supervision that
    grows the induction (copy-by-content) circuit retrieval needs much sooner than the sparse answers alone
    (Olsson et al., arXiv 2209.11895). The distance varies per row, so a fixed-offset shortcut does not fit."""
    ids = torch.randint(0, BOS, (B, T), generator=g)
    ids[:, 0] = BOS
    tgt = torch.full_like(ids, -100)
    L = T // 4
    for b in range(B):
        s1 = 1 + int(torch.randint(0, T // 2 - L, (1,), generator=g))
        s2 = T // 2 + int(torch.randint(0, T // 2 - L + 1, (1,), generator=g))
        ids[b, s2 : s2 + L] = ids[b, s1 : s1 + L]
        tgt[b, s2 : s2 + L - 1] = ids[b, s2 + 1 : s2 + L]
    return ids, tgt


def eval_examples(n: int, T: int, n_pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n questions at context T: prompts (n, T) ending in "? k k k", answers (n, 1), needle masks (n, T)."""
    g = torch.Generator().manual_seed(seed)
    ids, _, needle = make_batch(n, T + 1, n_pairs, 1, g)  # + the answer
    return ids[:, :T], ids[:, T:], needle[:, :T]


def model_config(max_len: int, n_layers: int = 4, n_recursions: int = 2) -> ModelConfig:
    # default: 4 effective layers = 2 unique layers applied twice (MoR cycle sharing, every token every step)
    return ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                       n_recursions=n_recursions, sharing="cycle", max_seq_len=max_len, tie_embeddings=True)


def train(model: HaipaiModel, steps: int, lengths: list[int], batch: int, n_pairs: int, lr: float = 3e-3, n_questions: int = 8,
          repeat: float = 0.5,
          log_every: int = 50, seed: int = 0) -> list[float]:
    """AdamW on answer tokens, context lengths drawn from `lengths`; cosine decay after 5% warm-up."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    model.train()
    losses = []
    t0 = time.perf_counter()
    for s in range(steps):
        T = lengths[int(torch.randint(0, len(lengths), (1,), generator=g))]
        B = max(1, batch * lengths[0] // T)  # same tokens per step whatever the length
        ids, tgt, _ = make_batch(B, T, n_pairs, n_questions, g)
        if repeat > 0:  # a share of each batch: repeated random sequences (dense induction signal)
            n_rep = max(1, int(B * repeat))
            rid, rtg = make_repeat_batch(n_rep, T, g)
            ids, tgt = torch.cat([ids, rid]), torch.cat([tgt, rtg])
        logits = model(ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (s + 1) % log_every == 0:
            print(f"  step {s + 1}/{steps} T={T} loss {sum(losses[-log_every:]) / log_every:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    return losses


def save(model: HaipaiModel, path: str, meta: dict) -> None:
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}  # tied to embed
    save_file(sd, path + ".safetensors")
    with open(path + ".json", "w") as f:
        json.dump(meta, f, indent=2)


def load(path: str, max_len: int) -> tuple[HaipaiModel, dict] | None:
    """The cached model (safetensors: no code runs on load; its shape from the JSON beside it), or None."""
    if not (os.path.exists(path + ".safetensors") and os.path.exists(path + ".json")):
        return None
    from safetensors.torch import load_file

    with open(path + ".json") as f:
        meta = json.load(f)
    model = HaipaiModel(model_config(max_len, meta.get("n_layers", 4), meta.get("n_recursions", 2)))
    model.load_state_dict(load_file(path + ".safetensors"), strict=False)
    return model.eval(), meta
