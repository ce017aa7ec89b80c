"""Attention kernels: feature maps, pairwise weights, dense and linear paths, and the registry."""

from . import definitions  # noqa: F401  (registers the built-in kernels)
from .definitions import EPS, qt_hat, random_product_pairs, symmetric_outer
from .functional import (
    IMPLS,
    attention,
    cast_back,
    choose_impl,
    compute_dtype,
    feature_map,
    fp32_region,
    kernel_attention,
    linear_attention_generic,
)
from .registry import Kernel, get_kernel, list_kernels, register_kernel

__all__ = [
    "EPS", "IMPLS", "Kernel", "attention", "cast_back", "choose_impl", "compute_dtype", "feature_map",
    "fp32_region", "get_kernel", "kernel_attention", "linear_attention_generic", "list_kernels", "qt_hat",
    "random_product_pairs", "register_kernel", "symmetric_outer",
]
