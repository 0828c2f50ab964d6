"""Portable exports: one directory with safetensors weights, a JSON config and tokenizer.json.

    out/
      model.safetensors        every tensor of the (optionally quantized) model, keys "model.<name>";
                               a tensor shared by two names (tied embeddings) is stored once
      config.json              Hugging Face-style config; its "haipai" object holds the architecture,
                               the quantization spec, the tensor aliases and every file's size + sha256
      tokenizer.json           the tokenizers BPE (when the model has one)
      tokenizer_config.json    for transformers' PreTrainedTokenizerFast
      configuration_haipai.py, modeling_haipai.py   transformers custom code (trust_remote_code)

`HaipaiModel.from_pretrained(dir)` / `load_pretrained(dir)` read it without pickle, and
`transformers.AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` reads the same
directory. It is written into a temporary sibling directory and renamed into place, so a reader
never sees half an export; a file that is missing, truncated or altered afterwards fails the
size / sha256 check with a message saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from haipai_lightning.io.arch import COMPONENTS, normalize_arch
from haipai_lightning.io.spec import build_component, component_spec
from haipai_lightning.config import ConfigError, ModelConfig

FORMAT = "haipai-export-v1"
WEIGHTS = "model.safetensors"
PREFIX = "model."  # the transformers wrapper holds the HaipaiModel as `.model`
_TEMPLATE = Path(__file__).with_name("hf_template")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop names whose tensor is another name's (tied weights): (tensors, {alias: stored name})."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def save_pretrained(model: nn.Module, out: str | os.PathLike, arch: dict[str, Any] | None = None,
                    tokenizer_json: str | None = None, overwrite: bool = False,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write `model` (a HaipaiModel, quantized or not) as an export directory; returns its path.

    arch: the component specs {"mixer", "mlp", "router"} (class_path/init_args) as a checkpoint
    stores them (default: model.haipai_arch, set by load_pretrained, else the specs of the
    factories the model was built with, model.factories).
    """
    from safetensors.torch import save_file

    out = Path(out).absolute()
    check_replaceable(out, overwrite)
    arch = getattr(model, "haipai_arch", None) if arch is None else arch
    if arch is None and getattr(model, "factories", None) is not None:  # the factories the model was built with
        arch = {k: component_spec(v) for k, v in model.factories.items()}
    if arch is None:
        raise ConfigError("save_pretrained needs the component specs: pass arch= (MoRLightningModule.arch, or a "
                          "checkpoint's ['haipai']['arch'])")
    spec = getattr(model, "quant_spec", None)
    tensors, aliases = _dedupe({PREFIX + k: v for k, v in model.state_dict().items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # new and ours: safe to remove
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; an export directory gets the usual permissions
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "haipai": FORMAT})
        if tokenizer_json:
            (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                 "model_max_length": model.cfg.max_seq_len}, indent=2))
        for name in ("configuration_haipai.py", "modeling_haipai.py"):
            shutil.copyfile(_TEMPLATE / name, tmp / name)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        haipai = {
            "format": FORMAT,
            "arch": {"config": model.cfg.to_dict(), **{k: arch.get(k) for k in ("mixer", "mlp", "router")}},
            "quantization": spec.to_dict() if spec is not None else None,
            "aliases": aliases,
            "files": files,
            **(extra or {}),
        }
        config = {
            "model_type": "haipai",
            "architectures": ["HaipaiForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_haipai.HaipaiConfig",
                         "AutoModelForCausalLM": "modeling_haipai.HaipaiForCausalLM"},
            "vocab_size": model.cfg.vocab_size,
            "hidden_size": model.cfg.d_model,
            "num_hidden_layers": model.cfg.n_layers,
            "max_position_embeddings": model.cfg.max_seq_len,
            "tie_word_embeddings": False,  # tying lives in the model itself (and in "aliases")
            "torch_dtype": "float32",
            "haipai": haipai,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))  # last: its presence = complete
        if out.exists():  # overwrite: move the old export aside first, so the rename is atomic
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old)  # onto the empty directory we just made
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_replaceable(out: Path, overwrite: bool) -> None:
    """May an export be written at `out`? Haipai never deletes what it did not write: an existing path is
    replaced only with overwrite, only when it is a complete Haipai export, and only when it holds
    nothing but the files that export wrote."""
    if out == Path.cwd() or out in Path.cwd().parents or out.parent == out:
        raise ConfigError(f"--out {str(out)!r} is the current directory or one above it; give a new directory, "
                          "e.g. --out exports/my_model")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ConfigError(f"--out {str(out)!r} exists; pass --overwrite true to replace the Haipai export there, "
                          "or choose another --out")
    if out.is_symlink() or not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is not a directory; --overwrite replaces only a Haipai export")
    try:
        meta = json.loads((out / "config.json").read_text())["haipai"]
        ours = set(meta["files"]) | {"config.json"}
        assert meta["format"] == FORMAT
    except Exception:
        raise ConfigError(f"--out {str(out)!r} is not a Haipai export (no config.json of format {FORMAT}); "
                          "Haipai never deletes what it did not write: choose another --out") from None
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if foreign:
        raise ConfigError(f"--out {str(out)!r} holds files the export did not write ({', '.join(foreign[:5])}); "
                          "move them away or choose another --out: Haipai never deletes what it did not write")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json's "haipai" object, after checking every file's size and sha256."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"export directory {str(path)!r} does not exist; write one with `haipai export`")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{str(path)!r} is not a complete Haipai export (no config.json, which is written last): "
                          "an export was interrupted or this is another kind of directory; re-run `haipai export`")
    try:
        meta = json.loads(cfg_file.read_text())["haipai"]
        assert meta["format"] == FORMAT
    except Exception as e:
        raise ConfigError(f"{str(cfg_file)!r} is not a {FORMAT} config ({type(e).__name__}: {e}); "
                          "re-run `haipai export`") from e
    files = meta.get("files")
    if not isinstance(files, dict) or not all(isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")
                                              for n in files):
        raise ConfigError(f"{str(cfg_file)!r}: its file list is malformed (names must be plain file names); "
                          "re-run `haipai export`")
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise ConfigError(f"export {str(path)!r} is incomplete: {name} is missing; re-run `haipai export`")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise ConfigError(f"export {str(path)!r} is corrupted: {name} has {size} bytes but config.json "
                              f"records {info['bytes']} (truncated or partly copied?); copy it again or re-run "
                              "`haipai export`")
        if _sha256(f) != info["sha256"]:
            raise ConfigError(f"export {str(path)!r} is corrupted: the sha256 of {name} differs from the one "
                              "config.json records; copy it again or re-run `haipai export`")
    return meta


def load_pretrained(path: str | os.PathLike, map_location: str = "cpu") -> tuple[nn.Module, Any]:
    """(HaipaiModel in eval mode, tokenizers.Tokenizer or None) from an export directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from haipai_lightning.model.decoder import HaipaiModel
    from haipai_lightning.quant.methods import QuantSpec, quantize_model

    path = Path(path)
    meta = read_config(path)
    # config.json is not covered by its own hashes: its architecture is checked like a checkpoint's
    arch = normalize_arch(meta.get("arch"), f"export {str(path)!r}")
    model = HaipaiModel(ModelConfig.from_dict(arch["config"]),
                        *(build_component(arch.get(k), f"export model.{k}") for k in COMPONENTS))
    if meta.get("quantization"):
        try:
            qspec = QuantSpec.from_dict(meta["quantization"])
        except (TypeError, KeyError, ValueError) as e:
            raise ConfigError(f"export {str(path)!r}: its quantization spec is malformed ({e}); re-run `haipai export`") from e
        quantize_model(model, qspec, inplace=True, structure_only=True)
    try:
        tensors = load_file(str(path / WEIGHTS), device=map_location)
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{str(path / WEIGHTS)!r} cannot be read ({e}); re-run `haipai export`") from e
    for alias, stored in (meta.get("aliases") or {}).items():
        if stored not in tensors:
            raise ConfigError(f"export {str(path)!r}: alias {alias!r} names a missing tensor; re-run `haipai export`")
        tensors[alias] = tensors[stored]
    state = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"export {str(path)!r} does not match its config: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}; re-run `haipai export` with this version of haipai")
    model.haipai_arch = {k: arch.get(k) for k in ("mixer", "mlp", "router")}
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    return model.eval(), tokenizer
