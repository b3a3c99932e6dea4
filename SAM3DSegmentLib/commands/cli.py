"""The ``sam3d`` command line: one module per subcommand beside this one.

Exit codes: 0 done; 2 bad input the user can fix (the library's own errors and argparse's usage
errors), with one message saying what to do; 130 interrupted; 1 (a traceback) is a bug to report.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import SAM3DError

# One module per subcommand in this package; each defines add_parser(subparsers).
COMMANDS: tuple[str, ...] = ("segment", "demo", "models", "eval", "bench", "serve", "finetune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam3d", description="Promptable 3D segmentation with Segment Anything models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # tables use "±": never crash on an ASCII terminal
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        return int(args.run(args) or 0)
    except SAM3DError as exc:
        print(f"sam3d {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sam3d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
