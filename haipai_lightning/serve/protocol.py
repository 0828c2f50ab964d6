"""POST /v1/completions request bodies: parsing, validation and OpenAI-style errors.

The fields and their ranges follow the OpenAI completions API reference
(https://platform.openai.com/docs/api-reference/completions/create): `prompt` a string, a list of
strings, a list of token ids or a list of such lists; `max_tokens` (default 16); `temperature` in [0, 2]
(default 1); `top_p` in (0, 1] (default 1); `stop` a string or up to 4 strings; `seed`; `stream` with
`stream_options.include_usage`; `n` = 1 only. Extras, as vLLM names them: `top_k` and `ignore_eos`;
Haipai's own: `depth_budget`, a cap on the mean recursion depth (1..Nr, decode/engine.py), and
`token_budget`, the target length of the completion for a model trained with token budgets
(decode/token_budget.py; it ends at the end token, so ignore_eos must be false).

Every mistake raises `APIError`, which the app answers with HTTP 400 and
{"error": {"message", "type": "invalid_request_error", "param": FIELD, "code"}}, the shape of OpenAI's
errors, so that clients (the `openai` package among them) show the message and the field. Fields
OpenAI defines but Haipai does not implement (logprobs, echo, best_of, suffix, penalties, logit_bias)
are refused unless they hold their neutral value; a field OpenAI does not define is refused as
OpenAI does ("Unrecognized request argument supplied").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

from haipai_lightning.decode.token_budget import token_budget_error

OPENAI_MAX_STOP = 4  # "Up to 4 sequences where the API will stop generating further tokens"
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer


class APIError(Exception):
    """A request the server refuses: HTTP `status` with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServedModel:
    """What validation needs to know about the model being served."""

    id: str
    max_len: int  # context: prompt + max_tokens must fit (the engine's KV cache length)
    vocab_size: int
    n_recursions: int
    eos_id: int
    max_prompts: int  # prompts per request: at most the slots plus the queue could ever hold
    budget_tokens: tuple[tuple[int, int], ...] = ()  # (budget length, token id) the model was trained with


@dataclass
class CompletionParams:
    prompts: list[list[int]]  # token ids of each prompt (choice i continues prompt i)
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    depth_budget: float | None = None
    ignore_eos: bool = False
    token_budget: int | None = None


# OpenAI fields Haipai does not implement, and the values that mean "off"
_NEUTRAL = {"echo": (None, False), "logprobs": (None,), "best_of": (None, 1), "suffix": (None, ""),
            "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {})}
_KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream",
          "stream_options", "n", "user", "depth_budget", "ignore_eos", "token_budget", *_NEUTRAL}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a number


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; NaN / Infinity (which Python's json accepts) are malformed JSON too."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=refuse)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f"We could not parse the JSON body of your request ({str(e)[:200]}). The body must be "
                       "a JSON object, e.g. {\"model\": ..., \"prompt\": \"Hello\"}.") from None
    if not isinstance(body, dict):
        raise APIError(f"The request body must be a JSON object, not {type(body).__name__}.")
    return body


def parse_completion(raw: bytes, served: ServedModel, encode: Callable[[str], list[int]]) -> CompletionParams:
    """Validate a /v1/completions body; `encode` turns prompt text into token ids."""
    body = parse_json(raw)
    for key in body:
        if key not in _KNOWN:
            raise APIError(f"Unrecognized request argument supplied: {key}", key)
    for key, neutral in _NEUTRAL.items():
        if key in body and not any(body[key] == v and type(body[key]) is type(v) for v in neutral):
            raise APIError(f"{key}={body[key]!r} is not supported by this server (Haipai implements "
                           f"no {key}); leave it out", key)
    model = body.get("model")
    if model is not None and model != served.id:  # optional, as in vLLM: the one served model
        raise APIError(f"The model {model!r} does not exist; this server serves {served.id!r} (GET /v1/models)",
                       "model", code="model_not_found")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise APIError("user must be a string", "user")
    n = body.get("n", 1)
    if n is not None and (not _is_int(n) or n != 1):
        raise APIError(f"n={n!r}: this server returns one completion per prompt (n must be 1); send several "
                       "requests, or a list of prompts, for more", "n")
    p = CompletionParams(prompts=[])
    p.max_tokens = _max_tokens(body.get("max_tokens"), served)
    p.temperature = _number(body, "temperature", 1.0, 0.0, 2.0, "in [0, 2] (0 = greedy)")
    p.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, "in (0, 1] (1 = off); 0 would keep no token", open_low=True)
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
        raise APIError(f"top_k={top_k!r} must be an integer >= 1 (0, -1 or null = every token)", "top_k")
    p.top_k = top_k if top_k and top_k > 0 else None
    p.stop = _stop(body.get("stop"))
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise APIError(f"seed={seed!r} must be an integer in [0, 2**63 - 1] or null", "seed")
    p.seed = seed
    p.stream = _bool(body, "stream")
    p.ignore_eos = _bool(body, "ignore_eos")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise APIError("stream_options must be an object with only include_usage (a boolean)", "stream_options")
        if not p.stream:
            raise APIError("stream_options is only allowed when stream is true", "stream_options")
        p.include_usage = _bool(opts, "include_usage", "stream_options")
    budget = body.get("depth_budget")
    if budget is not None and (not _is_num(budget) or not 1 <= budget <= served.n_recursions):
        raise APIError(f"depth_budget={budget!r} must be a number in [1, {served.n_recursions}] (a cap on the mean "
                       f"recursion depth; this model has n_recursions={served.n_recursions}) or null", "depth_budget")
    p.depth_budget = None if budget is None else float(budget)
    p.token_budget = body.get("token_budget")
    if p.token_budget is not None:
        why = token_budget_error(p.token_budget, dict(served.budget_tokens), p.max_tokens, "max_tokens")
        if why is None and p.ignore_eos:
            why = "ends the completion at the end token: ignore_eos must be false"
        if why:
            raise APIError(f"token_budget={p.token_budget!r} {why}", "token_budget")
    p.prompts = _prompts(body, served, encode)
    for i, ids in enumerate(p.prompts):
        if len(ids) + (p.token_budget is not None) + p.max_tokens > served.max_len:
            where = "Your prompt" if len(p.prompts) == 1 else f"Prompt {i}"
            raise APIError(f"This model's maximum context length is {served.max_len} tokens, however you requested "
                           f"{len(ids) + p.max_tokens} tokens ({len(ids)} in the prompt; {p.max_tokens} for the "
                           f"completion). {where} must be shorter, or max_tokens lower.", "prompt",
                           code="context_length_exceeded")
    return p


def _max_tokens(v: Any, served: ServedModel) -> int:
    if v is None:
        v = min(16, served.max_len - 1)  # OpenAI's default
    if not _is_int(v) or v < 1:
        raise APIError(f"max_tokens={v!r} must be an integer >= 1", "max_tokens")
    if v >= served.max_len:
        raise APIError(f"max_tokens={v} is beyond this model's context of {served.max_len} tokens (prompt + "
                       f"completion); at most {served.max_len - 1}", "max_tokens", code="context_length_exceeded")
    return v


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float, rule: str,
            open_low: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_num(v) or v > hi or v < lo or (open_low and v <= lo):
        raise APIError(f"{name}={v!r} must be a number {rule}", name)
    return float(v)


def _bool(body: dict[str, Any], name: str, param: str | None = None) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise APIError(f"{name}={v!r} must be a boolean", param or name)
    return v


def _stop(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)
            or len(stops) > OPENAI_MAX_STOP):
        raise APIError(f"stop={v!r} must be a non-empty string or a list of up to {OPENAI_MAX_STOP} non-empty "
                       "strings", "stop")
    return tuple(stops)


def _prompts(body: dict[str, Any], served: ServedModel, encode: Callable[[str], list[int]]) -> list[list[int]]:
    """Token ids of each prompt; "" is the end-of-text token alone (as `haipai generate --prompt ""`)."""
    if "prompt" not in body or body["prompt"] is None:
        raise APIError("You must provide a prompt (a string, a list of strings, or token ids)", "prompt")
    v = body["prompt"]
    if isinstance(v, str):
        items: list[Any] = [v]
    elif isinstance(v, list) and v and all(_is_int(t) for t in v):
        items = [v]  # one prompt of token ids
    elif isinstance(v, list) and v and (all(isinstance(t, str) for t in v) or all(isinstance(t, list) for t in v)):
        items = v
    else:
        raise APIError("prompt must be a string, a non-empty list of strings, a list of token ids or a list of "
                       f"lists of token ids; got {type(v).__name__}" + (" (empty)" if v == [] else ""), "prompt")
    if len(items) > served.max_prompts:
        raise APIError(f"{len(items)} prompts in one request; this server holds at most {served.max_prompts} "
                       "(--max_batch + --max_queue)", "prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(encode(item) or [served.eos_id])
            continue
        if not item or not all(_is_int(t) and 0 <= t < served.vocab_size for t in item):
            raise APIError(f"token-id prompts must be non-empty lists of integers in [0, {served.vocab_size})",
                           "prompt")
        out.append(list(item))
    return out
