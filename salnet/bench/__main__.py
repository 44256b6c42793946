"""Dispatch `python -m salnet.bench NAME [args]` to `salnet.bench.NAME.main(args)`."""

import importlib
import pkgutil
import sys

import salnet.bench as package


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def main(argv: list[str]) -> None:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m salnet.bench NAME [args]   (NAME --help for its options)")
        print("benchmarks: " + (", ".join(names) or "(none yet)"))
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(
            f"salnet.bench: unknown benchmark '{name}'; available: {', '.join(names) or '(none yet)'}", file=sys.stderr
        )
        sys.exit(2)
    importlib.import_module(f"salnet.bench.{name}").main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
