"""Greedy speculative decoding (Leviathan et al. 2023, arXiv 2211.17192) with a recursion-depth draft:
the same MoR model stopped after fewer recursion steps drafts, the full model verifies."""

from __future__ import annotations

import torch

from haipai_lightning.model.decoder import HaipaiModel


@torch.no_grad()
def speculative_generate(
    model: HaipaiModel, input_ids: torch.Tensor, max_new_tokens: int, k: int = 4,
    draft: HaipaiModel | None = None, draft_depth: int = 1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Greedy speculative decoding; the output equals plain greedy decoding of `model`.

    The draft is, by default, the same model stopped at recursion step `draft_depth` (the MoR
    paper's self-speculation idea, arXiv 2507.10524, section 5: a recursion boundary is a natural point to draft from: the draft shares every
    weight and costs draft_depth/Nr of the shared block), or any smaller model given as `draft`.
    Each round the draft proposes k tokens one by one; the full model scores them in one
    cached forward and keeps the longest prefix it agrees with plus its own next token. Both
    caches are rolled back to the accepted length (`KVCache.truncate`).
    input_ids (1, T) -> ((1, T + max_new_tokens), stats).
    """
    if input_ids.size(0) != 1:
        raise ValueError("speculative_generate decodes one sequence (batch 1)")
    model.eval()
    drafter, depth = (draft.eval(), None) if draft is not None else (model, draft_depth)
    total = input_ids.size(1) + max_new_tokens + k + 1
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens + k exceeds model.config.max_seq_len={model.cfg.max_seq_len}")
    full_cache, draft_cache = model.new_cache(total), drafter.new_cache(total)
    nxt = model(input_ids, cache=full_cache).logits[:, -1].argmax(-1)  # the full model's next token
    drafter(input_ids[:, :-1], cache=draft_cache, max_depth=depth)  # the draft re-reads the last token below
    seq = input_ids[0].tolist()
    pending_draft = [seq[-1]]  # tokens the draft cache has not seen yet
    rounds = proposed = accepted = 0
    while len(seq) - input_ids.size(1) < max_new_tokens:
        rounds += 1
        # 1) draft k tokens; the first one is the full model's own next token (certain)
        props = [int(nxt)]
        feed = pending_draft + props
        for _ in range(k - 1):
            logits = drafter(torch.tensor([feed]), cache=draft_cache, max_depth=depth).logits[:, -1]
            feed = [int(logits.argmax(-1))]
            props.append(feed[0])
        # 2) verify all proposals in one cached forward of the full model
        n0 = len(seq)
        ver = model(torch.tensor([props]), cache=full_cache).logits[0].argmax(-1).tolist()  # (k,)
        m = 0  # accepted draft tokens beyond the first
        while m < k - 1 and props[m + 1] == ver[m]:
            m += 1
        proposed += k - 1
        accepted += m
        keep = props[: m + 1]
        seq += keep
        nxt = torch.tensor(ver[m])
        # 3) roll both caches back to the accepted tokens
        full_cache.truncate(n0 + m + 1)
        draft_seen = min(draft_cache.seen, n0 + m + 1)
        draft_cache.truncate(draft_seen)
        pending_draft = seq[draft_seen:]
    out = torch.tensor([seq[: input_ids.size(1) + max_new_tokens]])
    return out, {"rounds": rounds, "acceptance": accepted / max(proposed, 1),
                 "tokens_per_round": (len(seq) - input_ids.size(1)) / max(rounds, 1)}
