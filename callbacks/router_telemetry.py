"""RouterTelemetry: routing health in TensorBoard, read from the records the training step already made."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import MeanMetric

from haipai_lightning.analysis.depth_picture import DEFAULT_TEXT, write_depth_pictures
from haipai_lightning.model.routing.record import RouterRecord
from haipai_lightning.analysis.telemetry import DeadTokenTracker, adds_depth, choice_counts, choice_label, choice_token_counts, depth_histogram, depth_token_counts, entropy, extra_depth, group_records, layer_grad_norms, max_vio, router_stats, selected_fraction, to_floats, token_depth


class RouterTelemetry(L.Callback):
    """Logs, per router (record) and per router group, how tokens are routed.

    Training, every `log_every_n_steps` optimizer steps, from `pl_module.last_records` (no
    extra forward pass; nothing is computed on the other steps except the dead-token window,
    a few scatter ops without host sync):
      `router/<record>/selected_frac | load/<choice> | max_vio | logit_mean|std|max | aux/<term>
      | <router metric>`, `router/<group>/mean_depth | depth_entropy | dead_token_ratio |
      dead_position_ratio`, a depth histogram `router/<group>/depth`, and the per-layer
      gradient norms `grad_norm/embed|L0..|router|head` (before clipping).
    Validation, aggregated over the epoch with torchmetrics MeanMetric (the module itself logs
    `val/sampling_acc/*`): `val/router/<record>/selected_frac | load/<choice> | max_vio`,
    `val/router/<group>/mean_depth | depth_frac/depth<d> | depth_entropy`; the tokens most
    often routed to each depth / expert as a markdown table (`router/<group>/specialization`);
    and the depth picture of `sample_text` as an image (`router/<group>/depth_picture`) and as
    `<group>_<step>.png` / `.html` in the run's log dir.

    The TensorBoard-only parts (histogram, image, text) are skipped for other loggers.
    """

    def __init__(self, log_every_n_steps: int = 50, window: int = 500, sample_text: str = DEFAULT_TEXT,
                 top_tokens: int = 8, grad_norms: bool = True, depth_picture: bool = True) -> None:
        """Args:
            log_every_n_steps: log the training statistics every this many optimizer steps.
            window: training batches over which a token must be sent beyond the first step
                to count as alive (dead-token ratio).
            sample_text: the text of the depth picture drawn at each validation end.
            top_tokens: tokens listed per depth / expert in the specialization table.
            grad_norms: log per-layer gradient norms.
            depth_picture: draw the depth picture at validation end.
        """
        if log_every_n_steps < 1 or window < 1:
            raise ValueError(f"RouterTelemetry: log_every_n_steps={log_every_n_steps} and window={window} "
                             "must be >= 1")
        self.every, self.window, self.sample_text = log_every_n_steps, window, sample_text
        self.top_tokens, self.grad_norms, self.depth_picture = top_tokens, grad_norms, depth_picture
        self.dead: dict[str, DeadTokenTracker] = {}
        self._last_logged = -1
        self._val: dict[str, MeanMetric] = {}
        self._spec: dict[str, tuple[torch.Tensor, RouterRecord | None]] = {}  # name -> ((E, V) counts, choice rec)
        self.written: list[str] = []  # picture files written (for tests and users)

    # ------------------------------------------------------------------ training
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        records = getattr(pl_module, "last_records", None)
        if not records:
            return
        ids = batch["input_ids"]  # (B, T)
        groups = group_records(records)
        vocab = _vocab_size(pl_module)
        for g, recs in groups.items():  # every step: the window must see every batch (cheap, no sync)
            extra = extra_depth(recs)
            if extra is not None and vocab and extra.shape == ids.shape:
                self.dead.setdefault(g, DeadTokenTracker(self.window, vocab)).update(ids, extra)
        step = trainer.global_step
        if step % self.every or step == self._last_logged:
            return
        self._last_logged = step
        stats = {f"router/{k}": v for k, v in router_stats(records).items()}
        for g, tracker in self.dead.items():
            stats.update({f"router/{g}/{k}": v for k, v in tracker.ratios().items()})
        _log_scalars(trainer, to_floats(stats), step)
        for g, recs in groups.items():
            d = token_depth(recs)
            if d is not None:
                depth, mx = d
                edges = np.arange(-0.5, mx + 1.0)  # one bin per depth 0..max
                for exp in _tensorboards(trainer):
                    exp.add_histogram(f"router/{g}/depth", depth.flatten().cpu().numpy(), step, bins=edges)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step + 1  # the step this update completes (= global_step in on_train_batch_end)
        if not self.grad_norms or step % self.every:
            return
        norms = layer_grad_norms(getattr(pl_module, "model", pl_module))
        _log_scalars(trainer, to_floats({f"grad_norm/{k}": v for k, v in norms.items()}), step)

    # ---------------------------------------------------------------- validation
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val, self._spec = {}, {}

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        records = getattr(pl_module, "last_val_records", None)
        if trainer.sanity_checking or not records:
            return
        ids = batch["input_ids"]  # (B, T)
        vocab = _vocab_size(pl_module)
        for rec in records:
            p = f"val/router/{rec.name}/"
            frac = selected_fraction(rec)
            if frac is not None:
                self._mean(pl_module, p + "selected_frac", frac, ids.numel())
            counts = choice_counts(rec)
            if counts is not None:
                # weighting each batch's load by its assignments makes the epoch mean the epoch's load
                n = counts.sum()
                for i, c in enumerate(counts):
                    self._mean(pl_module, p + f"load/{choice_label(rec, i)}", c / n.clamp(min=1), n)
                # depth routers are tabled per depth, below; a router that saw gathered tokens
                # (an MoE inside a MoR step: (B, k, E)) cannot be mapped back to token ids
                if vocab and not adds_depth(rec) and rec.selected.shape[:2] == ids.shape:
                    self._count(rec.name, choice_token_counts(ids, rec, vocab), rec)
        for g, recs in group_records(records).items():
            d = token_depth(recs)
            if d is None:
                continue
            depth, mx = d
            self._mean(pl_module, f"val/router/{g}/mean_depth", depth.float().mean(), depth.numel())
            frac = depth_histogram(depth, mx).float() / depth.numel()
            for k, f in enumerate(frac):
                self._mean(pl_module, f"val/router/{g}/depth_frac/depth{k}", f, depth.numel())
            if vocab and depth.shape == ids.shape:
                self._count(g, depth_token_counts(ids, depth, mx, vocab), None)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        vals = {k: m.compute() for k, m in self._val.items()}  # every rank: MeanMetric syncs across ranks
        for prefix in {k.rsplit("/load/", 1)[0] for k in vals if "/load/" in k}:
            vals[f"{prefix}/max_vio"] = max_vio(torch.stack([v for k, v in vals.items()
                                                             if k.startswith(prefix + "/load/")]))
        for prefix in {k.rsplit("/depth_frac/", 1)[0] for k in vals if "/depth_frac/" in k}:
            vals[f"{prefix}/depth_entropy"] = entropy(torch.stack([v for k, v in vals.items()
                                                                   if k.startswith(prefix + "/depth_frac/")]))
        step = trainer.global_step
        _log_scalars(trainer, to_floats(vals), step)
        self._log_specialization(trainer, pl_module, step)
        if self.depth_picture:
            self._draw(trainer, pl_module, step)

    # ------------------------------------------------------------------ helpers
    def _mean(self, pl_module: L.LightningModule, tag: str, value: torch.Tensor, weight: Any) -> None:
        if tag not in self._val:
            self._val[tag] = MeanMetric().to(pl_module.device)
        self._val[tag].update(value.float(), torch.as_tensor(weight, dtype=torch.float, device=value.device))

    def _count(self, name: str, counts: torch.Tensor, rec: RouterRecord | None) -> None:
        old = self._spec.get(name)
        self._spec[name] = (counts if old is None else old[0] + counts, rec)

    def _tokenizer(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        tok = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tok is None and getattr(pl_module, "tokenizer_json", None):
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(pl_module.tokenizer_json)
        return tok

    @rank_zero_only
    def _log_specialization(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        exps = _tensorboards(trainer)
        tok = self._tokenizer(trainer, pl_module)
        if not exps or tok is None:
            return
        for name, (counts, rec) in self._spec.items():
            md = specialization_table(counts, tok, self.top_tokens, rec)
            for exp in exps:
                exp.add_text(f"router/{name}/specialization", md, step)

    @rank_zero_only
    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        tok, model = self._tokenizer(trainer, pl_module), getattr(pl_module, "model", None)
        if tok is None or model is None or not hasattr(model, "cfg"):
            return
        out_dir = trainer.log_dir or trainer.default_root_dir
        for g, (png, page, img) in write_depth_pictures(model, tok, self.sample_text, out_dir, f"_{step}").items():
            self.written += [str(png), str(page)]
            for exp in _tensorboards(trainer):
                exp.add_image(f"router/{g}/depth_picture", np.asarray(img), step, dataformats="HWC")

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"dead": {g: t.state_dict() for g, t in self.dead.items()}, "last_logged": self._last_logged}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last_logged = state.get("last_logged", -1)
        for g, s in state.get("dead", {}).items():
            if s.get("seen") is not None:
                t = DeadTokenTracker(self.window, s["seen"].numel())
                t.load_state_dict(s)
                self.dead[g] = t


def specialization_table(counts: torch.Tensor, tokenizer: Any, top: int, rec: RouterRecord | None) -> str:
    """counts (E, V): a markdown table, one row per depth / expert, its `top` most frequent tokens.

    Each token shows its count and its share: the fraction of that token's occurrences
    (assignments, for top-k routers) that went to this row.
    """
    counts = counts.cpu()
    totals = counts.sum(0).clamp(min=1)  # (V,) occurrences of each token over all rows
    experts = rec is not None and not rec.is_depth
    head, n = ("expert", "assignments") if experts else ("depth", "tokens")
    lines = [f"| {head} | {n} | top tokens: count (share of the token's occurrences) |", "|---|---|---|"]
    for i, row in enumerate(counts):
        label = choice_label(rec, i) if rec is not None else f"depth{i}"
        if row.sum() == 0:
            continue
        vals, idx = row.topk(min(top, int((row > 0).sum())))
        cells = [f"`{_show(tokenizer.decode([int(t)]))}` {int(v)} ({float(v) / float(totals[t]):.0%})"
                 for v, t in zip(vals, idx)]
        lines.append(f"| {label} | {int(row.sum())} | {', '.join(cells)} |")
    return "\n".join(lines)


def _show(s: str) -> str:
    return s.replace("\n", "\\n").replace("|", "\\|").replace("`", "'") or "\u00b7"


def _vocab_size(pl_module: L.LightningModule) -> int | None:
    cfg = getattr(getattr(pl_module, "model", None), "cfg", None)
    return getattr(cfg, "vocab_size", None)


def _tensorboards(trainer: L.Trainer) -> list[Any]:
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def _log_scalars(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    # straight to the loggers: self.log would tie our interval to the trainer's log_every_n_steps
    if not metrics:
        return
    for lg in trainer.loggers:
        lg.log_metrics(metrics, step=step)
