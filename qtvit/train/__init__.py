"""Training and evaluation: typed config, the loop (DDP, AMP, EMA, BN re-estimation), checkpoints.

Typical use::

    from qtvit.train import Trainer, load_config
    cfg = load_config("qtvit_1", ["data.path=/data/imagenet", "train.amp=bf16"])
    Trainer(cfg, "runs/qtvit_1").fit()
"""

from .config import Config, load_config
from .evaluate import build_model, evaluate
from .trainer import FitResult, NonFiniteLossError, Trainer, resume_config

__all__ = ["Config", "FitResult", "NonFiniteLossError", "Trainer", "build_model", "evaluate", "load_config",
           "resume_config"]
