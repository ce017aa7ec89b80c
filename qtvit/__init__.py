"""qtvit: vision transformers with linear attention from the quadratic Taylor expansion of exp."""

from .kernels import attention, feature_map, get_kernel, list_kernels, register_kernel
from .models import create_model, get_model_card, list_models, swap_attention
from .models.hub import save_pretrained

__version__ = "0.1.0"

__all__ = [
    "attention", "create_model", "feature_map", "get_kernel", "get_model_card", "list_kernels",
    "list_models", "register_kernel", "save_pretrained", "swap_attention", "__version__",
]
