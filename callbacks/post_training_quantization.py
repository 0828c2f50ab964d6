"""PostTrainingQuantization: at the end of `fit`, quantize the trained model by each method and report.

For every method: validation perplexity before / after, size on disk, CPU decode tokens/s before /
after (haipai_lightning/eval/quant_report.py), printed as a table and logged to TensorBoard
(`quantization/<method>/...` scalars and the table under TEXT). With `export_dir`, each quantized
model is also written as an export directory (`haipai_lightning/io/export.py`).

```yaml
trainer:
  callbacks:
    - class_path: callbacks.PostTrainingQuantization
      init_args: {methods: [int8, int4, int4_rotated, w4a4kv4], val_batches: 8}
```
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from haipai_lightning.config import ConfigError
from haipai_lightning.eval.quant_report import MethodReport, evaluate_methods, format_table, log_tensorboard
from haipai_lightning.quant.methods import get_method


class PostTrainingQuantization(L.Callback):
    def __init__(self, methods: list[str] | None = None, val_batches: int = 8, decode_tokens: int = 32,
                 export_dir: str | None = None, calib_batches: int = 4) -> None:
        """Args:
            methods: names from haipai_lightning.quant.methods.METHODS (default int8, int8_dynamic, int4,
                int4_rotated, kv4, w4a4kv4).
            val_batches: validation batches the perplexities are measured on.
            decode_tokens: tokens generated (batch 1, greedy) to time decoding.
            export_dir: when set, write every quantized model to export_dir/<method>.
            calib_batches: training batches the calibrated methods (GPTQ, GuidedQuant, SpinQuant) calibrate
                on (never the validation batches they are judged on).
        """
        self.methods = list(methods or ["int8", "int8_dynamic", "int4", "int4_rotated", "kv4", "w4a4kv4"])
        for m in self.methods:
            get_method(m)  # unknown names fail at construction, before training
        if val_batches < 1 or calib_batches < 1:
            raise ConfigError(f"PostTrainingQuantization val_batches={val_batches} and calib_batches={calib_batches} "
                              "must be >= 1")
        self.calib_batches = calib_batches
        self.val_batches, self.decode_tokens, self.export_dir = val_batches, decode_tokens, export_dir
        self.rows: list[MethodReport] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse, before training, methods the model cannot take (rotations of MoE / MoT MLPs)."""
        model = getattr(pl_module, "model", None)
        routed = [i for i, layer in enumerate(getattr(model, "layers", [])) if getattr(layer.mlp, "routed", False)]
        # every weight solver stores experts (quant/qexperts.py); the rotation cannot fuse into expert stacks
        rotated = [m for m in self.methods if get_method(m).rotate]
        if stage == "fit" and routed and rotated:
            raise ConfigError(
                f"callbacks.PostTrainingQuantization methods {rotated} rotate the residual stream, which this "
                f"model's routed MLPs (MoE / Mixture-of-Tokens in layers {routed}) do not support; "
                "use methods without rotation (int8, int4, int4_gptq, kv8, ...)"
            )

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None:
            raise ConfigError("PostTrainingQuantization needs a data module with a val_dataloader (data: in the config)")
        batches = []
        for b in dm.val_dataloader():
            batches.append({k: v.cpu() for k, v in b.items()})
            if len(batches) >= self.val_batches:
                break
        calib = None
        if any(get_method(m).solver != "rtn" or get_method(m).rotation != "hadamard" for m in self.methods):
            calib = []
            for b in dm.train_dataloader():
                calib.append({k: v.cpu() for k, v in b.items()})
                if len(calib) >= self.calib_batches:
                    break
        model = copy.deepcopy(pl_module.model).cpu().eval()  # the trained module stays where it is
        self.rows = evaluate_methods(model, self.methods, batches, new_tokens=self.decode_tokens, calib=calib)
        print("post-training quantization (ppl on", len(batches), "validation batches):")
        print(format_table(self.rows))
        writer = getattr(trainer.logger, "experiment", None)
        if writer is not None and hasattr(writer, "add_scalar"):
            log_tensorboard(writer, self.rows, trainer.global_step)
        if self.export_dir:
            from haipai_lightning.io.export import save_pretrained
            from haipai_lightning.quant.methods import quantize_model

            for m in self.methods:
                # arch=None: the specs of the model's own factories -- after growth, the grown ones
                # (pl_module.arch keeps the base architecture, which the growth log replays on load)
                save_pretrained(quantize_model(model, m, calib=calib), Path(self.export_dir) / m, arch=None,
                                tokenizer_json=pl_module.tokenizer_json, overwrite=True)
