"""The one command-line entry point: `dvi <command>`.

Each command lives in its own module under `dvi/commands/` and is registered below. Errors a user
can fix (bad flags, unknown models, unreachable services) surface as one line on stderr and exit 2.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from common.core.errors import DVIError
from common.runtime import quiet_libraries
from dvi.app import app

try:  # recent typer ships its own copy of click, whose usage errors are not click's
    from typer._click.exceptions import ClickException as _VendoredClickException
except ImportError:  # pragma: no cover - depends on the installed typer
    _VendoredClickException = None
_CLICK_ERRORS = tuple(e for e in (click.exceptions.ClickException, _VendoredClickException) if e)

COMMAND_MODULES = ("generate", "bench_speed", "bench_ablation", "bench_shift", "train", "warmstart", "service",
                   "dashboard", "monitor", "report")
"""The modules under `dvi/commands/` that register commands on `dvi.app`, in `--help` order. Each is
imported outright: a command whose module fails to import is an error, never a silent gap in `--help`."""


def _register() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"dvi.commands.{name}")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    logging.basicConfig(
        level=os.environ.get("DVI_LOG_LEVEL", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet_libraries()
    _register()
    try:
        app(args=argv, standalone_mode=False)
    except (DVIError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # typer raises this for --help and usage errors
        return int(exc.code or 0)
    except _CLICK_ERRORS as exc:  # usage errors (bad or missing flags)
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
