"""`python -m salnet.evaluate --merge A/results.json B/results.json --out C`: one comparison from several.

Numbers merge only when their metrics cards agree (salnet.evaluation.card): otherwise the merge is
refused with every differing definition, both values and the file each comes from. What merges:

- results: the union of datasets and of methods, in the order the inputs give them. The same
  (dataset, method) in two inputs must be identical (scores, intervals, counts and curves) and is
  kept once; anything else is an error naming both files. A dataset in two inputs must hold the
  same images: the same per-image keys where both inputs kept per_image/, else the same image count.
- curves.json beside each results.json (required: evaluate writes it), per method as the results.
- per_image/DATASET/METHOD.npz beside each input, copied where present.
- intervals and p-values: where every method of a dataset has its per-image file and the inputs
  bootstrapped (their cards agree on the settings), they are recomputed over all the merged methods
  with salnet.metrics.bootstrap: the draws depend only on (seed, number of images), so each
  method's interval is the one its input had, and pairs of methods from different inputs get their
  p-values too. Otherwise each method keeps its input's intervals and its p-values against the
  methods of its own input, and `made.p_values` says which datasets lack the pairs across inputs.

The inputs must be results.json of format salnet-results/2 (with a card); an older results.json
(no format, no card) is refused with the reason, as is anything else, named.
`merge_documents(paths)` returns the merged (document, curves); `merge_main(paths, out, write)`
reads, merges, copies per_image/ and hands the document to evaluate's writer `write`.
"""

from __future__ import annotations

import datetime
import json
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from salnet import __version__
from salnet.evaluation.card import differences, text
from salnet.evaluation.card import merged as merged_card
from salnet.evaluation.common import EvaluationError, names_listed, output_dirs
from salnet.metrics import PerImage
from salnet.metrics import bootstrap as uncertainty

FORMAT = "salnet-results/2"
PER_IMAGE = "per_image"
CURVES = "curves.json"
# The parts of a method's entry that depend on the other methods it was scored with.
PAIRWISE = ("p",)

Document = dict
Curves = dict
Write = Callable[[Document, Curves, Path], None]


def read_document(path: Path) -> Document:
    """A results.json of format salnet-results/2, checked enough to merge; errors name the file."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EvaluationError(f"--merge: '{path}' does not exist (give the results.json that evaluate wrote)") from None
    except UnicodeDecodeError:
        raise EvaluationError(f"--merge: '{path}' is not a results.json (not text: a binary file)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise EvaluationError(f"--merge: '{path}' is not a results.json (not JSON: {e})") from None
    if not isinstance(document, dict):
        raise EvaluationError(f"--merge: '{path}' is not a results.json: it holds a {type(document).__name__}")
    found = document.get("format")
    if found is None:
        if _is_curves(document):
            raise EvaluationError(
                f"--merge: '{path}' is a curves.json (the curves of an evaluation); give the results.json beside it"
            )
        if _is_first_format(document):
            raise EvaluationError(
                f"--merge: '{path}' is a results.json of salnet's first format ({{dataset: {{method: scores}}}}, "
                f"without a metrics card): the definitions its numbers were computed under are not recorded, so "
                f"it cannot be merged; score it again with this salnet's evaluate (format {FORMAT})"
            )
        raise EvaluationError(f"--merge: '{path}' is not a salnet results.json (no 'format' key; expected {FORMAT})")
    if found != FORMAT:
        raise EvaluationError(f"--merge: '{path}' has format {found!r}; this salnet merges {FORMAT}")
    for key, kind in (("card", dict), ("results", dict)):
        if not isinstance(document.get(key), kind):
            raise EvaluationError(
                f"--merge: '{path}' has no {key!r} {kind.__name__} (format {FORMAT} has one): "
                "it cannot be merged without it"
            )
    for dataset, by_method in document["results"].items():
        if not isinstance(by_method, dict) or not all(isinstance(s, dict) for s in by_method.values()):
            raise EvaluationError(f"--merge: '{path}': results[{dataset!r}] is not {{method: scores}}")
    return document


def _is_curves(document: dict) -> bool:
    """{dataset: {method: {threshold, precision, recall, F, ...}}}: an evaluation's curves.json."""
    return bool(document) and all(
        isinstance(by, dict) and all(isinstance(c, dict) and "precision" in c for c in by.values())
        for by in document.values()
    )


def _is_first_format(document: dict) -> bool:
    """{dataset: {method: {metric: value, "images": n}}}: what evaluate wrote before the card."""
    return bool(document) and all(
        isinstance(by, dict) and all(isinstance(s, dict) and "images" in s for s in by.values())
        for by in document.values()
    )


def read_curves(results_path: Path) -> Curves:
    path = Path(results_path).parent / CURVES
    try:
        curves = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvaluationError(
            f"--merge: '{path}' does not exist: evaluate writes it beside '{results_path}' (copy it along)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvaluationError(f"--merge: '{path}' is not a curves.json (not JSON: {e})") from None
    if not isinstance(curves, dict):
        raise EvaluationError(f"--merge: '{path}' is not a curves.json ({{dataset: {{method: curves}}}})")
    return curves


def card_conflicts(paths: list[Path], documents: list[Document]) -> list[str]:
    """One line per definition on which an input's card differs from the first input's."""
    lines = []
    first_path, first = paths[0], documents[0]["card"]
    for path, document in zip(paths[1:], documents[1:], strict=True):
        for key, a, b in differences(first, document["card"]):
            lines.append(f"{key}: {first_path}: {text(a)}; {path}: {text(b)}")
    return lines


def per_image_files(results_path: Path, dataset: str, method: str) -> Path:
    return Path(results_path).parent / PER_IMAGE / dataset / f"{method}.npz"


def _image_keys(results_path: Path, dataset: str, methods) -> list[str] | None:
    """The dataset's per-image keys in this input (None without per_image/ files)."""
    for method in methods:
        path = per_image_files(results_path, dataset, method)
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as data:
                    return [str(k) for k in data["keys"]]
            except (OSError, ValueError, KeyError) as e:
                raise EvaluationError(f"--merge: '{path}' is not a per-image file with 'keys': {e}") from None
    return None


def _same_scores(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k not in PAIRWISE} == {k: v for k, v in b.items() if k not in PAIRWISE}


def merge_documents(paths: list[Path | str]) -> tuple[Document, Curves]:
    """The inputs' results.json (and their curves.json) as one document: see the module docstring."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise EvaluationError(f"--merge needs two or more results.json, got {len(paths)}")
    twice = sorted({str(p) for p in paths if paths.count(p) > 1})
    if twice:
        raise EvaluationError(f"--merge: {', '.join(twice)} given twice")
    documents = [read_document(p) for p in paths]
    conflicts = card_conflicts(paths, documents)
    if conflicts:
        raise EvaluationError(
            f"--merge: the metrics cards differ in {len(conflicts)} definition(s), so the numbers do not "
            "compare:\n  " + "\n  ".join(conflicts)
        )
    curves_of = [read_curves(p) for p in paths]

    results: dict[str, dict[str, dict]] = {}
    curves: dict[str, dict[str, dict]] = {}
    origin: dict[tuple[str, str], Path] = {}  # (dataset, method) -> the input it came from
    images_of: dict[str, tuple] = {}  # dataset -> (first input, its per-image keys or None, its image count)
    problems = []
    for path, document, input_curves in zip(paths, documents, curves_of, strict=True):
        for dataset, by_method in document["results"].items():
            keys = _image_keys(path, dataset, by_method)
            count = max(int(s.get("images", 0)) for s in by_method.values()) if by_method else 0
            if dataset not in images_of:
                images_of[dataset] = (path, keys, count)
            else:
                other_path, other_keys, other_count = images_of[dataset]
                if keys is not None and other_keys is not None:
                    if keys != other_keys:
                        only = sorted(set(keys) ^ set(other_keys))
                        problems.append(
                            f"{dataset}: the inputs scored different images ({other_path}: {len(other_keys)}, "
                            f"{path}: {len(keys)}; in one only: {names_listed(only) or 'none, in another order'}), "
                            "so their methods do not compare"
                        )
                elif count != other_count:
                    problems.append(
                        f"{dataset}: the inputs scored different images ({other_path}: {other_count}, {path}: "
                        f"{count}), so their methods do not compare"
                    )
            for method, scores in by_method.items():
                method_curves = (input_curves.get(dataset) or {}).get(method)
                if method_curves is None:
                    problems.append(f"{dataset}/{method}: {path.parent / CURVES} has no curves for it")
                    continue
                if (dataset, method) in origin:
                    first = origin[dataset, method]
                    if not _same_scores(results[dataset][method], scores) or curves[dataset][method] != method_curves:
                        problems.append(
                            f"{dataset}/{method} is in {first} and in {path} with different values: "
                            "name one of them apart (METHOD=...) when scoring, or leave one input out"
                        )
                    else:  # the same numbers twice: keep them once, with the p-values of both inputs
                        for metric, against in (scores.get("p") or {}).items():
                            results[dataset][method].setdefault("p", {}).setdefault(metric, {}).update(against)
                    continue
                origin[dataset, method] = path
                results.setdefault(dataset, {})[method] = json.loads(json.dumps(scores))  # a copy
                curves.setdefault(dataset, {})[method] = method_curves
    if problems:
        raise EvaluationError("--merge: the inputs cannot be merged:\n  " + "\n  ".join(problems))

    first = documents[0]
    made = {
        "command": shlex.join(["python", "-m", "salnet.evaluate", "--merge", *map(str, paths)]),
        "salnet": __version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "merged": [{"path": str(p), "made": d.get("made")} for p, d in zip(paths, documents, strict=True)],
    }
    bootstrap = first.get("bootstrap")
    if bootstrap:
        partial = [d for d in results if not _rebootstrap(results[d], origin, d, bootstrap) and len(results[d]) > 1]
        if partial:
            made["p_values"] = (
                f"{', '.join(partial)}: p-values only between methods of the same input (per-image files "
                "missing); evaluate the methods together, or keep per_image/ beside each results.json"
            )
    document = {
        "format": FORMAT,
        "made": made,
        "card": merged_card([d["card"] for d in documents]),
        "bootstrap": bootstrap,
        "results": results,
    }
    return document, curves


def _rebootstrap(by_method: dict[str, dict], origin: dict, dataset: str, settings: dict) -> bool:
    """Recompute one dataset's intervals and p-values over all its merged methods from their
    per-image files; False (nothing changed) when a method has none or their families differ."""
    paths = {method: per_image_files(origin[dataset, method], dataset, method) for method in by_method}
    if not all(path.is_file() for path in paths.values()):
        return False
    rows = {}
    for method, path in paths.items():
        try:
            rows[method] = PerImage.load(path)
        except (OSError, ValueError, KeyError) as e:
            raise EvaluationError(f"--merge: '{path}' is not a per-image file of evaluate's: {e}") from None
    if len({r.families for r in rows.values()}) > 1:
        return False
    found = uncertainty.bootstrap(
        rows, int(settings["resamples"]), int(settings["seed"]), float(settings.get("level", uncertainty.LEVEL))
    )
    for method, scores in by_method.items():
        scores["ci95"] = {name: list(bounds) for name, bounds in found.intervals[method].items()}
        scores["p"] = found.p_values[method]
    return True


def copy_per_image(paths: list[Path], document: Document, out: Path) -> int:
    """Copy each merged (dataset, method)'s per_image file into OUT/per_image/; returns how many."""
    copied = 0
    for dataset, by_method in document["results"].items():
        for method in by_method:
            for path in paths:
                source = per_image_files(path, dataset, method)
                if source.is_file():
                    target = per_image_files(out / "results.json", dataset, method)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, target)
                    copied += 1
                    break
    return copied


def merge_main(paths: list[Path | str], out: Path, write: Write) -> Document:
    """--merge: merge the inputs, write with evaluate's writer `write(document, curves, out)` (every
    format evaluate writes), and copy the per-image files. Returns the merged document."""
    out = Path(out)
    document, curves = merge_documents(paths)
    if any(Path(p).resolve().parent == out.resolve() for p in paths):
        raise EvaluationError(f"--merge: --out {out} holds one of the inputs; write the merge to another folder")
    output_dirs(out)
    write(document, curves, out)
    copy_per_image([Path(p) for p in paths], document, out)
    return document
