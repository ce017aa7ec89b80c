"""qtvit: vision transformers with linear attention from the quadratic Taylor expansion of exp."""

from .kernels import attention, feature_map, get_kernel, list_kernels, register_kernel

__version__ = "0.1.0"

__all__ = ["attention", "feature_map", "get_kernel", "list_kernels", "register_kernel", "__version__"]
