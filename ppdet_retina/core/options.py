"""Training options: one declaration per option gives its top-level config key, its ``tools/train.py``
flag (when it has one) and whether it changes the traced inference graph.

    declare_training_options({"use_ema": TrainingOption("keep a moving average of the weights")})

The config checker then accepts the key (:func:`~ppdet_retina.core.workspace.register_top_level_keys`),
``tools/train.py`` adds the flags (:func:`~ppdet_retina.training.train_options.add_train_flags`), and the
export cache of the default engine leaves keys outside the graph out of its key
(:mod:`ppdet_retina.inference.engines`), so changing one reuses the cached export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Set

from ppdet_retina.core.workspace import register_top_level_keys

__all__ = ["TrainingOption", "TRAINING_OPTIONS", "declare_training_options", "train_flags", "keys_outside_graph"]


@dataclass(frozen=True)
class TrainingOption:
    """``help``: what the key does; ``flag``: how ``tools/train.py`` takes it (``switch``: ``--key`` alone
    means true; ``bool``: ``--key [BOOL]``; another word: the metavar of a value; None: config only);
    ``in_graph``: True when the key changes the traced inference graph."""

    help: str
    flag: Optional[str] = None
    in_graph: bool = False


TRAINING_OPTIONS: Dict[str, TrainingOption] = {}


def declare_training_options(options: Dict[str, TrainingOption]) -> None:
    """Declare ``options`` (config key -> :class:`TrainingOption`); later declarations of a key win."""
    register_top_level_keys({key: option.help for key, option in options.items()})
    TRAINING_OPTIONS.update(options)


def train_flags() -> Dict[str, TrainingOption]:
    """The declared options that ``tools/train.py`` takes as flags, in declaration order."""
    return {key: option for key, option in TRAINING_OPTIONS.items() if option.flag}


def keys_outside_graph() -> Set[str]:
    """Declared option keys that leave the traced inference graph unchanged."""
    return {key for key, option in TRAINING_OPTIONS.items() if not option.in_graph}
