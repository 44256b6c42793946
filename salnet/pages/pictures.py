"""Picture rows for the pages: image | ground truth | each map, thumbnails that open the full-size files.

A picture set is described by plain data (what the gallery returns and the run page builds):

    {"columns": ["image", "ground truth", METHOD, ...],
     "sections": [{"title": TEXT, "note": TEXT,
                   "rows": [{"key": KEY, "caption": TEXT (lines), "cells": [{"thumb": PATH, "full": PATH} | None, ...]}]}]}

PATHs are relative to the page's folder, with '/' between parts; a None cell has no picture (an
image a shard set or layout does not hold). File names are made from row and column numbers, never
from image keys or method names, so no user text becomes part of a path.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from salnet.pages.html import esc

THUMB_SIDE = 160


def save_picture(root: Path, folder: str, name: str, picture: np.ndarray, thumb_side: int = THUMB_SIDE) -> dict:
    """Write `picture` (uint8 [H, W] or [H, W, 3]) as root/folder/NAME.png and a thumbnail, longest side
    at most `thumb_side`, as root/folder/thumbs/NAME.png; the cell {"thumb", "full"} (relative to root).
    Plain writes, not atomic ones: these files are rewritten whole with their page, and a page that
    shows a missing picture is the only harm a crash can do."""
    full = Image.fromarray(np.ascontiguousarray(picture))
    (root / folder / "thumbs").mkdir(parents=True, exist_ok=True)
    full.save(root / folder / f"{name}.png")
    thumb = full.copy()
    thumb.thumbnail((thumb_side, thumb_side), Image.Resampling.LANCZOS)
    thumb.save(root / folder / "thumbs" / f"{name}.png")
    return {"thumb": f"{folder}/thumbs/{name}.png", "full": f"{folder}/{name}.png"}


def url(path: str) -> str:
    """A relative path as a URL: each part percent-encoded (a dataset named 'a#b' stays a file name)."""
    return "/".join(quote(part) for part in path.split("/"))


def picture_table(description: dict) -> str:
    """The HTML of a picture set (the module docstring's shape), one table per section."""
    head = "".join(f"<th>{esc(c)}</th>" for c in ["", *description["columns"]])
    out = []
    for section in description["sections"]:
        out.append(f"<h3>{esc(section['title'])}</h3>")
        if section.get("note"):
            out.append(f"<p class='note'>{esc(section['note'])}</p>")
        rows = []
        for row in section["rows"]:
            cells = [
                f"<td><b>{esc(row['key'])}</b>\n{esc(row.get('caption', ''))}</td>"
            ]  # pre-line: captions keep their lines
            for cell, column in zip(row["cells"], description["columns"], strict=True):
                if cell is None:
                    cells.append("<td>no picture</td>")
                else:
                    cells.append(
                        f"<td><a href='{esc(url(cell['full']))}'><img src='{esc(url(cell['thumb']))}' "
                        f"alt='{esc(column)} of {esc(row['key'])}' loading='eager'></a></td>"
                    )
            rows.append(f"<tr>{''.join(cells)}</tr>")
        out.append(f"<table class='pictures'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return "\n".join(out)
