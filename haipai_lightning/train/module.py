"""MoRLightningModule: builds a HaipaiModel from injected factories, assembles the loss, logs.

The YAML swaps components by `class_path` (LightningCLI dependency injection):

    model:
      config: {d_model: 192, n_layers: 5, n_recursions: 3, sharing: middle_cycle}
      router: {class_path: haipai_lightning.FullRecursion}
      optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 3e-3, weight_decay: 0.1}}
      lr_scheduler: {class_path: haipai_lightning.TrapezoidLR, init_args: {warmup_steps: 50}}
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from haipai_lightning.grow.arch import replay_arch
from haipai_lightning.io.arch import COMPONENTS, arch_diff, build_model, make_arch
from haipai_lightning.io.checkpoint import CHECKPOINT_KEY, load_checkpoint_file
from haipai_lightning.io.loader import checkpoint_meta
from haipai_lightning.io.spec import build_component, component_spec
from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.decoder import HaipaiModel, ModelOutput
from haipai_lightning.train.schedules import TrapezoidLR, optimizer_state_bytes, param_groups
from haipai_lightning.model.routing.record import RouterRecord

ComponentFactory = Callable[[ModelConfig], nn.Module]


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


class MoRLightningModule(L.LightningModule):
    def __init__(
        self,
        config: ModelConfig = ModelConfig(),
        mixer: ComponentFactory | None = None,
        mlp: ComponentFactory | None = None,
        router: ComponentFactory | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        """A Mixture-of-Recursions language model and its training step.

        Args:
            config: the architecture (ModelConfig): sizes, sharing strategy, recursion count.
            mixer: token mixer factory, class_path of a module taking the ModelConfig
                (default haipai_lightning.Attention).
            mlp: channel MLP factory (default haipai_lightning.SwiGLU).
            router: depth router factory (default haipai_lightning.FullRecursion:
                every token runs every recursion).
            optimizer: optimizer class_path/init_args; it receives decay / no-decay parameter groups.
            lr_scheduler: LR scheduler class_path/init_args (e.g. haipai_lightning.TrapezoidLR),
                stepped every optimizer step; None = constant LR.
            compile: run the model's forward through torch.compile.
            activation_checkpointing: recompute the recursion blocks' activations in the backward
                (torch.utils.checkpoint per layer application): less memory, ~one more forward.
        """
        super().__init__()
        self.save_hyperparameters()
        # The CLI gives plain dicts here; direct Python use may pass objects. Keep the
        # stored hparams plain so checkpoints load with weights_only=True.
        for k, v in list(self.hparams.items()):
            self.hparams[k] = _plain(v)
        if isinstance(config, dict):  # e.g. rebuilt from a checkpoint
            config = ModelConfig.from_dict(config)
        self.config = config
        self.arch: dict[str, Any] = make_arch(config, mixer, mlp, router)  # the base architecture
        self.growth_log: list[dict[str, Any]] = []
        self.model = HaipaiModel(config, *(build_component(self.arch[k], f"model.{k}") for k in COMPONENTS))
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.model.activation_checkpointing = activation_checkpointing
        self._forward = torch.compile(self.model) if compile else self.model
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity(ignore_index=-100)
        self.last_records: list[RouterRecord] = []  # the last training step's routing, for telemetry
        self._t_last: float | None = None
        self.tokenizer_json: str | None = None

    # ----------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, **kw: Any) -> ModelOutput:
        return self._forward(input_ids, **kw)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, ModelOutput]:
        out = self(batch["input_ids"])
        lm = F.cross_entropy(out.logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
        total = lm + sum(out.aux_losses.values(), torch.zeros((), device=lm.device))
        head = getattr(self.model.router, "budget_head", None)
        if head is not None and self.training:  # the budget head fits each sequence's loss at its budget
            fit = head.fit_loss(per_sequence_loss(out.logits, batch["labels"]))
            if fit is not None:
                out.aux_losses["budget/fit"] = fit
                total = total + fit
        return total, lm, out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        total, lm, out = self._loss(batch)
        # the routing of this step, for telemetry / FLOP counting; detached so no graph is kept alive
        self.last_records = [dataclasses.replace(r, aux_losses={k: v.detach() for k, v in r.aux_losses.items()})
                             for r in out.records]
        self.log("train/loss", lm, prog_bar=True)
        self.log("train/ppl", torch.exp(lm.detach()))
        for name, v in out.aux_losses.items():
            self.log(f"train/aux/{name}", v)
        log_budget(self, "train", out.records)
        if out.aux_losses:
            self.log("train/total_loss", total)
        return total

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # tokens/s over the wall time between consecutive batches (data loading included)
        now = time.perf_counter()
        if self._t_last is not None:
            tps = batch["input_ids"].numel() / max(now - self._t_last, 1e-9)
            self.log("train/tokens_per_s", tps, prog_bar=True, reduce_fx="mean")
        self._t_last = now

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # optimizer state is created at the first step; its size is what GaLore / 8-bit optimizers save
        for i, opt in enumerate(self.trainer.optimizers):  # a walk over the state dicts: microseconds
            self.log(f"train/optimizer_state_bytes{'' if i == 0 else i}", float(optimizer_state_bytes(opt)))

    def on_train_epoch_start(self) -> None:
        self._t_last = None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _, lm, out = self._loss(batch)
        self.last_val_records = out.records  # this batch's routing, for telemetry (no grad in validation)
        n = (batch["labels"] != -100).sum()
        self.val_loss.update(lm, weight=n)
        self.val_ppl.update(out.logits.float(), batch["labels"])
        for rec in out.records:  # causal threshold routing vs the top-k it imitates
            if "sampling_acc" in rec.metrics:
                self.log(f"val/sampling_acc/{rec.name}", rec.metrics["sampling_acc"], on_step=False, on_epoch=True)
        log_budget(self, "val", out.records)
        self.log("val/loss", self.val_loss, prog_bar=True, on_step=False, on_epoch=True)
        self.log("val/ppl", self.val_ppl, on_step=False, on_epoch=True)

    test_step = validation_step

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-block mean negative log-likelihood (nats) and the model's greedy next tokens."""
        out = self(batch["input_ids"])
        nll = F.cross_entropy(out.logits.transpose(1, 2).float(), batch["labels"], ignore_index=-100, reduction="none")
        return {"nll": nll.mean(1), "argmax": out.logits.argmax(-1)}

    # ---------------------------------------------------------------- optim
    def configure_optimizers(self) -> Any:
        for name, f in (("optimizer", self.optimizer_factory), ("lr_scheduler", self.scheduler_factory)):
            if f is not None and not callable(f):  # e.g. a spec dict read back from a checkpoint's hyperparameters
                raise ConfigError(f"model.{name} is {f!r}, a spec read from a file: Haipai does not import what a "
                                  f"file names; pass {name}= a class or callable (the YAML's model.{name})")
        try:
            opt = self.optimizer_factory(param_groups(self.model))
        except ValueError as e:  # torch's own checks: "Invalid learning rate: -1.0", betas, eps, ...
            field = next((f for k, f in (("learning rate", "lr"), ("beta", "betas"), ("epsilon", "eps"),
                                          ("weight_decay", "weight_decay")) if k in str(e)), None)
            where = f"model.optimizer.init_args.{field}" if field else "model.optimizer.init_args"
            raise ConfigError(f"{where}: {e}; fix it in the config or on the command line") from e
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt)
        if isinstance(sched, TrapezoidLR) and sched.total_steps is None:
            sched.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --------------------------------------------------------------- lifecycle
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        if tok is not None:
            if tok.get_vocab_size() > self.config.vocab_size:
                raise ConfigError(
                    f"the tokenizer has {tok.get_vocab_size()} tokens but model.config.vocab_size="
                    f"{self.config.vocab_size}; set data.vocab_size (or model.config.vocab_size) >= {tok.get_vocab_size()}"
                )
            self.tokenizer_json = tok.to_str()
        seq_len = getattr(dm, "seq_len", None)
        if seq_len is not None and seq_len > self.config.max_seq_len:
            raise ConfigError(
                f"data.seq_len={seq_len} exceeds model.config.max_seq_len={self.config.max_seq_len}; "
                "raise max_seq_len or lower seq_len"
            )

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, **kwargs: Any) -> "MoRLightningModule":
        """Lightning's load_from_checkpoint, minus what would run code named by the file.

        Lightning imports and calls the `_instantiator` a checkpoint's hyper_parameters name (LightningCLI
        writes one) and builds the module from the saved hyperparameters. Here the file is read with
        weights_only=True, `_instantiator` / `_class_path` are dropped, and the module is built from plain
        data: component specs resolve through the allowlist, optimizer / scheduler specs stay data.
        """
        import io

        kwargs.pop("weights_only", None)  # always True here
        ckpt = load_checkpoint_file(checkpoint_path, map_location or "cpu")
        hp = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
        ckpt["hyper_parameters"] = hp
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        buf.seek(0)
        return super().load_from_checkpoint(buf, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, weights_only=True, **kwargs)

    def on_fit_start(self) -> None:
        n = self.model.num_parameters()
        rank_zero_info(
            f"Haipai model: {n['unique'] / 1e6:.2f}M unique parameters, {n['effective'] / 1e6:.2f}M effective "
            f"(n_layers={self.config.n_layers}, n_recursions={self.config.n_recursions}, sharing={self.config.sharing})"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "format": 1,
            "arch": self.arch,
            "growth": list(self.growth_log),
            "tokenizer": self.tokenizer_json,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint_meta(checkpoint)
        diffs = arch_diff(saved["arch"], self.arch)
        if diffs:
            raise ConfigError(
                "the checkpoint has another architecture: " + "; ".join(diffs[:4])
                + " -- use the config the checkpoint was trained with (its run dir holds config.yaml)"
            )
        self.tokenizer_json = self.tokenizer_json or saved.get("tokenizer")
        log = saved["growth"]
        if log or self.growth_log:  # grown: replay the growth log on the base architecture before the state dict
            self.install_model(build_model(replay_arch(self.arch, log), device=self.device))
        self.growth_log = [dict(e) for e in log]

    def install_model(self, model: HaipaiModel) -> None:
        """Swap in another model (a grown one), keeping compile and activation checkpointing; self.arch stays
        the base architecture, self.config becomes the model's."""
        model.activation_checkpointing = getattr(self.model, "activation_checkpointing", False)
        self.model, self.config = model, model.cfg
        self._forward = torch.compile(model) if self.hparams.get("compile") else model


def per_sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each sequence: logits (B, T, V), labels (B, T) -> (B,)."""
    nll = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=-100, reduction="none")
    return nll.sum(1) / (labels != -100).sum(1).clamp(min=1)


def log_budget(module: L.LightningModule, split: str, records: list[RouterRecord]) -> None:
    """Budget telemetry (model/budget.py): requested vs realised compute, `<split>/budget/...`."""
    for rec in records:
        if rec.group == "budget":
            for k, v in rec.metrics.items():
                module.log(f"{split}/budget/{k}", v, on_step=split == "train", on_epoch=split != "train")


def _plain(v: Any) -> Any:
    """Make a hyperparameter value storable with weights_only=True (no pickled objects)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return dataclasses.asdict(v)
    try:
        return component_spec(v)
    except ConfigError:
        return repr(v)
