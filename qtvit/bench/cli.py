"""``qtvit bench``: the benchmarks, one sub-subcommand each (``qtvit bench attention``, ...).

A benchmark is a module listed in ``BENCH_MODULES`` with ``register(bench_subparsers)``, which
adds its parser and sets ``func`` (see :func:`qtvit.bench.attention.register`). Adding one (e.g.
``models``, ``pareto``) means writing its module and adding its name here. Modules are imported
when the parser is built, so their top level should import nothing beyond what ``qtvit`` itself
does (torch); optional packages (tqdm, matplotlib) belong inside the run function.
"""

from __future__ import annotations

import argparse
import importlib

# benchmark modules, each with register(bench_subparsers), in the order `qtvit bench -h` lists them
BENCH_MODULES = (
    "qtvit.bench.attention",
    "qtvit.bench.models",
    "qtvit.bench.pareto",
    "qtvit.bench.approximation",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``qtvit bench`` and every benchmark in ``BENCH_MODULES`` under it."""
    p = subparsers.add_parser("bench", help="benchmarks (attention kernels, ...)",
                              description="Benchmarks, each printing a table and writing JSON with an "
                                          "environment header.")
    bench_subparsers = p.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for module_name in BENCH_MODULES:
        importlib.import_module(module_name).register(bench_subparsers)
    p.set_defaults(func=lambda args: _missing_benchmark(p))


def _missing_benchmark(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
