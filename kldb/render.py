"""Image grids with each image's KLDB and class probabilities written under it (PIL only)."""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont


def labelled(label: str, value: float | int, digits: int | None = None) -> str:
    """``label = value``: the grids' small default font draws a space one pixel wide, so a plain space would read
    as ``KLDB0.486``.

    Example:
        >>> labelled("KLDB", 0.4861, 3), labelled("seed", 7)
        ('KLDB = 0.486', 'seed = 7')
    """
    return f"{label} = {value:.{digits}f}" if digits is not None else f"{label} = {value}"


def caption_lines(kldb: float | None, probabilities: Sequence[float], names: Sequence[str], top: int = 3) -> list[str]:
    """``KLDB = 0.123`` then the ``top`` most probable classes as ``name = 0.48``."""
    lines = [labelled("KLDB", kldb, 3)] if kldb is not None else []
    order = sorted(range(len(probabilities)), key=lambda i: -probabilities[i])[:top]
    lines += [labelled(names[i], probabilities[i], 2) for i in order]
    return lines


def captioned_grid(
    rows: Sequence[tuple[str, Sequence[PIL.Image.Image], Sequence[Sequence[str]]]],
    cell: int = 96,
    pad: int = 6,
) -> PIL.Image.Image:
    """A grid: one row per ``(title, images, captions)``, each image scaled to ``cell`` px with its caption below."""
    font = PIL.ImageFont.load_default()
    line_height = 12
    max_lines = max((len(c) for _, _, caps in rows for c in caps), default=0)
    title_height = line_height + pad
    cell_height = cell + max_lines * line_height + pad
    columns = max(len(images) for _, images, _ in rows)
    width = pad + columns * (cell + pad)
    height = sum(title_height + cell_height for _ in rows) + pad
    canvas = PIL.Image.new("RGB", (max(width, 200), height), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    y = pad
    for title, images, captions in rows:
        draw.text((pad, y), title, fill="black", font=font)
        y += title_height
        for col, (image, lines) in enumerate(zip(images, captions)):
            x = pad + col * (cell + pad)
            canvas.paste(image.convert("RGB").resize((cell, cell), PIL.Image.NEAREST), (x, y))
            for k, line in enumerate(lines):
                draw.text((x, y + cell + 2 + k * line_height), line, fill="black", font=font)
        y += cell_height
    return canvas
