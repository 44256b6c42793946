"""Static HTML pages that a person opens from disk: an evaluation's results and a run's history.

- `html`: the page skeleton (inline CSS and JavaScript), escaping, and line charts as inline SVG
  with the values on hover.
- `pictures`: picture rows (image | ground truth | maps), thumbnails beside the page linking to the
  full-size files; the gallery of `salnet.evaluation.gallery` and a run's panels are drawn by it.
- `results`: `write_results_page`, index.html of `python -m salnet.evaluate --out DIR`.
- `run`: `write_run_page`, the page of `python -m salnet.report runs/NAME --html`.
- `sweep`: `write_sweep_page`, the table of a sweep's cells (`python -m salnet.report --sweep runs/SWEEP`).

Each page is one file that works with no network and no server: no CDN, no font or script fetched,
every style and script inline, every picture a relative path beside the page. Everything that
comes from a user (dataset, method, set and image names, commands) is escaped.

Why inline SVG and no plotting library: the pages must open offline and stay small (a library
that embeds itself adds megabytes of JavaScript to every page), and an SVG is text in the page,
so the tests read the drawn points and a browser test hovers over them without a second source of
truth to keep in step.
"""
