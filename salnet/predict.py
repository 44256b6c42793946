"""The command `python -m salnet.predict` (its code: salnet.evaluation.predict)."""

from salnet.evaluation.predict import main

if __name__ == "__main__":
    main()
