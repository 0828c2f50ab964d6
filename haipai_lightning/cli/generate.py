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
    token_budget: int | None = None,
    lookup: str | None = None,
    compress: str | None = None,
    kv_budget: float = 0.25,
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
        depth_budget: cap on the mean recursion depth of the generated tokens (1..Nr; engine); for a model
            with a budget head, the mean depth (or MoD capacity) its routers are set to.
        speculative: greedy speculative decoding with this many drafted tokens per round (0 = off).
        draft_depth: recursion steps of the draft (the same model stopped early).
        token_budget: target length of each continuation, for a model trained with token budgets
            (datamodules.TokenBudgetDataModule): it ends, at the end-of-text token, near this many tokens (engine).
        lookup: an LMLM fact store (SQLite, decode/lookup.py): lookup calls the model writes get their value
            from it; the text shows each call as its value.
        compress: compress the prompt's prefill (docs/compression.md): ehpc, reform, merge (single --prompt only),
            recent or random; null = off.
        kv_budget: the compression's KV budget (a fraction of the prompt <= 1, or tokens).
    """
    import torch

    from haipai_lightning.decode.engine import Engine, Request
    from haipai_lightning.decode.generate import generate
    from haipai_lightning.decode.sampling import SamplingConfig
    from haipai_lightning.decode.speculative import speculative_generate
    from haipai_lightning.decode.token_budget import budget_tokens, token_budget_error
    from haipai_lightning.io.loader import load_model

    sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed)  # checks the sampling flags
    cc = None
    if compress is not None:  # issue #21
        from haipai_lightning.compress.config import CompressConfig

        cc = CompressConfig(method=compress, budget=kv_budget)
        if speculative > 0:
            raise ConfigError("--compress and --speculative do not combine; pass one of them")
    if batch_size < 1:
        raise ConfigError(f"--batch_size {batch_size} must be >= 1 (requests in flight at once)")
    if speculative < 0:
        raise ConfigError(f"--speculative {speculative} must be >= 0 (drafted tokens per round; 0 = off)")
    if speculative > 0 and (prompts is not None or temperature > 0):
        raise ConfigError("--speculative decodes one --prompt greedily: pass --temperature 0 and no --prompts")
    if prompts is not None and not os.path.isfile(prompts):
        raise FileNotFoundError(f"--prompts {prompts!r} does not exist; give a text file with one prompt per line")
    model, tok = load_model(ckpt_path)
    if tok is None:
        raise ConfigError(f"{ckpt_path!r} holds no tokenizer; it was not trained through a Haipai data module")
    nr = model.schedule.n_recursions
    if depth_budget is not None and not 1 <= depth_budget <= nr:
        raise ConfigError(f"--depth_budget {depth_budget} must be in [1, {nr}] (a mean recursion depth; this model has "
                          f"n_recursions={nr})")
    if speculative > 0 and not 1 <= draft_depth < nr:
        raise ConfigError(f"--draft_depth {draft_depth} must be in [1, {nr - 1}]: the draft stops before the model's "
                          f"n_recursions={nr} steps" + (" (this model has one step: nothing to draft with)" if nr < 2 else ""))
    eos = tok.token_to_id("<|endoftext|>") or 0
    table = budget_tokens(tok)
    if token_budget is not None:
        why = token_budget_error(token_budget, table, max_new_tokens)
        if why or speculative > 0:
            raise ConfigError(f"--token_budget {token_budget} " + (why or "is not for --speculative decoding"))
    hook = None
    if lookup is not None:
        from haipai_lightning.decode.lookup import FactStore, LookupHook, RenderingTokenizer

        if speculative > 0:
            raise ConfigError("--lookup does not combine with --speculative (drafts would run past a lookup call)")
        hook, tok = LookupHook(FactStore(lookup), tok), RenderingTokenizer(tok)
    if prompts is not None:
        numbered = _read_prompts(prompts)
    else:
        numbered = [(0, prompt)]
    lines = [t for _, t in numbered]
    encoded = [tok.encode(t).ids or [eos] for t in lines]
    limit = model.cfg.max_seq_len - max_new_tokens - (speculative + 1 if speculative > 0 else 0)
    limit -= token_budget is not None  # the budget token follows the prompt
    for (n, _), ids in zip(numbered, encoded):
        if len(ids) > limit:
            where = f"--prompts {prompts!r} line {n}" if prompts is not None else "--prompt"
            raise ConfigError(f"{where} has {len(ids)} tokens; with --max_new_tokens {max_new_tokens} the model's "
                              f"context of {model.cfg.max_seq_len} tokens allows {max(limit, 0)}: shorten it or "
                              "lower --max_new_tokens")
    if speculative > 0:
        out, stats = speculative_generate(model, torch.tensor([encoded[0]]), max_new_tokens, k=speculative,
                                          draft_depth=draft_depth)
        texts = [tok.decode(out[0].tolist())]
        print(texts[0])
        print(f"[speculative: {stats['tokens_per_round']:.2f} tokens per full-model pass, "
              f"acceptance {stats['acceptance']:.2f}]", file=sys.stderr)
        return texts
    # a model with a budget head (model/budget.py) takes --depth_budget as the compute its routers are set to
    # (unset: the head chooses from the prompt); the engine caps the depth of the others and honours token budgets
    budgeted = getattr(model.router, "budget_head", None) is not None
    if prompts is None and token_budget is None and (depth_budget is None or budgeted):
        texts = [tok.decode(generate(model, torch.tensor([encoded[0]]), sampling, budget=depth_budget, hook=hook,
                                     compress=cc)[0].tolist())]
        print(texts[0])
        return texts
    engine = Engine(model, max_batch=batch_size, max_len=model.cfg.max_seq_len, budget_tokens=table, compress=cc)
    reqs = [engine.submit(Request(ids, max_new_tokens, SamplingConfig(
        max_new_tokens, temperature, top_k, top_p, None if seed is None else seed + i), depth_budget,
        eos if token_budget is not None else None, token_budget=token_budget, hook=hook))
        for i, ids in enumerate(encoded)]
    engine.run()
    texts = [tok.decode(r.prompt + r.output) for r in reqs]
    for r, text in zip(reqs, texts):
        depth = sum(r.depths) / max(len(r.depths), 1)
        print(text)
        print(f"[mean recursion depth {depth:.2f}]", file=sys.stderr)
        if token_budget is not None:
            n = len(r.output) - (r.finish_reason == "stop")
            print(f"[{n} tokens for a token budget of {token_budget} ({r.finish_reason})]", file=sys.stderr)
        if prompts is not None:
            print("---")
    return texts


def _read_prompts(path: str) -> list[tuple[int, str]]:
    """(line number, prompt) of every non-empty line of a UTF-8 text file."""
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ConfigError(f"--prompts {path!r} line {n} is not UTF-8 text ({e.reason} at byte {e.start}); "
                                  "save the file as UTF-8") from None
            if line.strip():
                out.append((n, line))
    if not out:
        raise ConfigError(f"--prompts {path!r} has no non-empty line; give one prompt per line")
    return out
