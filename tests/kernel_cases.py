"""Test cases derived from the kernel registry: every registered kernel, with parameter variants.

A newly registered kernel is covered with its default parameters automatically; kernels whose
parameters change the computation list extra variants here.
"""

from __future__ import annotations

import contextlib

import torch

import qtvit
from qtvit.kernels import functional as kfun
from qtvit.kernels import linear as klin

EXTRA_PARAMS: dict[str, list[dict]] = {
    "taylor2_pool": [{"pool": 2}, {"pool": 4}, {"pool": 2, "scaling": "preserve"},
                     {"pool": 4, "scaling": "preserve"}],
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


@contextlib.contextmanager
def counting_chunks(linear_bytes: int | None = None, dense_bytes: int | None = None):
    """Shrink the token-chunk budgets and record how many token ranges every chunked pass used.

    Yields a list that receives one entry per pass (key sums, query blocks, dense query blocks):
    the number of chunks it ran. A test asserts on it that chunking really happened.
    """
    counts: list[int] = []
    saved = klin.CHUNK_BYTES, klin.MIN_CHUNK_TOKENS, klin.token_ranges, dict(kfun.DENSE_CHUNK_BYTES)
    original = klin.token_ranges

    def recording(n, chunk):
        ranges = original(n, chunk)
        counts.append(len(ranges))
        return ranges

    if linear_bytes is not None:
        klin.CHUNK_BYTES, klin.MIN_CHUNK_TOKENS = linear_bytes, 1
    if dense_bytes is not None:
        kfun.DENSE_CHUNK_BYTES.update(cpu=dense_bytes)
    klin.token_ranges = recording
    try:
        yield counts
    finally:
        klin.CHUNK_BYTES, klin.MIN_CHUNK_TOKENS, klin.token_ranges = saved[:3]
        kfun.DENSE_CHUNK_BYTES.clear()
        kfun.DENSE_CHUNK_BYTES.update(saved[3])


# A budget of ~20 tokens per chunk for (1, 2, tokens, ≤ 20 floats) temporaries in float64.
SMALL_CHUNK_BYTES = 2 * 8 * 20 * 8


def chunked_linear_paths() -> list[tuple[str, dict, str]]:
    """(kernel, params, path) for every linear-path cell that really splits tokens into chunks.

    ``path`` is ``"generic"`` (the feature-map path, every kernel with a feature map) or
    ``"linear"`` (what ``impl="linear"`` runs, for kernels with a specialised form). Found by running
    each on 70 queries / 90 keys with a small chunk budget; cells that run in one pass (e.g. the
    taylor2 family's specialised loop, which never chunks) are left out.
    """
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for n in (70, 90, 90))
    found = []
    for name, params in kernel_cases(linear_only=True):
        paths = ["generic"] + (["linear"] if qtvit.get_kernel(name).linear_impl is not None else [])
        for path in paths:
            with counting_chunks(SMALL_CHUNK_BYTES) as counts, torch.no_grad():
                run_linear_path(path, q, k, v, name, params)
            if max(counts, default=1) > 1:
                found.append((name, params, path))
    return found


def run_linear_path(path: str, q, k, v, name: str, params: dict):
    if path == "generic":
        return qtvit.kernels.linear_attention_generic(q, k, v, name, **params)
    return qtvit.attention(q, k, v, name, impl=path, **params)


def path_id(cell: tuple[str, dict, str]) -> str:
    return case_id(cell[:2]) + "-" + cell[2]
