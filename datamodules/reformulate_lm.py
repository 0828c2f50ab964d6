"""The language models `haipai reformulate` can drive: one `complete(prompts) -> texts` contract.

    HaipaiLM         a Haipai checkpoint (decode/generate.py, KV-cached)
    TransformersLM   any transformers causal LM from a local folder or the Hub (AutoModelForCausalLM)
    OpenAILM         any OpenAI-compatible completions endpoint: `haipai serve`, vLLM, a hosted model

Each takes a batch of prompts and returns one completion per prompt (the prompt not included),
sampled with the run's temperature and seed, cut at the model's end-of-text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, Sequence

from haipai_lightning.config import ConfigError


@dataclass
class Decoding:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0


class LanguageModel(Protocol):
    name: str

    def complete(self, prompts: Sequence[str], d: Decoding) -> list[str]: ...


class HaipaiLM:
    """A Haipai checkpoint; prompts are cut from the left to fit its context with the new tokens."""

    def __init__(self, ckpt_path: str) -> None:
        from haipai_lightning.io.loader import load_model

        self.model, self.tok = load_model(ckpt_path)
        if self.tok is None:
            raise ConfigError(f"--model {ckpt_path!r} holds no tokenizer; it was not trained through a Haipai data module")
        self.name = f"haipai:{ckpt_path}"
        self.eos = self.tok.token_to_id("<|endoftext|>") or 0

    def complete(self, prompts: Sequence[str], d: Decoding) -> list[str]:
        import torch

        from haipai_lightning.decode.generate import generate
        from haipai_lightning.decode.sampling import SamplingConfig

        new = min(d.max_new_tokens, self.model.cfg.max_seq_len - 1)
        out = []
        for i, p in enumerate(prompts):
            ids = (self.tok.encode(p).ids or [self.eos])[-(self.model.cfg.max_seq_len - new):]
            s = SamplingConfig(new, d.temperature, None, d.top_p if d.temperature > 0 else None, d.seed + i)
            gen = generate(self.model, torch.tensor([ids]), s)[0, len(ids):].tolist()
            out.append(self.tok.decode(gen[: gen.index(self.eos)] if self.eos in gen else gen))
        return out


class TransformersLM:
    """A transformers causal LM (a local folder, or a Hub name when online); batched, left-padded."""

    def __init__(self, name_or_path: str, device: str = "cpu") -> None:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise ConfigError("--backend transformers needs the transformers package: pip install 'haipai[hf]'") from e
        local = os.path.isdir(os.path.expanduser(name_or_path))
        try:
            self.tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
            self.model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=local).to(device).eval()
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--model {name_or_path!r} is not a loadable transformers causal LM ({first})") from None
        self.tok.padding_side = "left"  # generation continues at the right end of every row
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.name, self.device = f"transformers:{name_or_path}", device

    def complete(self, prompts: Sequence[str], d: Decoding) -> list[str]:
        import torch

        torch.manual_seed(d.seed)
        limit = getattr(self.model.config, "max_position_embeddings", None) or 2048
        enc = self.tok(list(prompts), return_tensors="pt", padding=True, truncation=True,
                       max_length=max(1, limit - d.max_new_tokens)).to(self.device)
        sample = d.temperature > 0
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=d.max_new_tokens, do_sample=sample,
                                      temperature=d.temperature if sample else None, top_p=d.top_p if sample else None,
                                      pad_token_id=self.tok.pad_token_id)
        return self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


class OpenAILM:
    """An OpenAI-compatible /v1/completions endpoint through the official `openai` client."""

    def __init__(self, model: str, base_url: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 600.0) -> None:
        try:
            import openai
        except ImportError as e:
            raise ConfigError("--backend openai needs the openai package: pip install openai") from e
        # haipai serve needs no key; the client insists on one, so a placeholder goes when the variable is unset
        self.client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "none", timeout=timeout)
        self.model, self.name = model, f"openai:{base_url}#{model}"

    def complete(self, prompts: Sequence[str], d: Decoding) -> list[str]:
        r = self.client.completions.create(model=self.model, prompt=list(prompts), max_tokens=d.max_new_tokens,
                                           temperature=d.temperature, top_p=d.top_p, seed=d.seed)
        texts = [""] * len(prompts)
        for c in r.choices:  # one choice per prompt, identified by its index
            texts[c.index] = c.text
        return texts


BACKENDS = ("haipai", "transformers", "openai")


def make_lm(backend: str, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY") -> LanguageModel:
    if backend == "haipai":
        return HaipaiLM(model)
    if backend == "transformers":
        return TransformersLM(model)
    if backend == "openai":
        if not base_url:
            raise ConfigError("--backend openai needs --base_url (e.g. http://127.0.0.1:8000/v1 for haipai serve)")
        return OpenAILM(model, base_url, api_key_env)
    raise ConfigError(f"--backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
