"""The built-in demo dataset: procedural salient-object scenes with exact masks.

Each scene is drawn in YCbCr, so brightness (Y) and colour (Cb, Cr) are set independently:

- background: a random base brightness, a linear gradient and noise at several scales in Y; a
  weakly saturated tint whose hue drifts smoothly across the frame;
- distractors (never in the mask): blobs, polygons and strokes in the background's own hue and
  saturation but clearly brighter or darker, i.e. what a brightness-based detector fires on;
- salient objects (the mask): one to three blobs, polygons or ellipses, some with thin limbs and
  some with a hole, from 1.5% to half of the frame; strongly saturated, in a hue at least 90 degrees
  from the background's, textured (noise, stripes or spots), and with the background's brightness
  give or take a little.

So objects differ from their surroundings mainly by hue: a CNN learns "the strongly coloured,
off-hue region" in minutes, while the best global threshold on the gray image scores a low maxF
(tests/test_shards_synth.py checks that it stays below 0.6). Every scene is a pure function of
(seed, split, index): the same call gives byte-identical shards with any number of workers.
"""

from __future__ import annotations

import io
import math
import os
import shlex
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from salnet.shards.format import JPEG_EXT, sample_meta
from salnet.shards.manifest import ShardsError
from salnet.shards.parallel import ordered_map
from salnet.shards.writer import EncodedSample, Sample, ShardWriter, prepare_out_dir

SPLITS = {"train": 0, "val": 1}  # the split is part of each scene's seed: train and val never share a scene
JPEG_QUALITY = 92
DEFAULT_SHARD_SAMPLES = 256


def synthesize(
    out_dir: os.PathLike | str,
    train: int,
    val: int,
    size: int = 128,
    seed: int = 0,
    *,
    workers: int = 1,
    shard_samples: int = DEFAULT_SHARD_SAMPLES,
    overwrite: bool = False,
    command: str | None = None,
) -> tuple[Path, Path]:
    """Write complete shard directories `out_dir/train` and `out_dir/val`; return their paths."""
    if train < 1 or val < 1:
        raise ShardsError(f"synth needs at least one train and one val scene, got train={train}, val={val}")
    if size < 32:
        raise ShardsError(f"synth size must be at least 32 px (objects need room for limbs and holes), got {size}")
    command = (
        command
        or f"salnet.shards.synth.synthesize({shlex.quote(str(out_dir))}, train={train}, val={val}, size={size}, seed={seed})"
    )
    paths = []
    for split, count in (("train", train), ("val", val)):
        split_dir = Path(out_dir) / split
        prepare_out_dir(split_dir, overwrite)
        render = partial(_scene_sample, size=size, seed=seed, split=split)
        with ShardWriter(split_dir, f"synth-{split}", shard_samples=shard_samples, shard_bytes=None) as writer:
            for sample in ordered_map(render, list(range(count)), workers, desc=f"synth {split}"):
                writer.add(sample)
            writer.finish(
                layout="synth",
                command=command,
                skipped=[],
                synth={"split": split, "size": size, "seed": seed, "scenes": count},
            )
        paths.append(split_dir)
    return paths[0], paths[1]


def _scene_sample(index: int, size: int, seed: int, split: str) -> EncodedSample:
    rng = np.random.default_rng([seed, SPLITS[split], index])
    rgb, mask = render_scene(rng, size)
    image, mask_png = io.BytesIO(), io.BytesIO()
    # 4:4:4: chroma subsampling would smear the hue of thin limbs, which is the signal here.
    Image.fromarray(rgb).save(image, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    Image.fromarray(mask).save(mask_png, "PNG")
    key = f"{split}_{index:06d}"
    source = f"synth:seed={seed}:{split}:{index}"
    meta = sample_meta(
        key=key,
        dataset=f"synth-{split}",
        source=source,
        mask_source=source,
        orig_size=(size, size),
        stored_size=(size, size),
    )
    return Sample(
        key=key,
        image_ext=JPEG_EXT,
        image=image.getvalue(),
        mask=mask_png.getvalue(),
        meta=meta,
        foreground=float((mask >= 128).mean()),
        soft_mask=False,
    ).encoded()


# --------------------------------------------------------------------------------------------
# Scene rendering
# --------------------------------------------------------------------------------------------


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (RGB uint8 [size, size, 3], mask uint8 [size, size] with values 0/255)."""
    luma = _background_luma(rng, size)
    bg_hue = rng.uniform(0, 2 * math.pi)
    hue = bg_hue + 0.35 * _noise(rng, size, octaves=(2, 4))
    chroma = rng.uniform(5, 20) * (1 + 0.3 * _noise(rng, size, octaves=(3, 6)))

    for _ in range(rng.integers(2, 7)):
        region = _shape(rng, size, area=rng.uniform(0.005, 0.08))
        luma[region] += rng.choice([-1, 1]) * rng.uniform(18, 45)
        hue[region] = bg_hue + rng.uniform(-0.4, 0.4)
        chroma[region] *= rng.uniform(1.0, 2.5)  # up to moderately coloured, so "any colour" is not the answer

    mask = np.zeros((size, size), bool)
    count = rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])
    min_area, max_area = (0.03, 0.5) if count == 1 else (0.015, 0.25)
    for _ in range(count):
        area = math.exp(rng.uniform(math.log(min_area), math.log(max_area)))
        region = _shape(rng, size, area, parts=True)
        for _ in range(4):  # slivers and shapes mostly outside the frame make near-empty masks: redraw
            if region.mean() >= 0.3 * area:
                break
            region = _shape(rng, size, area, parts=True)
        texture = _texture(rng, size)
        luma[region] = luma[region].mean() + rng.uniform(-12, 12) + texture[region]
        hue[region] = bg_hue + math.pi + rng.uniform(-math.pi / 2, math.pi / 2) + 0.25 * texture[region] / 20
        chroma[region] = rng.uniform(22, 50)
        mask |= region
    return _ycbcr_to_rgb(luma, hue, chroma), mask.astype(np.uint8) * 255


def _noise(rng: np.random.Generator, size: int, octaves: tuple[int, ...]) -> np.ndarray:
    """Smooth noise roughly in [-1, 1]: random grids of `octaves` cells, upsampled bicubically, summed."""
    total = np.zeros((size, size), np.float32)
    for i, cells in enumerate(octaves):
        grid = Image.fromarray(rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32))
        total += np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC)) / (i + 1)
    return total / sum(1 / (i + 1) for i in range(len(octaves)))


def _background_luma(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    angle = rng.uniform(0, 2 * math.pi)
    gradient = rng.uniform(0, 50) * (xx * math.cos(angle) + yy * math.sin(angle))
    texture = rng.uniform(10, 30) * _noise(rng, size, octaves=(3, 7, 15, size // 4))
    grain = rng.uniform(0, 5) * rng.standard_normal((size, size)).astype(np.float32)
    return rng.uniform(75, 175) + gradient + texture + grain


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brightness pattern of an object, of the same strength as the background's texture."""
    kind = rng.integers(3)
    strength = rng.uniform(8, 22)
    if kind == 0:
        return strength * _noise(rng, size, octaves=(4, 9, size // 4))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == 1:
        angle, period = rng.uniform(0, math.pi), rng.uniform(4, 14)
        return strength * np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
    spots = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(4, 14)):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1.5, size / 12)
        spots[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.choice([-1, 1])
    return strength * spots


def _shape(rng: np.random.Generator, size: int, area: float, parts: bool = False) -> np.ndarray:
    """A random region covering about `area` of the frame: blob, polygon or ellipse; with `parts`,
    sometimes thin limbs and a hole."""
    radius = math.sqrt(area * size * size / math.pi)
    cx, cy = (rng.uniform(0.6 * radius, size - 0.6 * radius) if radius < size / 2 else size / 2 for _ in range(2))
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon(_outline(rng, cx, cy, radius), fill=1)
    if parts and rng.random() < 0.4:
        width = max(2, round(size * rng.uniform(0.015, 0.035)))
        for _ in range(rng.integers(1, 5)):
            a, length = rng.uniform(0, 2 * math.pi), radius * rng.uniform(1.2, 2.2)
            draw.line([(cx, cy), (cx + length * math.cos(a), cy + length * math.sin(a))], fill=1, width=width)
    if parts and radius > 0.12 * size and rng.random() < 0.3:
        inner = radius * rng.uniform(0.25, 0.45)
        draw.polygon(
            _outline(rng, cx + rng.uniform(-0.2, 0.2) * radius, cy + rng.uniform(-0.2, 0.2) * radius, inner), fill=0
        )
    return np.asarray(canvas, bool)


def _outline(rng: np.random.Generator, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    kind = rng.integers(3)
    if kind == 0:  # smooth blob: radius modulated by a few low harmonics
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        r = np.ones_like(t)
        for k in range(2, 6):
            r += rng.uniform(0, 0.35 / k * 2) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
        r = radius * np.maximum(r, 0.3)
    elif kind == 1:  # polygon, possibly concave (star-like)
        t = np.sort(rng.uniform(0, 2 * math.pi, rng.integers(3, 9)))
        r = radius * rng.uniform(0.55, 1.35, t.size)
    else:  # rotated ellipse
        t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        aspect = rng.uniform(0.35, 1.0)
        rot = rng.uniform(0, math.pi)
        x, y = np.cos(t) / math.sqrt(aspect), np.sin(t) * math.sqrt(aspect)
        t = np.arctan2(y, x) + rot
        r = radius * np.hypot(x, y)
    return list(zip((cx + r * np.cos(t)).tolist(), (cy + r * np.sin(t)).tolist()))


def _ycbcr_to_rgb(luma: np.ndarray, hue: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """Full-range ITU-R BT.601, the transform PIL's convert("L") inverts: gray == luma up to clipping."""
    cb, cr = chroma * np.cos(hue), chroma * np.sin(hue)
    rgb = np.stack([luma + 1.402 * cr, luma - 0.344136 * cb - 0.714136 * cr, luma + 1.772 * cb], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
