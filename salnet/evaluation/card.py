"""The metrics card: every definition a comparison of SOD numbers depends on, stated beside the numbers.

SOD papers compare numbers computed under different definitions (255 or 256 thresholds, maxF per
image or per dataset, one E-measure or another, maps resized or not); the card says which ones
salnet used, so that a reader (and `salnet.evaluate --merge`) can tell whether two tables compare.

`metrics_card(families, maps_read=..., bootstrap=...)` is a flat dict of stable keys and plain
values (numbers, short texts, the chosen families, the bootstrap settings):

- general keys, present in every card: the card's format, the PySODMetrics version matched, the
  chosen families, the averaging, quantisation, normalisation, GT binarisation, thresholds,
  adaptive threshold, how maps of another size were read (`maps_read`) and the bootstrap settings;
- per chosen family, its definitions, under the family's name and FAMILY.PART keys
  (F, F.beta2, F.max, ...); a family that was not chosen has none.

The texts follow salnet.metrics' docstring, which states the exact definitions. Renderers put the
card beside each table format: `markdown`, `latex_comment` (% lines), `csv_comment` (# lines at
the top: `pandas.read_csv(path, comment="#")`, or skip the lines starting with '#' before
`csv.reader`), and `html_items` (key -> text) for the results page. `differences` lists the
definitions two cards disagree on, for --merge.
"""

from __future__ import annotations

from collections.abc import Iterable

from salnet.evaluation.tables import md_escape
from salnet.metrics import FAMILIES

FORMAT = "salnet-metrics-card/1"
PYSODMETRICS = "PySODMetrics 1.6.2"

# How the maps were read when a map's size differs from its mask's: one text per kind of input.
MAPS_READ_FOLDERS = "a map of another size is resized to its mask's size with bilinear cv2.resize"
MAPS_READ_CHECKPOINTS = (
    "the network's output is upsampled to the mask's size (bilinear, align_corners=False) before the sigmoid"
)

# The definitions every card states, whatever the families.
GENERAL = {
    "averaging": "every value is the mean over images of per-image values (curves: averaged over images first)",
    "quantisation": "q = floor(255 p), in p's own precision (at least float32): what an 8-bit PNG of the map stores",
    "normalisation": "per image, min-max: v = (q/255 - min) / (max - min), unless the map is constant",
    "gt_binarisation": "foreground where the mask is > 128 on the 0..255 scale (a 0/1 mask scaled to 0/255 first)",
    "thresholds": "256 thresholds t = 0..255 (i/255): a pixel is foreground when floor(255 v) >= t",
    "adaptive_threshold": "per image, v >= min(2 x mean(v), 1)",
}

# Per family, its definitions (keys FAMILY or FAMILY.PART), as salnet.metrics' docstring states them.
FAMILY_DEFINITIONS: dict[str, dict[str, str | float]] = {
    "F": {
        "F": "F-measure: P = TP / max(predicted, 1), R = TP / max(GT foreground, 1), "
        "F = (1 + beta^2) P R / (beta^2 P + R), 0 where P R = 0",
        "F.beta2": 0.3,
        "F.max": "maxF: max over the 256 thresholds of the dataset's mean F curve (images averaged first; "
        "not the mean of per-image maxima)",
        "F.mean": "meanF: mean over the 256 thresholds of the dataset's mean F curve",
        "F.adaptive": "adpF: mean over images of F at each image's adaptive threshold",
    },
    "E": {
        "E": "enhanced-alignment measure (Fan et al., IJCAI 2018) as PySODMetrics 1.6.2's Emeasure: "
        "enhanced alignment (a + 1)^2 / 4 summed over pixels, divided by N - 1 + eps, eps = 2^-52",
        "E.thresholds": "256 (the thresholds above); maxE and meanE of the dataset's mean curve, "
        "adpE at each image's adaptive threshold",
    },
    "S": {
        "S": "structure measure (Fan et al., ICCV 2017) as PySODMetrics 1.6.2's Smeasure: "
        "alpha x object + (1 - alpha) x region, at least 0",
        "S.alpha": 0.5,
    },
    "wF": {
        "wF": "weighted F-measure (Margolin et al., CVPR 2014) as PySODMetrics 1.6.2's WeightedFmeasure: "
        "errors blurred with MATLAB's 7x7, sigma 5 Gaussian, background weighted by distance to the GT",
        "wF.beta": 1,
    },
    "MAE": {"MAE": "mean absolute error, mean over pixels of abs(v - G), on the normalised maps"},
    "IoU": {
        "IoU": "TP / (TP + FP + FN) over the 256 thresholds (max, mean of the dataset's mean curve) and "
        "at the adaptive threshold: PySODMetrics 1.6.2's FmeasureV2 IOUHandler",
    },
    "Dice": {
        "Dice": "2 TP / (2 TP + FP + FN) over the 256 thresholds (max, mean) and at the adaptive threshold: "
        "PySODMetrics 1.6.2's FmeasureV2 DICEHandler",
    },
    "BER": {
        "BER": "balanced error rate 1 - (TP / P + TN / N) / 2 over the 256 thresholds and at the adaptive "
        "threshold: PySODMetrics 1.6.2's FmeasureV2 BERHandler; maxBER is the worst threshold; lower is better",
    },
    "MSIoU": {
        "MSIoU": "multi-scale IoU of the edge maps (Ahmadzadeh et al., ICIP 2021) as PySODMetrics 1.6.2's MSIoU: "
        "cells of 1 to 512 pixels, thresholds t = 0..256 (max, mean) and the adaptive threshold",
    },
    "SI-MAE": {
        "SI-MAE": "size-invariant MAE (Li et al., ICML 2024) as PySODMetrics 1.6.2's SizeInvarianceMAE: "
        "each GT object (4-connected, at least 50 pixels) scored in its bounding box",
    },
    "SI-F": {
        "SI-F": "size-invariant F-measure (Li et al., ICML 2024) as PySODMetrics 1.6.2's SizeInvarianceFmeasureV2: "
        "per image the mean over its GT objects of each object's max, mean and adaptive F (beta^2 = 0.3)",
    },
    "HCE": {
        "HCE": "human correction effort (Qin et al., ECCV 2022) as PySODMetrics 1.6.2's "
        "HumanCorrectionEffortMeasure: relax 5, epsilon 2, prediction binarised at 0.5; lower is better",
    },
}
assert set(FAMILY_DEFINITIONS) == set(FAMILIES), "every metric family states its definitions"

Card = dict  # key -> str | int | float | list[str] | dict | None


def maps_read_text(folders: bool, checkpoints: bool) -> dict[str, str]:
    """The card's `maps_read` for an evaluation that scored checkpoints and/or folders of maps: per
    kind of input used ("checkpoints" for --checkpoint, "folders" for --pred), how it read a map of
    another size than its mask. Per kind, so that a merge compares the kinds both inputs used (one
    evaluate scores both kinds in one table, so the two rules compare with each other)."""
    kinds = (("checkpoints", MAPS_READ_CHECKPOINTS, checkpoints), ("folders", MAPS_READ_FOLDERS, folders))
    return {kind: text for kind, text, used in kinds if used}


def metrics_card(families: Iterable[str], *, maps_read: dict[str, str] | str, bootstrap: dict | None) -> Card:
    """The card of an evaluation with these metric families; `maps_read` says how maps of another size
    were read (`maps_read_text`), `bootstrap` is results.json's bootstrap settings (None: no intervals)."""
    chosen = [f for f in FAMILIES if f in set(families)]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"metric families {unknown} are not known; valid: {', '.join(FAMILIES)}")
    card: Card = {
        "card": FORMAT,
        "matches": PYSODMETRICS,
        "families": chosen,
        **GENERAL,
        "maps_read": dict(maps_read) if isinstance(maps_read, dict) else maps_read,
        "bootstrap": dict(bootstrap) if bootstrap is not None else None,
    }
    for family in chosen:
        card.update(FAMILY_DEFINITIONS[family])
    return card


def family_of(key: str) -> str | None:
    """The family whose definition `key` is (F for F and F.beta2), None for a general key."""
    head = key.split(".", 1)[0]
    return head if head in FAMILY_DEFINITIONS else None


def differences(a: Card, b: Card) -> list[tuple[str, object, object]]:
    """The definitions cards `a` and `b` disagree on, as (key, a's value, b's value); a missing key's
    value is None. What one card has and the other lacks is no disagreement where it is a choice, not
    a definition: a family chosen by one card only (a merged table shows '-' where a method lacks a
    metric), a kind of input (maps_read's checkpoints, folders) scored by one only. The definitions
    of the families both chose, and of the kinds both scored, must agree."""
    both = set(a.get("families") or []) & set(b.get("families") or [])
    out = []
    for key in dict.fromkeys([*a, *b]):
        if key == "families":
            continue
        family = family_of(key)
        if family is not None and family not in both:
            continue
        value_a, value_b = a.get(key), b.get(key)
        if key == "maps_read" and isinstance(value_a, dict) and isinstance(value_b, dict):
            value_a, value_b = (
                {kind: text for kind, text in value.items() if kind in value_a and kind in value_b}
                for value in (value_a, value_b)
            )
        if value_a != value_b:
            out.append((key, value_a, value_b))
    return out


def merged(cards: list[Card]) -> Card:
    """The card of a merge of agreeing `cards`: the first, with the families and the kinds of input of all."""
    chosen = {f for c in cards for f in c.get("families") or []}
    out = {**cards[0], "families": [f for f in FAMILIES if f in chosen]}
    if all(isinstance(c.get("maps_read"), dict) for c in cards):
        out["maps_read"] = {kind: text for c in cards for kind, text in c["maps_read"].items()}
    for c in cards:  # the definitions of a family the first card did not choose
        out.update({k: v for k, v in c.items() if k not in out})
    return out


def text(value) -> str:
    """A card value as one line of text."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {text(v)}" for k, v in value.items())
    return " ".join(str(value).split())


def html_items(card: Card) -> dict[str, str]:
    """The card as key -> one line of text, in the card's order (the results page escapes it)."""
    return {key: text(value) for key, value in card.items()}


def markdown(card: Card) -> str:
    """The card as a Markdown section with a two-column table."""
    lines = ["### Metrics card", "", "| definition | value |", "|:--|:--|"]
    lines += [f"| {md_escape(key)} | {md_escape(value)} |" for key, value in html_items(card).items()]
    return "\n".join(lines) + "\n"


def latex_comment(card: Card) -> str:
    """The card as LaTeX comment lines (% ...) to sit above the tabular: TeX reads nothing after a %
    on its line, so the texts need no escaping, only to be one line each."""
    return f"% metrics card: {card['card']}\n" + "".join(
        f"% {key}: {value}\n" for key, value in html_items(card).items() if key != "card"
    )


def csv_comment(card: Card) -> str:
    """The card as '#' lines for the top of results.csv: pandas.read_csv(path, comment="#") reads the
    table under them; with the csv module, skip the lines that start with '#'."""
    return f"# metrics card: {card['card']}\n" + "".join(
        f"# {key}: {value}\n" for key, value in html_items(card).items() if key != "card"
    )
