"""Shared plumbing for the entry scripts: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

from .errors import DlpError, ResultCheckFailed


def one_line_parse_errors(parser) -> None:
    """Make an argparse parser raise a one-line DlpError (exit 2 through :func:`run_cli`) where argparse would
    print its whole usage text: a bad float should not bury its one useful line under thirty lines of flags."""

    def error(message: str) -> None:
        raise DlpError(f"{message.splitlines()[0]} (see --help)")

    parser.error = error


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
