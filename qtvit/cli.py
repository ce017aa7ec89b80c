"""The ``qtvit`` command (also ``python -m qtvit``): one subcommand per job.

Subcommands live in their own modules and are found through ``SUBCOMMANDS``; each module's
``register(subparsers)`` adds its parser and sets ``func`` (heavy imports happen inside ``func``
so ``qtvit --help`` stays fast). Errors meant for the user print as one line; set
``QTVIT_DEBUG=1`` (or pass ``--debug``) for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import QtvitError

# subcommand module → registers one or more subcommands
SUBCOMMANDS = (
    "qtvit.kernels.cli",
    "qtvit.models.cli",
    "qtvit.models.convert_cli",
    "qtvit.bench.cli",
    "qtvit.train.cli",
    "qtvit.bench.reproduce",
    "qtvit.deploy.cli",
    "qtvit.tasks.detection.cli",
    "qtvit.tasks.segmentation.cli",
)

USER_ERRORS = (QtvitError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               ValueError, KeyError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtvit", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"qtvit {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and (module_name + ".").startswith(err.name + "."):  # part not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("QTVIT_DEBUG") == "1"
    try:
        result = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
    except BrokenPipeError:
        # The reader stopped early (``qtvit models | head -1``): finish quietly, as Unix tools do.
        # Later flushes (at exit) go to devnull instead of raising a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("qtvit: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"qtvit {args.command}: error: {message}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
