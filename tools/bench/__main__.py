"""``python -m tools.bench CASE [--flags]``: see :mod:`tools.bench` for the cases."""

from __future__ import annotations

import importlib
import sys
from typing import Any

from tools.bench import CASES, OTHER_CASES, THROUGHPUT_CASES
from tools.bench import __doc__ as USAGE


def main(argv: list[str] | None = None) -> Any:
    """Runs the case named by ``argv[0]`` with the rest of ``argv``; returns what the case returns."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return None
    names = THROUGHPUT_CASES if argv[0] == "all" else tuple(n.strip() for n in argv[0].split(","))
    if all(n in THROUGHPUT_CASES for n in names):
        from tools.bench import fits

        return fits.main(argv[1:], names)
    if len(names) == 1 and names[0] in OTHER_CASES:
        return importlib.import_module(f"tools.bench.{names[0]}").main(argv[1:])
    print(
        f"python -m tools.bench: {argv[0]!r} is not a case: use one of {', '.join(CASES)} (throughput cases"
        f" can be named together, e.g. overhead,callbacks; all: {','.join(THROUGHPUT_CASES)})",
        file=sys.stderr,
    )
    raise SystemExit(2)


if __name__ == "__main__":
    main()
