"""`info`: what a shard directory holds and how it was made, from its manifest alone (no reading of shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from salnet.shards.manifest import load_manifest

LIST_LIMIT = 20


def describe(shard_dir: Path) -> str:
    m = load_manifest(shard_dir)
    stats = m["stats"]
    shard_sizes = sorted(s["bytes"] for s in m["shards"])
    source = m.get("source", {})
    lines = [
        f"dataset      {m['name']}  ({shard_dir})",
        f"samples      {m['total_samples']} in {len(m['shards'])} shards, {_bytes(m['total_bytes'])} "
        f"(shards {_bytes(shard_sizes[0])} .. {_bytes(shard_sizes[-1])})",
        f"layout       {m['layout']}" + (f": {source['found']} in {source['path']}" if source else ""),
        f"packed by    salnet {m['salnet_version']}" + (f", Pillow {m['pillow_version']}" if "pillow_version" in m else ""),
        f"command      {m['command']}",
    ]
    if m.get("options"):
        lines.append("options      " + ", ".join(f"{k}={v}" for k, v in m["options"].items()))
    lines += [
        f"stored H x W {_range(stats.get('stored_height'))} x {_range(stats.get('stored_width'))}",
        f"original     {_range(stats.get('orig_height'))} x {_range(stats.get('orig_width'))}",
        f"foreground   {_range(stats.get('foreground_ratio'))} of the pixels (mask >= 128)",
        f"soft masks   {stats.get('soft_masks', '?')} of {m['total_samples']}",
        f"images       {stats.get('images_kept_original', '?')} kept byte-for-byte; re-encoded: "
        + (", ".join(f"{k} ({n})" for k, n in stats.get("image_conversions", {}).items()) or "none"),
        f"skipped      {len(m['skipped'])}",
    ]
    lines += [f"  {s['path']}: {s['reason']}" for s in m["skipped"][:LIST_LIMIT]]
    if len(m["skipped"]) > LIST_LIMIT:
        lines.append(f"  ... and {len(m['skipped']) - LIST_LIMIT} more (see manifest.json)")
    return "\n".join(lines)


def _range(summary: Optional[dict[str, Any]]) -> str:
    if not summary:
        return "-"
    return f"{_num(summary['min'])}..{_num(summary['max'])} (median {_num(summary['median'])}, mean {_num(summary['mean'])})"


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.3g}"


def _bytes(n: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    power = min(len(units) - 1, max(0, (n.bit_length() - 1) // 10))
    return f"{n / 1024 ** power:.1f} {units[power]}" if power else f"{n} B"
