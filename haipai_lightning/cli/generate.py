"""`haipai generate`: sample from a checkpoint (one prompt, a prompts file through the engine, or
speculative decoding)."""

from __future__ import annotations

import os
import sys

from haipai_lightning.config import ConfigError


def generate_command(
    ckpt_path: str,
    prompt: str = "",
    prompts: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int | None = 0,
    depth_budget: float | None = None,
    speculative: int = 0,
    draft_depth: int = 1,
) -> list[str]:
    """Sample text from a trained checkpoint (KV-cached; MoR models route causally).

    Args:
        ckpt_path: a Haipai .ckpt (e.g. lightning_logs/version_0/checkpoints/last.ckpt).
        prompt: text to continue ("" starts from the end-of-text token).
        prompts: a text file with one prompt per line: batch generation through the
            continuous depth-wise batching engine.
        batch_size: requests in flight at once in the engine.
        max_new_tokens: tokens to sample per prompt.
        temperature: softmax temperature; 0 = greedy.
        top_k: keep the k most likely tokens (null = all).
        top_p: nucleus sampling mass (null or 1 = off).
        seed: random seed (null = nondeterministic); request i of a prompts file uses seed + i.
        depth_budget: cap on the mean recursion depth of the generated tokens (1..Nr; engine).
        speculative: greedy speculative decoding with this many drafted tokens per round (0 = off).
        draft_depth: recursion steps of the draft (the same model stopped early).
    """
    import torch

    from haipai_lightning.decode.engine import Engine, Request
    from haipai_lightning.decode.sampling import SamplingConfig
    from haipai_lightning.decode.generate import generate
    from haipai_lightning.io.loader import load_model
    from haipai_lightning.decode.speculative import speculative_generate

    model, tok = load_model(ckpt_path)
    if tok is None:
        raise ConfigError(f"{ckpt_path!r} holds no tokenizer; it was not trained through a Haipai data module")
    eos = tok.token_to_id("<|endoftext|>") or 0
    if prompts is not None:
        if not os.path.isfile(prompts):
            raise FileNotFoundError(f"--prompts {prompts!r} does not exist; give a text file with one prompt per line")
        with open(prompts, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    else:
        lines = [prompt]
    encoded = [tok.encode(t).ids or [eos] for t in lines]
    if speculative > 0:
        if prompts is not None or temperature > 0:
            raise ConfigError("--speculative decodes one --prompt greedily: pass --temperature 0 and no --prompts")
        out, stats = speculative_generate(model, torch.tensor([encoded[0]]), max_new_tokens, k=speculative,
                                          draft_depth=draft_depth)
        texts = [tok.decode(out[0].tolist())]
        print(texts[0])
        print(f"[speculative: {stats['tokens_per_round']:.2f} tokens per full-model pass, "
              f"acceptance {stats['acceptance']:.2f}]", file=sys.stderr)
        return texts
    if prompts is None and depth_budget is None:
        s = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed)
        texts = [tok.decode(generate(model, torch.tensor([encoded[0]]), s)[0].tolist())]
        print(texts[0])
        return texts
    engine = Engine(model, max_batch=batch_size, max_len=model.cfg.max_seq_len)
    reqs = [engine.submit(Request(ids, max_new_tokens, SamplingConfig(
        max_new_tokens, temperature, top_k, top_p, None if seed is None else seed + i), depth_budget))
        for i, ids in enumerate(encoded)]
    engine.run()
    texts = [tok.decode(r.prompt + r.output) for r in reqs]
    for r, text in zip(reqs, texts):
        depth = sum(r.depths) / max(len(r.depths), 1)
        print(text)
        print(f"[mean recursion depth {depth:.2f}]", file=sys.stderr)
        if prompts is not None:
            print("---")
    return texts
