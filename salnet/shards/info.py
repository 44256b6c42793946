"""`info`: what a shard directory holds and how it was made, from its manifest alone (no reading of shards).

`load_manifest` guarantees what readers rely on (shards, counts, totals, skipped entries); the
rest (statistics, options, source, resized) is information that may be missing or malformed in a
manifest not written by this salnet: it is shown as '-' or as malformed, never a crash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from salnet.shards.manifest import load_manifest

LIST_LIMIT = 20
SUMMARY_KEYS = ("min", "max", "median", "mean")


def describe(shard_dir: Path) -> str:
    m = load_manifest(shard_dir)
    stats = m["stats"]
    shard_sizes = sorted(s["bytes"] for s in m["shards"])
    source = m.get("source")
    found = f": {source.get('found')} in {source.get('path')}" if isinstance(source, dict) and source else ""
    lines = [
        f"dataset      {m['name']}  ({shard_dir})",
        f"samples      {m['total_samples']} in {len(m['shards'])} shards, {_bytes(m['total_bytes'])} "
        f"(shards {_bytes(shard_sizes[0])} .. {_bytes(shard_sizes[-1])})",
        f"layout       {m['layout']}{found}",
        f"packed by    salnet {m['salnet_version']}"
        + (f", Pillow {m['pillow_version']}" if "pillow_version" in m else ""),
        f"command      {m['command']}",
    ]
    options = m.get("options")
    if options:
        lines.append(
            "options      "
            + (
                ", ".join(f"{k}={v}" for k, v in options.items())
                if isinstance(options, dict)
                else f"(malformed: {_short(options)})"
            )
        )
    lines += [
        f"stored H x W {_range(stats.get('stored_height'))} x {_range(stats.get('stored_width'))}",
        f"original     {_range(stats.get('orig_height'))} x {_range(stats.get('orig_width'))}",
        f"foreground   {_range(stats.get('foreground_ratio'))} of the pixels (mask >= 128)",
        f"soft masks   {_count(stats.get('soft_masks'))} of {m['total_samples']}",
        f"images       {_count(stats.get('images_kept_original'))} kept byte-for-byte; re-encoded: {_counts(stats.get('image_conversions'))}",
        f"masks        converted: {_counts(stats.get('mask_conversions'))}",
    ]
    resized = m.get("resized")
    if resized:
        if isinstance(resized, list):
            lines.append(f"resized      {len(resized)} images to their masks' size (pack --on-mismatch resize)")
            lines += [f"  {_resized(r)}" for r in resized[:LIST_LIMIT]]
            if len(resized) > LIST_LIMIT:
                lines.append(f"  ... and {len(resized) - LIST_LIMIT} more (see manifest.json)")
        else:
            lines.append(f"resized      (malformed: {_short(resized)})")
    lines.append(f"skipped      {len(m['skipped'])}")
    lines += [f"  {s['path']}: {s['reason']}" for s in m["skipped"][:LIST_LIMIT]]
    if len(m["skipped"]) > LIST_LIMIT:
        lines.append(f"  ... and {len(m['skipped']) - LIST_LIMIT} more (see manifest.json)")
    return "\n".join(lines)


def _range(summary: Any) -> str:
    if not summary:
        return "-"
    if not isinstance(summary, dict) or not all(_is_number(summary.get(k)) for k in SUMMARY_KEYS):
        return f"(malformed: {_short(summary)})"
    return f"{_num(summary['min'])}..{_num(summary['max'])} (median {_num(summary['median'])}, mean {_num(summary['mean'])})"


def _count(value: Any) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "?"


def _counts(counts: Any) -> str:
    if not counts:
        return "none"
    if not isinstance(counts, dict):
        return f"(malformed: {_short(counts)})"
    return ", ".join(f"{k} ({n})" for k, n in counts.items())


def _resized(entry: Any) -> str:
    try:
        (fh, fw), (th, tw) = entry["from"], entry["to"]
        return f"{entry['image']}: {fw}x{fh} -> {tw}x{th} (WxH), the size of {entry['mask']}"
    except (KeyError, TypeError, ValueError):
        return f"(malformed: {_short(entry)})"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.3g}"


def _bytes(n: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    power = min(len(units) - 1, max(0, (n.bit_length() - 1) // 10))
    return f"{n / 1024**power:.1f} {units[power]}" if power else f"{n} B"
