"""``qtvit bench``: the benchmarks, one sub-subcommand each, with flags generated from their configs.

A benchmark module listed in ``BENCH_MODULES`` defines ``register(bench_subparsers)``. The
measuring benchmarks (attention, models, pareto) call :func:`add_benchmark`, which turns fields of
their config dataclass into flags (:func:`add_config_arguments`): ``--tokens 64,128`` for
``tokens: tuple[int, ...]``, ``--backward`` for a bool that defaults to False, ``--no-progress``
for one that defaults to True, sizes as ``224`` or ``1024x2048``, ``all`` for an optional list.
Every flag keeps the user's text (default None), so ``--quick`` (a smaller preset) and explicit
values can be told apart, and the exact flags can be handed to a re-run under tuned malloc
settings (:mod:`qtvit.bench.env`). Modules are imported when the parser is built: their top level
imports nothing beyond torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import subprocess
import sys
import types
import typing
from collections.abc import Callable

from ..errors import QtvitError
from . import env as bench_env

# benchmark modules, each with register(bench_subparsers), in the order `qtvit bench -h` lists them
BENCH_MODULES = (
    "qtvit.bench.attention",
    "qtvit.bench.models",
    "qtvit.bench.pareto",
    "qtvit.bench.approximation",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``qtvit bench`` and every benchmark in ``BENCH_MODULES`` under it."""
    p = subparsers.add_parser("bench", help="benchmarks (attention kernels, models, Pareto front, ...)",
                              description="Benchmarks, each printing a table and writing JSON with an "
                                          "environment header (machine, software, git commit).")
    bench_subparsers = p.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for module_name in BENCH_MODULES:
        importlib.import_module(module_name).register(bench_subparsers)
    # `qtvit bench seg` is `qtvit seg bench`: one implementation, listed with the other benchmarks
    importlib.import_module("qtvit.tasks.segmentation.bench").register(bench_subparsers, name="seg")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


# ------------------------------------------------------------------- dataclass → argparse

_METAVARS = {"ints": "N1,N2", "strs": "A,B", "sizes": "S1,S2", "size": "HxW", "int": "N", "float": "X",
             "str": "TEXT"}


def field_kind(annotation: object) -> str:
    """``bool``, ``int``, ``float``, ``str``, ``ints``, ``strs``, ``size`` or ``sizes`` for a field type."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        return field_kind(args[0])
    if typing.get_origin(annotation) is tuple:
        if args[-1] is Ellipsis:
            return {"int": "ints", "str": "strs", "size": "sizes"}[field_kind(args[0])]
        return "size"  # tuple[int, int]
    return annotation.__name__


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, helps: dict[str, str]) -> None:
    """One flag per field named in ``helps`` (field → help text), typed from the annotation."""
    hints = typing.get_type_hints(config_class)
    defaults = config_class()
    for name, text in helps.items():
        kind, default = field_kind(hints[name]), getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        if kind == "bool":  # a switch that flips the default; "do not <help>" for --no-<field>
            parser.add_argument(f"--no-{flag[2:]}" if default else flag, dest=name, action="store_const",
                                const=str(not default), help=f"do not {text}" if default else text)
            continue
        if default is not None or kind.endswith("s"):
            text += f" (default {'all' if default is None else show_value(default, kind)})"
        parser.add_argument(flag, dest=name, metavar=_METAVARS[kind], help=text)


def show_value(value: object, kind: str) -> str:
    """A field value as the flag text that parses back to it (see :func:`parse_value`)."""
    if kind in ("ints", "strs", "sizes"):
        return ",".join(show_value(v, kind[:-1]) for v in value)
    if kind == "size":
        return str(value[0]) if value[0] == value[1] else f"{value[0]}x{value[1]}"
    return format(value, "g") if isinstance(value, float) else str(value)


def parse_value(flag: str, kind: str, text: str) -> object:
    """The flag's text converted to the field's type (see :func:`field_kind`), or a one-line error."""
    if kind == "bool":
        return text == "True"
    if kind in ("ints", "strs", "sizes"):
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise QtvitError(f"{flag}: empty list")
        if kind == "strs":
            return None if items == ["all"] else tuple(items)
        return tuple(parse_value(flag, kind[:-1], item) for item in items)
    if kind == "size":  # "224" → (224, 224); "1024x2048" → (1024, 2048) (H×W)
        try:
            values = [int(p) for p in text.strip().lower().replace("×", "x").split("x")]
        except ValueError:
            raise QtvitError(f"{flag}: {text!r} is not a size (use 224 or 1024x2048)") from None
        values *= 2 if len(values) == 1 else 1
        if len(values) != 2 or min(values) < 32:
            raise QtvitError(f"{flag}: {text!r} must be N or HxW with sides ≥ 32")
        return values[0], values[1]
    try:
        return {"int": int, "float": float, "str": str}[kind](text)
    except ValueError:
        raise QtvitError(f"{flag}: {text!r} is not {'an integer' if kind == 'int' else 'a number'}") from None


def config_from_args(base: object, args: argparse.Namespace, helps: dict[str, str]):
    """``base`` with every flag the user gave (``--repeats`` also caps ``min_repeats``), validated;
    a bad value becomes one ``QtvitError`` line."""
    hints = typing.get_type_hints(type(base))
    over = {name: parse_value("--" + name.replace("_", "-"), field_kind(hints[name]), getattr(args, name))
            for name in helps if getattr(args, name, None) is not None}
    if "repeats" in over and hasattr(base, "min_repeats"):
        over["min_repeats"] = min(base.min_repeats, over["repeats"])
    config = dataclasses.replace(base, **over)
    try:
        config.validate()
    except ValueError as err:
        raise QtvitError(f"bad setting: {err}") from None
    return config


# ----------------------------------------------------------------------- one benchmark


def add_benchmark(bench_subparsers: argparse._SubParsersAction, name: str, *, help: str, description: str,
                  config_class: type, quick: object, helps: dict[str, str], output: tuple[str, str, str],
                  run: Callable[[object, argparse.Namespace], int]) -> argparse.ArgumentParser:
    """Add ``qtvit bench <name>``: an output flag (flag, metavar, help), ``--quick``, the generated
    flags; ``run(config, args)`` does the work once the flags are resolved and, on glibc, the
    process has re-run itself under tuned malloc settings."""
    p = bench_subparsers.add_parser(name, help=help, description=description)
    p.add_argument(output[0], metavar=output[1], help=output[2])
    p.add_argument("--quick", action="store_true",
                   help="a smoke-test preset finishing in seconds (explicit flags still override it)")
    add_config_arguments(p, config_class, helps)

    def main(args: argparse.Namespace) -> int:
        config = config_from_args(quick if args.quick else config_class(), args, helps)  # bad flags fail here
        code = rerun_with_tuned_malloc(name, args, p)
        return run(config, args) if code is None else code

    p.set_defaults(func=main)
    return p


def argv_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The flags that reproduce ``args`` for ``parser`` (values are the text the user gave)."""
    argv: list[str] = []
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest == "help" or value is None or value is False:
            continue
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreConstAction))
        argv += [action.option_strings[0]] + ([] if switch else [str(value)])
    return argv


def rerun_with_tuned_malloc(benchmark: str, args: argparse.Namespace, parser: argparse.ArgumentParser
                            ) -> int | None:
    """Re-run ``qtvit bench <benchmark>`` under :data:`qtvit.bench.env.TUNED_MALLOC` when needed.

    Returns the child's exit code, or None when this process should run the benchmark itself.
    """
    if not bench_env.needs_malloc_reexec(getattr(args, "system_malloc", None) is not None):
        return None
    cmd = [sys.executable, "-m", "qtvit", "bench", benchmark, *argv_from_args(args, parser)]
    environ = bench_env.tuned_environ()
    if getattr(args, "debug", False):
        environ["QTVIT_DEBUG"] = "1"
    settings = " ".join(f"{k}={v}" for k, v in bench_env.TUNED_MALLOC.items())
    print(f"qtvit bench: re-running with {settings} (--system-malloc to keep the defaults)",
          file=sys.stderr, flush=True)
    code = subprocess.call(cmd, env=environ)
    return code if code >= 0 else 128 - code
