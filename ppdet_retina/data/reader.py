"""Readers: build a ``paddle.io.DataLoader`` that yields the batch dict of docs/DESIGN.md.

Batch keys, shapes and dtypes (the gt keys only when the dataset has boxes)::

    image        float32 [B,3,H,W]   im_shape     float32 [B,2]   scale_factor float32 [B,2]
    im_id        int64   [B,1]       gt_bbox      float32 [B,G,4] gt_class     int32   [B,G,1]
    is_crowd     int32   [B,G,1]     pad_gt_mask  float32 [B,G,1]

Distributed runs (``paddle.distributed.get_world_size() > 1``) use
``paddle.io.DistributedBatchSampler``: each rank reads a disjoint strided
share of the (shuffled, for training) indices. Evaluation is run by rank 0
alone over the whole set with a plain sampler (the engine passes it), so every
image is seen exactly once; the metric still keeps one result per ``im_id``.
Errors in the sample or batch ops (a corrupt image, say) are carried to the
main process inside the batch and raised there as ``ValueError`` naming the
file: paddle's loader threads would otherwise replace them with a bare
"Blocking queue is killed".

Call ``loader.batch_sampler.set_epoch(epoch)`` each epoch so that distributed
shuffling differs between epochs (the single-process sampler reshuffles itself).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import paddle

from ppdet_retina.core.workspace import ConfigError, register
from ppdet_retina.data.transforms import Compose, build_ops

__all__ = ["TrainReader", "EvalReader", "TestReader", "BatchCollator", "DetDataLoader", "BATCH_DTYPES"]

# Output order and dtype of every batch key.
BATCH_DTYPES: Dict[str, Any] = {
    "image": np.float32,
    "im_shape": np.float32,
    "scale_factor": np.float32,
    "im_id": np.int64,
    "gt_bbox": np.float32,
    "gt_class": np.int32,
    "is_crowd": np.int32,
    "pad_gt_mask": np.float32,
}
_PAD_HINT = "add '- PadBatch: {pad_to_stride: 32}' to batch_transforms"
# Batch key that carries an error message (uint8 bytes) from a worker to the main process.
ERROR_KEY = "__error__"


def _error_batch(err: BaseException) -> Dict[str, np.ndarray]:
    text = f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err)
    return {ERROR_KEY: np.frombuffer(text.encode("utf-8"), np.uint8).copy()}


class _ErrorCatchingDataset(paddle.io.Dataset):
    """Returns the error of ``dataset[i]`` as a marker sample instead of raising it in a worker."""

    def __init__(self, dataset: Any):
        super().__init__()
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        # ``loader.dataset.clsid2catid`` etc. keep working through the wrapper.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, idx: int) -> dict:
        try:
            return self.dataset[idx]
        except Exception as err:  # noqa: BLE001 - raised again in the main process
            return _error_batch(err)


class DetDataLoader(paddle.io.DataLoader):
    """A paddle DataLoader that raises, in the main process, the errors its workers caught."""

    def __iter__(self):
        for batch in super().__iter__():
            if ERROR_KEY in batch:
                raise ValueError(bytes(np.asarray(batch[ERROR_KEY]).astype(np.uint8)).decode("utf-8"))
            yield batch


class BatchCollator:
    """Apply the batch ops to a list of samples, then stack each DESIGN key into one array."""

    def __init__(self, batch_ops: Sequence[Any]):
        self.batch_ops = Compose(batch_ops)

    def __call__(self, samples: List[dict]) -> Dict[str, np.ndarray]:
        for sample in samples:
            if ERROR_KEY in sample:
                return sample
        try:
            return self._collate(samples)
        except Exception as err:  # noqa: BLE001 - raised again in the main process
            return _error_batch(err)

    def _collate(self, samples: List[dict]) -> Dict[str, np.ndarray]:
        samples = self.batch_ops(list(samples))
        batch = {}
        for key, dtype in BATCH_DTYPES.items():
            present = [key in s for s in samples]
            if not any(present):
                continue
            if not all(present):
                raise ValueError(f"batch key '{key}' is missing from some samples; {_PAD_HINT}")
            batch[key] = _stack(key, [s[key] for s in samples], dtype, samples)
        return batch


def _stack(key: str, values: List[Any], dtype: Any, samples: List[dict]) -> np.ndarray:
    if key == "im_id":
        return np.asarray(values, dtype).reshape(-1, 1)
    arrays = [np.asarray(v, dtype) for v in values]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        files = [s.get("im_file") for s in samples]
        raise ValueError(f"cannot stack '{key}' of shapes {sorted(shapes)} (files {files}); {_PAD_HINT}")
    return np.stack(arrays)


class BaseReader:
    """Turns a dataset and op lists into a DataLoader; subclasses only change defaults.

    Config keys:
        sample_transforms: list of one-key op dicts (``- Resize: {target_size: [800, 1333]}``).
        batch_transforms: list of batch ops (``- PadBatch: {pad_to_stride: 32}``).
        batch_size: images per batch (per rank when distributed).
        shuffle, drop_last: as in paddle.io.BatchSampler.
        num_classes: shared top-level key; accepted for PaddleDetection configs.
        collate_batch: accepted for PaddleDetection configs; gts are always padded to
            one length with ``pad_gt_mask`` (what PaddleDetection's False leaves as lists).
        use_shared_memory: passed to the DataLoader (worker -> main transfer through /dev/shm).
        fuse_normalize, inputs_def: accepted for PaddleDetection configs (export options; unused here).

    ``reader(dataset, worker_num)`` returns the DataLoader yielding batch dicts of paddle tensors.
    """

    __shared__ = ["num_classes"]

    def __init__(self, sample_transforms: Optional[Sequence[Any]] = None,
                 batch_transforms: Optional[Sequence[Any]] = None, batch_size: int = 1,
                 shuffle: bool = False, drop_last: bool = False, num_classes: int = 80,
                 collate_batch: bool = True, use_shared_memory: bool = False,
                 fuse_normalize: bool = False, inputs_def: Optional[dict] = None):
        name = type(self).__name__
        if int(batch_size) < 1:
            raise ConfigError(f"{name}.batch_size must be >= 1, got {batch_size}")
        self.sample_ops = build_ops(sample_transforms, f"{name}.sample_transforms")
        self.batch_ops = build_ops(batch_transforms, f"{name}.batch_transforms")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.num_classes = num_classes
        self.collate_batch = bool(collate_batch)
        self.use_shared_memory = bool(use_shared_memory)
        self.fuse_normalize = bool(fuse_normalize)
        self.inputs_def = inputs_def

    def make_batch_sampler(self, dataset: Any) -> paddle.io.BatchSampler:
        if paddle.distributed.get_world_size() > 1:
            return paddle.io.DistributedBatchSampler(dataset, batch_size=self.batch_size,
                                                     shuffle=self.shuffle, drop_last=self.drop_last)
        return paddle.io.BatchSampler(dataset, shuffle=self.shuffle, batch_size=self.batch_size,
                                      drop_last=self.drop_last)

    def __call__(self, dataset: Any, worker_num: int = 0, batch_sampler: Any = None,
                 return_list: bool = True) -> DetDataLoader:
        if len(dataset) == 0:
            raise ValueError(f"{type(self).__name__}: the dataset is empty")
        sampler = batch_sampler or self.make_batch_sampler(dataset)
        if len(sampler) == 0:
            ranks = paddle.distributed.get_world_size()
            raise ValueError(f"{type(self).__name__}: {len(dataset)} image(s) make no batch of batch_size "
                             f"{self.batch_size} with drop_last: true" + (f" on each of {ranks} processes"
                                                                          if ranks > 1 else "")
                             + "; lower batch_size or set drop_last: false")
        dataset.set_transform(Compose(self.sample_ops))
        return DetDataLoader(
            _ErrorCatchingDataset(dataset),
            batch_sampler=sampler,
            collate_fn=BatchCollator(self.batch_ops),
            num_workers=max(0, int(worker_num)),
            use_shared_memory=self.use_shared_memory,
            return_list=return_list,
        )


@register
class TrainReader(BaseReader):
    """Training reader: shuffle and drop_last on by default. Keys: see BaseReader."""

    def __init__(self, sample_transforms: Optional[Sequence[Any]] = None,
                 batch_transforms: Optional[Sequence[Any]] = None, batch_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True, num_classes: int = 80,
                 collate_batch: bool = True, use_shared_memory: bool = False,
                 fuse_normalize: bool = False, inputs_def: Optional[dict] = None):
        super().__init__(sample_transforms, batch_transforms, batch_size, shuffle, drop_last,
                         num_classes, collate_batch, use_shared_memory, fuse_normalize, inputs_def)


@register
class EvalReader(BaseReader):
    """Evaluation reader: no shuffle, keeps the last partial batch. Keys: see BaseReader."""

    def __init__(self, sample_transforms: Optional[Sequence[Any]] = None,
                 batch_transforms: Optional[Sequence[Any]] = None, batch_size: int = 1,
                 shuffle: bool = False, drop_last: bool = False, num_classes: int = 80,
                 collate_batch: bool = True, use_shared_memory: bool = False,
                 fuse_normalize: bool = False, inputs_def: Optional[dict] = None):
        super().__init__(sample_transforms, batch_transforms, batch_size, shuffle, drop_last,
                         num_classes, collate_batch, use_shared_memory, fuse_normalize, inputs_def)


@register
class TestReader(BaseReader):
    """Inference reader: no shuffle, keeps the last partial batch. Keys: see BaseReader."""

    __test__ = False  # not a pytest class

    def __init__(self, sample_transforms: Optional[Sequence[Any]] = None,
                 batch_transforms: Optional[Sequence[Any]] = None, batch_size: int = 1,
                 shuffle: bool = False, drop_last: bool = False, num_classes: int = 80,
                 collate_batch: bool = True, use_shared_memory: bool = False,
                 fuse_normalize: bool = False, inputs_def: Optional[dict] = None):
        super().__init__(sample_transforms, batch_transforms, batch_size, shuffle, drop_last,
                         num_classes, collate_batch, use_shared_memory, fuse_normalize, inputs_def)
