"""Object detection and instance segmentation: COCO data, a synthetic set, COCO evaluation, the
training task (``task: detection`` in a recipe) and the ``qtvit det`` command. Models live in
:mod:`qtvit.models.detection`; importing this package registers the task with the Trainer."""

from .task import DetectionConfig, DetectionTask

__all__ = ["DetectionConfig", "DetectionTask"]
