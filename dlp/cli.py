"""Shared plumbing for the entry scripts: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

from .errors import DlpError, ResultCheckFailed
from .rundir import is_out_of_space


def one_line_parse_errors(parser) -> None:
    """Make an argparse parser raise a one-line DlpError (exit 2 through :func:`run_cli`) where argparse would
    print its whole usage text: a bad float should not bury its one useful line under thirty lines of flags."""

    def error(message: str) -> None:
        raise DlpError(f"{message.splitlines()[0]} (see --help)")

    parser.error = error


def perplexity_change(ppl: dict, before: str, after: str) -> str:
    """``dense 29.53 → pruned 343.59`` for the scripts' result line; a figure the run did not measure says so."""

    def value(name: str) -> str:
        entry = ppl.get(name)
        return f"{entry['value']:.2f}" if entry else "not measured"

    return f"{before} {value(before)} → {after} {value(after)}"


def run_cli(main: Callable[[], object]) -> None:
    try:
        main()
    except ResultCheckFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1)
    except DlpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    except Exception as exc:  # a full disk in a write dlp does not wrap (a library's checkpoint): still one line
        if not is_out_of_space(exc):
            raise
        print(f"error: no space left on the device while writing ({str(exc).splitlines()[0][:160]})", file=sys.stderr)
        raise SystemExit(2)
