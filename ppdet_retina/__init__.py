"""ppdet_retina: RetinaNet and Faster R-CNN as registered, config-driven PaddlePaddle components."""

__version__ = "0.1.0"

import warnings as _warnings

# Paddle warns at import when ccache is not installed; ccache only speeds up compiling custom C++
# ops, which this package never does. Effective when the package is imported before paddle (tools/).
_warnings.filterwarnings("ignore", message=r"No ccache found", category=UserWarning)
