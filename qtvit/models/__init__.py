"""Model families (EfficientViT/QT-ViT, plain ViT), the registry and checkpoint conversion."""

from .registry import (
    ModelCard,
    create_model,
    get_model_card,
    list_models,
    register_model,
    resolve_model_name,
)

__all__ = [
    "ModelCard", "create_model", "get_model_card", "list_models", "register_model", "resolve_model_name",
]
