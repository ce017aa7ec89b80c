"""Object detection and instance segmentation: COCO data, a synthetic set, COCO evaluation, the
training task and the ``qtvit det`` command. Models live in :mod:`qtvit.models.detection`."""
