"""`haipai export`: a checkpoint (optionally quantized) as a safetensors + config.json directory."""

from __future__ import annotations

from pathlib import Path

from haipai_lightning.io.export import check_replaceable


def export_command(ckpt_path: str, out: str, method: str | None = None, overwrite: bool = False) -> str:
    """Export a checkpoint as safetensors + config.json + tokenizer.json (loadable without pickle by
    HaipaiModel.from_pretrained and by transformers with trust_remote_code=True).

    Args:
        ckpt_path: a Haipai .ckpt.
        out: the export directory to create.
        method: quantize first by this method (e.g. int8, int4_rotated); null = the fp32 weights.
        overwrite: replace --out when it is a Haipai export holding only the files it wrote (never another directory).
    """
    from haipai_lightning.io.checkpoint import CHECKPOINT_KEY, load_checkpoint_file
    from haipai_lightning.io.export import save_pretrained
    from haipai_lightning.io.loader import load_model
    from haipai_lightning.quant.methods import quantize_model

    check_replaceable(Path(out).absolute(), overwrite)  # fail before loading anything
    model, _ = load_model(ckpt_path)  # a grown checkpoint comes back grown (growth log replayed)
    meta = load_checkpoint_file(ckpt_path)[CHECKPOINT_KEY]
    if method is not None:
        model = quantize_model(model, method)
    # the component specs come from the factories the (replayed) model was built with
    path = save_pretrained(model, out, tokenizer_json=meta.get("tokenizer"), overwrite=overwrite)
    print(path)
    return str(path)
