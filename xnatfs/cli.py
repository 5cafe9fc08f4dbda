"""The ``xnatfs`` command: sub-commands dispatch to their own modules."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xnatfs", description="Mount an XNAT archive.")
    commands = parser.add_subparsers(dest="command", required=True)
    testserver = commands.add_parser(
        "testserver", help="run the bundled XNAT-compatible server (tests, demos, benchmarks)")
    from .testing.cli import add_arguments

    add_arguments(testserver)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "testserver":
        from .testing.cli import run

        return run(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
