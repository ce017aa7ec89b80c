"""Test cases derived from the kernel registry: every registered kernel, with parameter variants.

A newly registered kernel is covered with its default parameters automatically; kernels whose
parameters change the computation list extra variants here.
"""

from __future__ import annotations

import qtvit

EXTRA_PARAMS: dict[str, list[dict]] = {
    "taylor2_pool": [{"pool": 2}, {"pool": 4}, {"pool": 2, "scaling": "preserve"}, {"pool": 4, "scaling": "preserve"}],
    "taylor2_chunk": [{"chunks": 2}, {"chunks": 4}, {"chunks": 8}, {"chunks": 8, "scaling": "preserve"}],
    "taylor2_random": [{"seed": 0}, {"seed": 7}, {"seed": 0, "scaling": "preserve"}],
    "qt": [{}, {"const": 0.3}],
    "qt_paper": [{}, {"alpha": 0.7, "beta": 0.5, "gamma": 1.3}],
}


def kernel_cases(linear_only: bool = False) -> list[tuple[str, dict]]:
    """(kernel name, params) for every registered kernel and its parameter variants."""
    return [(name, params) for name in qtvit.list_kernels(linear_only=linear_only)
            for params in EXTRA_PARAMS.get(name, [{}])]


def case_id(case: tuple[str, dict]) -> str:
    name, params = case
    return name + "".join(f"-{k}{v}" for k, v in params.items())
