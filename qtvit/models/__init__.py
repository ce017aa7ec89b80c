"""Model families (EfficientViT/QT-ViT, plain ViT), the registry and checkpoint conversion."""

# Registration order is listing order: the classifiers first, then the dense-prediction models.
from . import efficientvit  # noqa: F401, I001  (registers qtvit_b0..l3 / qtvit_1..6)
from . import vit  # noqa: F401  (registers the plain-ViT family)
from . import segmentation  # noqa: F401  (registers the UperNet / SegHead segmentation models)
from . import detection  # noqa: F401  (registers the Cascade Mask R-CNN / Mask R-CNN detectors)
from .checkpoint import (
    convert_state_dict,
    detect_layout,
    load_checkpoint,
    read_state_dict,
    save_state_dict,
)
from .registry import (
    ModelCard,
    create_model,
    get_model_card,
    list_models,
    register_model,
    resolve_model_name,
)
from .swap import swap_attention

__all__ = [
    "ModelCard", "create_model", "get_model_card", "list_models", "register_model", "resolve_model_name",
    "swap_attention",
    "convert_state_dict", "detect_layout", "load_checkpoint", "read_state_dict", "save_state_dict",
]

# Keep last: registers every model above with timm, now if timm is imported, else when it is
# (timm stays optional and is never imported here).
from .timm_integration import enable_timm_integration  # noqa: E402

enable_timm_integration()
