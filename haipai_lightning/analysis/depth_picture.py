"""A text with every token coloured by its recursion depth (Figure 1 of the MoR paper), as PNG and HTML.

Used by `callbacks.RouterTelemetry` at each validation end and by `haipai visualize`.
Depths come from the routing records of one eval-mode forward (causal threshold routing,
i.e. what the model does at inference), one picture per record group with a per-token
depth: 'depth' for MoR routers, 'mod' for Mixture-of-Depths layers.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from haipai_lightning.analysis.telemetry import group_records, token_depth

DEFAULT_TEXT = ("In the beginning God created the heaven and the earth. "
                "And the earth was without form, and void.")
# depth 0 (skipped every routed layer) is grey; depths 1..max run along this ramp, light to dark
_ZERO = (224, 224, 224)
_RAMP = [(255, 243, 176), (244, 162, 89), (209, 73, 91), (106, 44, 112)]
_WIDTH, _MARGIN, _PAD = 1000, 16, 3


def palette(max_depth: int) -> list[tuple[int, int, int]]:
    """RGB per depth 0..max_depth: grey, then evenly spaced points of the ramp (deeper = darker)."""
    out = [_ZERO]
    for d in range(1, max_depth + 1):
        t = (d - 1) / max(max_depth - 1, 1) * (len(_RAMP) - 1)
        i = min(int(t), len(_RAMP) - 2)
        f = t - i
        out.append(tuple(round(a + (b - a) * f) for a, b in zip(_RAMP[i], _RAMP[i + 1])))  # type: ignore[misc]
    return out


def _ink(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black text on light backgrounds, white on dark (relative luminance)."""
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % rgb


@torch.no_grad()
def text_depths(model: Any, tokenizer: Any, text: str) -> tuple[list[str], dict[str, tuple[list[int], int]]]:
    """One eval-mode forward of `text` -> (token strings, {group: (depth per token, max depth)})."""
    ids = tokenizer.encode(text).ids[: model.cfg.max_seq_len]
    if not ids:
        raise ValueError("the text has no tokens; pass a non-empty --text")
    was_training = model.training
    model.eval()
    try:
        out = model(torch.tensor([ids], device=next(model.parameters()).device))
    finally:
        model.train(was_training)
    tokens = [tokenizer.decode([i]) for i in ids]
    groups = {}
    for g, recs in group_records(out.records).items():
        d = token_depth(recs)
        if d is not None:
            groups[g] = (d[0][0].tolist(), d[1])
    return tokens, groups


def _font(size: int = 18) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable bundled font
    except TypeError:
        return ImageFont.load_default()


def render_png(tokens: list[str], depths: list[int], max_depth: int, title: str = "") -> Image.Image:
    """Tokens as boxes coloured by depth, wrapped to lines, with a legend underneath."""
    font, colours = _font(), palette(max_depth)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = sum(font.getmetrics()) + 2 * _PAD + 4
    # lay out: a token that starts with whitespace opens a gap (a new word); subwords stay flush
    boxes, x, y = [], _MARGIN, _MARGIN + (line_h if title else 0)
    for tok, d in zip(tokens, depths):
        shown = tok.replace("\n", "\\n").strip() or "\u00b7"
        gap = 6 if tok[:1].isspace() and x > _MARGIN else 0
        w = int(draw.textlength(shown, font=font)) + 2 * _PAD
        if x + gap + w > _WIDTH - _MARGIN and x > _MARGIN:
            x, y, gap = _MARGIN, y + line_h, 0
        boxes.append((x + gap, y, w, shown, d))
        x += gap + w
    legend_y = y + line_h + 10
    img = Image.new("RGB", (_WIDTH, legend_y + line_h + _MARGIN), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((_MARGIN, _MARGIN), title, fill=(0, 0, 0), font=font)
    for bx, by, w, shown, d in boxes:
        c = colours[min(max(d, 0), max_depth)]
        draw.rectangle([bx, by, bx + w - 2, by + line_h - 5], fill=c)  # 1px gap: subword borders stay visible
        draw.text((bx + _PAD, by + _PAD), shown, fill=_ink(c), font=font)
    x = _MARGIN
    for d, c in enumerate(colours):
        if d == 0 and 0 not in depths:
            continue  # no token skipped everything: leave depth 0 out of the legend
        label = f"depth {d}"
        w = int(draw.textlength(label, font=font)) + 2 * _PAD
        draw.rectangle([x, legend_y, x + w - 1, legend_y + line_h - 5], fill=c, outline=(120, 120, 120))
        draw.text((x + _PAD, legend_y + _PAD), label, fill=_ink(c), font=font)
        x += w + 8
    return img


def render_html(tokens: list[str], depths: list[int], max_depth: int, title: str = "") -> str:
    """The same picture as a self-contained HTML page (token spans with background colours + a legend)."""
    colours = palette(max_depth)
    span = '<span class="t" style="background:{};color:{}" title="depth {}">{}</span>'
    parts = []
    for t, d in zip(tokens, depths):
        c = colours[min(max(d, 0), max_depth)]
        word = t.lstrip() or t  # a whitespace-only token keeps its span
        lead = t[: len(t) - len(word)]  # a leading space stays outside the span: words apart, subwords touch
        parts.append(html.escape(lead) + span.format(_hex(c), _hex(_ink(c)), d, html.escape(word)))
    body = "".join(parts)
    legend = " ".join(span.format(_hex(c), _hex(_ink(c)), d, f"depth {d}") for d, c in enumerate(colours)
                      if d > 0 or 0 in depths)
    return ("<!doctype html><meta charset='utf-8'><title>{0}</title>"
            "<style>body{{font-family:monospace;max-width:60em}} .t{{white-space:pre-wrap;padding:1px 0}}</style>"
            "<h3>{0}</h3><p>{1}</p><p>{2}</p>\n").format(html.escape(title), body, legend)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_depth_pictures(model: Any, tokenizer: Any, text: str, out_dir: str | os.PathLike,
                         suffix: str = "") -> dict[str, tuple[Path, Path, Image.Image]]:
    """Render `text` for every depth group of `model`; write `<group><suffix>.png` and `.html` into out_dir.

    Returns {group: (png path, html path, image)}; empty for a model that routes nothing.
    """
    import io

    tokens, groups = text_depths(model, tokenizer, text)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for g, (depths, max_depth) in groups.items():
        title = f"{g}: tokens coloured by depth (max {max_depth}), mean {sum(depths) / len(depths):.2f}"
        img = render_png(tokens, depths, max_depth, title)
        stem = g.replace("/", "_") + suffix
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        png, page = out / f"{stem}.png", out / f"{stem}.html"
        _atomic_write(png, buf.getvalue())
        _atomic_write(page, render_html(tokens, depths, max_depth, title).encode())
        written[g] = (png, page, img)
    return written
