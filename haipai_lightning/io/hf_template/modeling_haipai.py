"""transformers model for a Haipai export: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

The network is haipai_lightning's own HaipaiModel (Mixture-of-Recursions routing, quantized
layers and all), so `pip install haipai` must be importable; this file only adapts it to the
transformers API: logits / loss as CausalLMOutputWithPast, and `generate()` (greedy, sampling,
beam search...) by re-running the prefix each step (MoR's per-recursion caches are not
transformers caches; use haipai's own `generate` for cached decoding).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_haipai import HaipaiConfig


class HaipaiForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HaipaiConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_cache_class = False

    def __init__(self, config: HaipaiConfig, model: torch.nn.Module | None = None):
        super().__init__(config)
        if model is None:
            from haipai_lightning.io.spec import build_component
            from haipai_lightning.config import ModelConfig
            from haipai_lightning.model.decoder import HaipaiModel
            from haipai_lightning.quant.methods import QuantSpec, quantize_model

            arch = config.haipai["arch"]
            model = HaipaiModel(ModelConfig.from_dict(arch["config"]),
                                *(build_component(arch.get(k)) for k in ("mixer", "mlp", "router")))
            if config.haipai.get("quantization"):
                quantize_model(model, QuantSpec.from_dict(config.haipai["quantization"]), inplace=True,
                               structure_only=True)
        self.model = model
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        """Load through haipai's own checked loader (sizes + sha256, aliases of tied tensors)."""
        from haipai_lightning.io.export import load_pretrained

        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):  # a Hub repository id
            from huggingface_hub import snapshot_download

            path = snapshot_download(path)
        model, _ = load_pretrained(path)
        if not isinstance(config, HaipaiConfig):
            config = HaipaiConfig.from_pretrained(path)
        return cls(config, model=model).eval()

    def _init_weights(self, module):  # weights come from the export
        pass

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids (B, T) -> logits (B, T, V); labels (B, T) give the shifted next-token loss.

        attention_mask is accepted for API compatibility: rows must not be padded (MoR's causal
        routing has no notion of padding tokens), so a mask with zeros is refused."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask: padded rows are not supported by Haipai models; "
                             "generate one row at a time (or rows of equal length)")
        logits = self.model(input_ids).logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs) -> dict:
        return {"input_ids": input_ids}
