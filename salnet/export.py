"""The command `python -m salnet.export` (its code: salnet.evaluation.export)."""

from salnet.evaluation.export import main

if __name__ == "__main__":
    main()
