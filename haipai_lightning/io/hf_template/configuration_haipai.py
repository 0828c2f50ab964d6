"""transformers config for a Haipai export (custom code: load with trust_remote_code=True)."""

from transformers import PretrainedConfig


class HaipaiConfig(PretrainedConfig):
    """Holds the Haipai architecture under `haipai` (see haipai_lightning/io/export.py)."""

    model_type = "haipai"

    def __init__(self, haipai: dict | None = None, **kwargs):
        self.haipai = haipai or {}
        super().__init__(**kwargs)
