"""``qtvit bench``: the benchmarks, one sub-subcommand each, with flags generated from the config
fields declared with :func:`flag` (the flag syntax: docs/BENCHMARKS.md)."""

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
BENCH_MODULES = ("qtvit.bench.attention", "qtvit.bench.models", "qtvit.bench.pareto",
                 "qtvit.bench.approximation")


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


Kind = str | Callable[[str], object]  # a kind name, or the item parser of a tuple of custom items
_METAVARS = {"ints": "N1,N2", "strs": "A,B", "floats": "X1,X2", "sizes": "S1,S2", "size": "HxW", "int": "N",
             "float": "X", "str": "TEXT"}


def field_kind(annotation: object) -> Kind:
    """``bool``, ``int``, ``float``, ``str``, their plurals, ``size``, ``sizes``, or an item parser."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        return field_kind(args[0])
    if typing.get_origin(annotation) is tuple:
        if args[-1] is Ellipsis:
            item = field_kind(args[0])
            return item + "s" if isinstance(item, str) else item
        return "size"  # tuple[int, int]
    return getattr(annotation, "parse", None) or annotation.__name__


def flag(default: object, help: str) -> object:
    """A config dataclass field that is a command-line flag with this help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def config_helps(config_class: type) -> dict[str, str]:
    """Field → help of the flags of ``config_class`` (a subclass re-declaring a field keeps its help)."""
    return {f.name: f.metadata["help"] for c in reversed(config_class.__mro__) if dataclasses.is_dataclass(c)
            for f in dataclasses.fields(c) if "help" in f.metadata}


def flag_name(config_class: type, name: str) -> str:
    """``--head-dims`` for field ``head_dims``, or the name the class's ``FLAG_NAMES`` gives it."""
    return "--" + getattr(config_class, "FLAG_NAMES", {}).get(name, name).replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type,
                         helps: dict[str, str] | None = None) -> None:
    """One flag per field named in ``helps`` (field → help; default :func:`config_helps`), typed from
    the annotation; a flag keeps the user's text (default None)."""
    hints, defaults = typing.get_type_hints(config_class), config_class()
    for name, text in (helps or config_helps(config_class)).items():
        kind, default, flag = field_kind(hints[name]), getattr(defaults, name), flag_name(config_class, name)
        if kind == "bool":  # switches that flip the default (both ways when it is None)
            for value in (True, False) if default is None else (not default,):
                parser.add_argument(flag if value else f"--no-{flag[2:]}", dest=name, action="store_const",
                                    const=str(value), help=text if value else f"do not {text}")
            continue
        if default is not None:
            text += f" (default {show_value(default, kind)})"
        elif isinstance(kind, str) and kind.endswith("s"):
            text += " (default all)"
        parser.add_argument(flag, dest=name, metavar=_METAVARS.get(kind, "A,B"), help=text)


def show_value(value: object, kind: Kind) -> str:
    """A field value as the flag text that parses back to it (see :func:`parse_value`)."""
    if not isinstance(kind, str):
        return ",".join(v.text for v in value)
    if kind.endswith("s"):
        return ",".join(show_value(v, kind[:-1]) for v in value)
    if kind == "size":
        return str(value[0]) if value[0] == value[1] else f"{value[0]}x{value[1]}"
    return format(value, "g") if isinstance(value, float) else str(value)


def parse_value(flag: str, kind: Kind, text: str) -> object:
    """The flag's text converted to the field's type (see :func:`field_kind`), or a one-line error."""
    if kind == "bool":
        return text == "True"
    if not isinstance(kind, str) or kind.endswith("s"):
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise QtvitError(f"{flag}: empty list")
        if not isinstance(kind, str):
            try:
                return tuple(kind(item) for item in items)
            except (ValueError, TypeError) as err:
                raise QtvitError(f"{flag}: {err}") from None
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


def config_from_args(base: object, args: argparse.Namespace, helps: dict[str, str] | None = None):
    """``base`` with every flag the user gave (``--repeats`` also caps ``min_repeats``), validated;
    a bad value becomes one ``QtvitError`` line."""
    cls = type(base)
    hints = typing.get_type_hints(cls)
    over = {name: parse_value(flag_name(cls, name), field_kind(hints[name]), getattr(args, name))
            for name in helps or config_helps(cls) if getattr(args, name, None) is not None}
    if "repeats" in over and hasattr(base, "min_repeats"):
        over["min_repeats"] = min(base.min_repeats, over["repeats"])
    config = dataclasses.replace(base, **over)
    try:
        config.validate()
    except (ValueError, TypeError) as err:
        raise QtvitError(f"bad setting: {err}") from None
    return config


def add_benchmark(bench_subparsers: argparse._SubParsersAction, name: str, *, help: str, doc: str,
                  config_class: type, quick: object, run: Callable[..., dict | None],
                  output: tuple[str, str, str] = ("--output", "FILE.json", "write the results as JSON"),
                  plot: tuple[str, Callable[[dict, str], object]] | None = None) -> argparse.ArgumentParser:
    """Add ``qtvit bench <name>`` (described by the first line of the module docstring ``doc``): an output
    flag (flag, metavar, help), ``--quick``, ``--plot FILE.png`` with ``plot`` (help, function) and the
    generated flags; ``run(config, args)`` returns the document to plot (after any malloc re-run)."""
    p = bench_subparsers.add_parser(name, help=help, description=doc.splitlines()[0].split(": ", 1)[1])
    p.add_argument(output[0], metavar=output[1], help=output[2])
    p.add_argument("--quick", action="store_true",
                   help="a smoke-test preset finishing in seconds (explicit flags still override it)")
    if plot:
        p.add_argument("--plot", metavar="FILE.png", help=plot[0])
    add_config_arguments(p, config_class)

    def main(args: argparse.Namespace) -> int:
        config = config_from_args(quick if args.quick else config_class(), args)  # bad flags fail here
        code = rerun_with_tuned_malloc(name, args, p) if hasattr(config, "system_malloc") else None
        if code is not None:
            return code
        doc, path = run(config, args), getattr(args, output[0][2:].replace("-", "_"))
        if doc is not None and path:
            print(f"\nwrote {path}")
        if plot and args.plot:
            print(f"wrote {plot[1](doc, args.plot)}")
        return 0

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
        if not switch or value == action.const:
            argv += [action.option_strings[0]] + ([] if switch else [str(value)])
    return argv


def rerun_with_tuned_malloc(benchmark: str, args: argparse.Namespace, parser: argparse.ArgumentParser
                            ) -> int | None:
    """The exit code of ``qtvit bench <benchmark>`` re-run under :data:`qtvit.bench.env.TUNED_MALLOC`,
    or None when this process should run the benchmark itself."""
    if not bench_env.needs_malloc_reexec(getattr(args, "system_malloc", None) is not None):
        return None
    environ = {**bench_env.tuned_environ(), **({"QTVIT_DEBUG": "1"} if getattr(args, "debug", False) else {})}
    settings = " ".join(f"{k}={v}" for k, v in bench_env.TUNED_MALLOC.items())
    print(f"qtvit bench: re-running with {settings} (--system-malloc to keep the defaults)",
          file=sys.stderr, flush=True)
    code = subprocess.call([sys.executable, "-m", "qtvit", "bench", benchmark, *argv_from_args(args, parser)],
                           env=environ)
    return code if code >= 0 else 128 - code
