"""ppdet_retina: RetinaNet and Faster R-CNN as registered, config-driven PaddlePaddle components."""

__version__ = "0.1.0"
