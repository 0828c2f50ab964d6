"""A short 2-process DDP fit on CPU (gloo), run by tests/test_distributed.py as a script.

Lightning's "ddp" strategy starts the second process by running this script again with
LOCAL_RANK=1; each rank writes what it saw to <out>/rank<r>.json.
"""

import json
import os
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from datamodules import TextDataModule  # noqa: E402
from haipai_lightning.config import ModelConfig  # noqa: E402
from haipai_lightning.train.module import MoRLightningModule  # noqa: E402
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter  # noqa: E402

DATA = dict(source="kjv", seq_len=32, batch_size=8, vocab_size=512, max_documents=60, val_fraction=0.05, seed=3)


class Record(L.Callback):
    def __init__(self, out):
        self.out, self.losses, self.first_rows = out, [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())
        if self.first_rows is None:
            self.first_rows = batch["input_ids"][:, :4].tolist()

    def on_train_end(self, trainer, pl_module):
        checksum = sum(float(p.double().sum()) for p in pl_module.parameters())
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"losses": self.losses, "checksum": checksum, "first_rows": self.first_rows,
                       "world_size": trainer.world_size}, f)


def main(out: str, cache: str, steps: int) -> None:
    torch.set_num_threads(1)  # two processes share the two cores
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=512, d_model=64, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                         max_seq_len=64, n_recursions=3, sharing="middle_cycle")
    opt = lambda p: torch.optim.AdamW(p, lr=3e-3)  # noqa: E731
    module = MoRLightningModule(config=config, router=ExpertChoiceRouter, optimizer=opt)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=out,
                        callbacks=[Record(out)])
    trainer.fit(module, datamodule=TextDataModule(**DATA, cache_dir=cache))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
