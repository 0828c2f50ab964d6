"""`haipai visualize`: a text coloured by each token's recursion depth (PNG + HTML)."""

from __future__ import annotations

from haipai_lightning.analysis.depth_picture import DEFAULT_TEXT
from haipai_lightning.config import ConfigError


def visualize_command(
    ckpt_path: str,
    text: str = DEFAULT_TEXT,
    out: str = ".",
) -> list[str]:
    """Draw a text with every token coloured by its recursion depth (PNG + HTML).

    Args:
        ckpt_path: a Haipai .ckpt (e.g. lightning_logs/version_0/checkpoints/last.ckpt).
        text: the text to route (truncated to the model's max_seq_len tokens).
        out: directory for depth.png / depth.html (one pair per router group: mod.png for Mixture-of-Depths).
    """
    from haipai_lightning.analysis.depth_picture import write_depth_pictures
    from haipai_lightning.io.loader import load_model

    model, tok = load_model(ckpt_path)
    if tok is None:
        raise ConfigError(f"{ckpt_path!r} holds no tokenizer; it was not trained through a Haipai data module")
    written = write_depth_pictures(model, tok, text, out)
    if not written:
        raise ConfigError(f"{ckpt_path!r} routes no tokens (model.router is FullRecursion, no MoD): "
                          "every token has the same depth, there is nothing to draw")
    paths = [str(p) for png, page, _ in written.values() for p in (png, page)]
    print("\n".join(paths))
    return paths
