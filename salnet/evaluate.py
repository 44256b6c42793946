"""The command `python -m salnet.evaluate` (its code: salnet.evaluation.evaluate)."""

from salnet.evaluation.evaluate import main

if __name__ == "__main__":
    main()
