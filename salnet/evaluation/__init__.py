"""The evaluation workflow: predict, evaluate and export, and what they share.

- `common`: a best.pt as a ready network and predict function, NAME=VALUE arguments, errors that
  every rank raises together, the command-line error exit.
- `folders`: saliency-map and ground-truth folders matched by file stem, read as PySODEvalToolkit reads them.
- `tables`: the results as console, CSV, Markdown and LaTeX tables.
- `predict`, `evaluate`, `export`: the code of the commands `python -m salnet.predict|evaluate|export`.
"""
