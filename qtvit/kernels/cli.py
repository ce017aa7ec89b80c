"""``qtvit kernels``: list the registered attention kernels."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("kernels", help="list the attention kernels")
    p.add_argument("--head-dim", type=int, default=16, help="head dim d for the feature-dim column")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from . import get_kernel, list_kernels

    print(f"{'kernel':16s} {'D(d=' + str(args.head_dim) + ')':>8s} {'normalised':>10s}  params"
          f"{'':14s} description")
    for name in list_kernels():
        kern = get_kernel(name)
        dim = kern.feature_dim(args.head_dim, **kern.params) if kern.has_linear else "dense"
        params = ", ".join(f"{k}={v}" for k, v in kern.params.items()) or "-"
        print(f"{name:16s} {dim!s:>8s} {str(kern.normalized):>10s}  {params:20s} {kern.description}")
    return 0
