"""Per-layer merge ratios chosen by Bayesian optimisation on calibration data (arXiv 2509.09955 /
2509.09168 tune per-layer merge thresholds the same way), through optuna's TPE sampler (a library
Bayesian optimiser, not a hand-written Gaussian process).

Objective of a trial (ratios r_a per layer application): the calibration prompts' mean NLL of their
target tokens after a merged prefill, plus a penalty `penalty * max(0, kv_fraction - budget)` so the
search stays within the KV budget (kv_fraction = cache entries over all applications / (T * apps)).
With budget >= 1 the trade-off is quality against speed: `speed_weight * kv_fraction` is added.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from haipai_lightning.compress.config import CompressConfig
from haipai_lightning.compress.merge import merged_prefill


@dataclass
class TuneResult:
    ratios: list[float]
    nll: float
    kv_fraction: float
    trials: int


def merged_nll(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor, cfg: CompressConfig
               ) -> tuple[float, float]:
    """(mean NLL of targets (N,) after merged prefills of ids (N, T), KV fraction kept)."""
    cache, logits, _ = merged_prefill(model, ids, cfg, ids.size(1))
    n_apps = len(model.order)
    frac = sum(int(cache[a].lengths[0]) for a in range(n_apps)) / (ids.size(1) * n_apps)
    return float(F.cross_entropy(logits.float(), targets)), frac


def tune_ratios(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor, base: CompressConfig,
                n_trials: int = 20, max_ratio: float = 0.9, penalty: float = 20.0, speed_weight: float = 0.5,
                seed: int = 0) -> TuneResult:
    """Choose merge_ratios for the calibration prompts ids (N, T) and their target next tokens (N,)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n_apps = len(model.order)
    budget = base.budget if base.budget <= 1.0 else base.budget / ids.size(1)

    def objective(trial: "optuna.Trial") -> float:
        ratios = [trial.suggest_float(f"r{a}", 0.0, max_ratio) for a in range(n_apps)]
        cfg = CompressConfig(**{**base.__dict__, "method": "merge", "merge_ratios": ratios})
        nll, frac = merged_nll(model, ids, targets, cfg)
        trial.set_user_attr("nll", nll)
        trial.set_user_attr("frac", frac)
        cost = penalty * max(0.0, frac - budget) if budget < 1.0 else speed_weight * frac
        return nll + cost

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    # start from "merge nothing" and from a geometric schedule that meets the budget (TPE refines from there)
    study.enqueue_trial({f"r{a}": 0.0 for a in range(n_apps)})
    study.enqueue_trial({f"r{a}": min(max_ratio, 1.0 - budget ** (1.0 / max(n_apps - 1, 1))) if a else 0.0
                         for a in range(n_apps)})
    study.enqueue_trial({f"r{a}": min(max_ratio, 1.0 - budget) if a == 0 else 0.0 for a in range(n_apps)})
    study.optimize(objective, n_trials=n_trials)
    best = study.best_trial
    return TuneResult([best.params[f"r{a}"] for a in range(n_apps)], best.user_attrs["nll"],
                      best.user_attrs["frac"], len(study.trials))
