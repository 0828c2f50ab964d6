"""Haipai as an lm-evaluation-harness model (registered as "haipai").

    haipai eval --ckpt_path last.ckpt --tasks hellaswag,piqa     # online: the tasks' data comes from the Hub
    haipai eval --ckpt_path last.ckpt --tasks haipai_kjv_cloze   # offline: a shipped local task

    import haipai_lightning.eval.lm_eval_adapter, lm_eval          # or from Python, by the registered name
    lm_eval.simple_evaluate(model="haipai", model_args="ckpt_path=last.ckpt", tasks=["piqa"])

lm_eval sends text; this class tokenizes with the checkpoint's own BPE and scores with the
model in eval mode, where MoR routing is causal (expert-choice by its 0.5 threshold), so a
continuation's score depends only on the tokens before it -- right-padding a batch changes
nothing. Contexts longer than the model's window are cut from the left, as HF models are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.tasks._yaml_loader import load_yaml

from haipai_lightning.config import ConfigError
from haipai_lightning.decode.sampling import SamplingConfig, sample_next
from haipai_lightning.io.loader import load_model

TASKS_DIR = Path(__file__).parent / "tasks"  # shipped local tasks (offline)
# The MoR paper's few-shot suite (Table 3): LAMBADA, HellaSwag, PIQA, WinoGrande, ARC-e/c, MMLU.
MOR_TASKS = ["lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "mmlu"]


@register_model("haipai")
class HaipaiLM(TemplateLM):
    def __init__(self, ckpt_path: str | None = None, model: torch.nn.Module | None = None, tokenizer: Any = None,
                 batch_size: int | str = 8, max_length: int | None = None, device: str = "cpu", **_: Any) -> None:
        """Args:
            ckpt_path: a Haipai .ckpt (holds the architecture and the tokenizer); or pass model + tokenizer.
            batch_size: requests scored per forward ("auto" = 8).
            max_length: context window in tokens (default: the model's max_seq_len).
            device: where the model runs.
        """
        super().__init__()
        if model is None:
            if ckpt_path is None:
                raise ConfigError("HaipaiLM needs ckpt_path=... (or a model and its tokenizer)")
            model, tokenizer = load_model(ckpt_path)
        if tokenizer is None:
            raise ConfigError(f"{ckpt_path!r} holds no tokenizer; it was not trained through a Haipai data module")
        from datamodules.tokenizer import eos_id

        device = device or "cpu"  # lm_eval passes device=None when its caller gave none
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self._eot = eos_id(tokenizer)
        self._device = torch.device(device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self._max_length = int(max_length or model.cfg.max_seq_len)
        if self._max_length > model.cfg.max_seq_len:
            raise ConfigError(f"max_length={max_length} exceeds the model's max_seq_len={model.cfg.max_seq_len}")

    # ------------------------------------------------------------ tokenizer
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return "haipai-bpe"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # -------------------------------------------------------------- scoring
    @torch.inference_mode()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum log p(continuation | context), continuation is greedy)."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        rows = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                out[i] = (0.0, True)
                continue
            if len(cont) > self.max_length:
                raise ConfigError(f"a continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
            whole = (ctx + cont)[-(self.max_length + 1):]  # cut the context from the left
            rows.append((i, whole[:-1], whole[-len(cont):]))
        rows.sort(key=lambda r: -len(r[1]))  # similar lengths share a batch: less padding
        for b in range(0, len(rows), self.batch_size):
            batch = rows[b : b + self.batch_size]
            L = len(batch[0][1])
            ids = torch.full((len(batch), L), self._eot, dtype=torch.long)  # right padding: causal, never attended
            for j, (_, inp, _) in enumerate(batch):
                ids[j, : len(inp)] = torch.tensor(inp)
            logp = F.log_softmax(self.model(ids.to(self._device)).logits.float(), dim=-1).cpu()  # (b, L, V)
            for j, (i, inp, tgt) in enumerate(batch):
                lp = logp[j, len(inp) - len(tgt) : len(inp)]  # (n, V): the positions that predict tgt
                t = torch.tensor(tgt)
                out[i] = (float(lp.gather(1, t[:, None]).sum()), bool((lp.argmax(-1) == t).all()))
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kw: Any) -> list[tuple[float, bool]]:
        res = self._score([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), r in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Full log-likelihood of each string: disjoint windows of max_length, each token predicted once."""
        out = []
        for (string,) in [r.args for r in requests]:
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(lp for lp, _ in self._score(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    @torch.inference_mode()
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if do_sample) continuation with the KV cache, cut at the first stop string."""
        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or [self.tok_decode([self._eot])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", 256))
            sample = bool(kw.pop("do_sample", False)) and float(kw.get("temperature", 1.0)) > 0
            s = SamplingConfig(max_new, float(kw.get("temperature", 1.0)) if sample else 0.0,
                               kw.get("top_k"), kw.get("top_p"), seed=0)
            max_new = min(max_new, self.max_length - 1)
            ctx = (self.tok_encode(context) or [self._eot])[-(self.max_length - max_new):]
            cache = self.model.new_cache(len(ctx) + max_new)
            logits = self.model(torch.tensor([ctx], device=self._device), cache=cache).logits[:, -1]
            gen = torch.Generator(device=self._device).manual_seed(0) if sample else None
            new: list[int] = []
            text = ""
            for _ in range(max_new):
                nxt = int(sample_next(logits.float(), s, gen)[0])
                if nxt == self._eot:
                    break
                new.append(nxt)
                text = self.tok_decode(new)
                if any(u in text for u in until):
                    break
                logits = self.model(torch.tensor([[nxt]], device=self._device), cache=cache).logits[:, -1]
            for u in until:  # cut at the first stop string
                text = text.split(u)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def resolve_tasks(tasks: list[str]) -> tuple[list[str], list[str], bool]:
    """Task specs -> (task names, include paths, whether lm_eval's own tasks are needed).

    A spec is a task name, `mor` (the paper's suite), a local task's name (haipai_lightning/eval/tasks),
    or a path to a task YAML file / a directory of them.
    """
    names, include, builtin = [], [str(TASKS_DIR)], False
    local = {p.stem for p in TASKS_DIR.glob("*/*.yaml")}
    for spec in tasks:
        if spec == "mor":
            names += MOR_TASKS
            builtin = True
        elif spec.endswith((".yaml", ".yml")) or os.path.isdir(spec):
            if not os.path.exists(spec):
                raise FileNotFoundError(f"--tasks {spec!r} does not exist; give a task YAML file or a task name")
            path = Path(spec).resolve()
            include.append(str(path.parent if path.is_file() else path))
            if path.is_file():
                names.append(load_yaml(path, resolve_func=False)["task"])
            else:
                names += [load_yaml(p, resolve_func=False)["task"] for p in sorted(path.glob("*.yaml"))]
        else:
            names.append(spec)
            builtin = builtin or spec not in local
    return names, list(dict.fromkeys(include)), builtin


def check_tasks(tasks: list[str]) -> None:
    """Raise ConfigError for a task lm_eval does not know -- before any long work (perplexity) starts."""
    import difflib

    from lm_eval.tasks import TaskManager

    names, include, builtin = resolve_tasks(tasks)
    known = set(TaskManager(include_path=include, include_defaults=builtin).all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        near = difflib.get_close_matches(unknown[0], sorted(known), n=3)
        raise ConfigError(f"--tasks {unknown[0]!r} is not an lm_eval task" + (f" (did you mean {', '.join(near)}?)"
                          if near else "") + f"; local tasks: {', '.join(sorted(p.stem for p in TASKS_DIR.glob('*/*.yaml')))}")


def run_lm_eval(lm: HaipaiLM, tasks: list[str], num_fewshot: int | None = None, limit: int | float | None = None,
                bootstrap_iters: int = 1000) -> dict[str, dict[str, float]]:
    """Run lm_eval tasks on `lm`; returns {task: {metric: value}} (numbers only)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names, include, builtin = resolve_tasks(tasks)
    manager = TaskManager(include_path=include, include_defaults=builtin)
    res = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                          bootstrap_iters=bootstrap_iters, log_samples=False)
    if res is None:
        return {}
    return {task: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, metrics in res["results"].items()}
