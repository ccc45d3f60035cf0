"""Shared plumbing for the entry scripts: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

from .errors import DlpError


def run_cli(main: Callable[[], object]) -> None:
    try:
        main()
    except DlpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
