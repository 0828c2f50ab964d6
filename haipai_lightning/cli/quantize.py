"""`haipai quantize`: post-training quantization report of a checkpoint (imports stay lazy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from haipai_lightning.cli.export import export_command
from haipai_lightning.io.export import check_replaceable
from haipai_lightning.config import ConfigError


def _data_batches(ckpt_path: str, data: str | None, n: int, n_calib: int = 0) -> tuple[list[dict], list[dict]]:
    """(the first n validation batches, the first n_calib training batches) of the data module the checkpoint
    was trained with: the calibrated methods (GPTQ, GuidedQuant, SpinQuant) learn from training text and
    are judged on held-out text."""
    import yaml

    from datamodules import TextDataModule

    cfg_path = Path(data) if data else Path(ckpt_path).resolve().parent.parent / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"--data: no run config at {str(cfg_path)!r} (LightningCLI writes config.yaml in the run "
                          "directory); pass --data path/to/config.yaml with a data: section")
    section = (yaml.safe_load(cfg_path.read_text()) or {}).get("data") or {}
    section = section.get("init_args", section)
    section = {k: v for k, v in section.items() if k != "class_path"}
    dm = TextDataModule(**section)
    dm.prepare_data()
    dm.setup("fit" if n_calib else "validate")
    batches = []
    for b in dm.val_dataloader():
        batches.append(b)
        if len(batches) >= n:
            break
    calib = []
    if n_calib:
        for b in dm.train_dataloader():
            calib.append(b)
            if len(calib) >= n_calib:
                break
    return batches, calib


def quantize_command(
    ckpt_path: str,
    method: str = "all",
    data: str | None = None,
    val_batches: int = 8,
    calib_batches: int = 4,
    decode_tokens: int = 32,
    out: str | None = None,
    overwrite: bool = False,
    log_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Quantize a checkpoint and report perplexity, size on disk and decode speed per method.

    Args:
        ckpt_path: a Haipai .ckpt (e.g. lightning_logs/version_0/checkpoints/last.ckpt).
        method: one of int8, int8_dynamic, int4, int4_rotated, kv8, kv4, w4a4, w4a4_rotated, w4a4kv4,
            a comma-separated list of them, or "all".
        data: the run config whose data: section gives the validation set (default: config.yaml of
            the checkpoint's run directory).
        val_batches: validation batches the perplexities are measured on.
        calib_batches: training batches the calibrated methods (GPTQ, GuidedQuant, SpinQuant) calibrate on.
        decode_tokens: tokens generated (batch 1, greedy) to time decoding.
        out: export directory for the quantized model (one method only); it must not exist.
        overwrite: replace --out when it is a Haipai export (never another directory).
        log_dir: TensorBoard directory for the report (default: <run dir>/quantization).
    """
    from haipai_lightning.io.loader import load_model
    from haipai_lightning.eval.quant_report import evaluate_methods, format_table, log_tensorboard
    from haipai_lightning.quant.methods import METHODS, get_method

    names = [m for m in METHODS if m != "fp32"] if method == "all" else [m.strip() for m in method.split(",")]
    for name in names:
        get_method(name)
    if val_batches < 1 or decode_tokens < 1 or calib_batches < 1:
        raise ConfigError(f"--val_batches {val_batches}, --calib_batches {calib_batches} and --decode_tokens "
                          f"{decode_tokens} must be >= 1")
    if out is not None:
        if len(names) != 1:
            raise ConfigError(f"--out writes one quantized model; pass a single --method (got {len(names)})")
        check_replaceable(Path(out).absolute(), overwrite)  # before the long work, and never a foreign directory
    model, tok = load_model(ckpt_path)
    calibrated = any(get_method(n).solver != "rtn" or get_method(n).rotation != "hadamard" for n in names)
    batches, calib = _data_batches(ckpt_path, data, val_batches, calib_batches if calibrated else 0)
    rows = evaluate_methods(model, names, batches, new_tokens=decode_tokens, calib=calib or None)
    print(format_table(rows))
    from torch.utils.tensorboard import SummaryWriter

    tb = Path(log_dir) if log_dir else Path(ckpt_path).resolve().parent.parent / "quantization"
    with SummaryWriter(str(tb)) as writer:
        log_tensorboard(writer, rows)
    print(f"[TensorBoard: tensorboard --logdir {tb}]")
    if out is not None:
        export_command(ckpt_path, out, method=names[0], overwrite=overwrite)
    return [r.as_row() for r in rows]
