"""Data: image folders, the built-in demo set, Fashion-MNIST, model-resolved transforms and sampling."""

from .build import DATASETS, build_datasets
from .demo import RelationalShapes
from .fashion_mnist import FashionMNIST, read_idx
from .folders import BadImageError, check_image_folder, check_same_classes, image_folder, load_rgb
from .sampling import AugmentedDataset, GlobalBatchSampler, ShardSampler, sample_seed, seeded, step_size
from .transforms import TrainAugment, data_config, eval_transform, train_transforms

__all__ = [
    "DATASETS", "AugmentedDataset", "BadImageError", "FashionMNIST", "GlobalBatchSampler", "RelationalShapes",
    "ShardSampler", "TrainAugment", "build_datasets", "check_image_folder", "check_same_classes",
    "data_config", "eval_transform", "image_folder", "load_rgb", "read_idx", "sample_seed", "seeded",
    "step_size", "train_transforms",
]
