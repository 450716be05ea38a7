"""Command-line entry point ``tracin``. Errors from tracin become one line and exit status 2."""

from __future__ import annotations

import argparse
import sys

import tracin
from tracin._errors import TracInError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracin",
        description="TracIn: which training examples made a model predict what it predicts.",
    )
    parser.add_argument("--version", action="version", version=f"tracin {tracin.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="train a small CNN on bundled digits with flipped labels and explain it"
    )
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed for data split, noise, training")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from tracin._demo import run_demo

            return run_demo(args.out, args.seed)
        _parser().print_help()
        return 0
    except TracInError as exc:
        print(f"tracin: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
