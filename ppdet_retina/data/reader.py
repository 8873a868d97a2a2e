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
Errors in the sample or batch ops are carried to the main process inside the
batch and raised there as ``ValueError`` naming the file: paddle's loader
threads would otherwise replace them with a bare "Blocking queue is killed".

Broken images (:class:`~ppdet_retina.data.transforms.BadImageError`: unreadable,
truncated, or a size that fits no orientation of the annotation) do not stop a
run. The training reader replaces such a sample with the next readable one in
dataset order; the eval and test readers leave it out of its batch (for
evaluation its ground truth still counts, as missed). Either way the main
process logs one warning per file naming it and its image id, and
``loader.bad_images`` lists this epoch's broken files (file, image id, reason;
each once) so far. When they are more than ``max_bad_image_ratio`` of the epoch's
samples (on this process), the loader raises a ``ValueError`` naming the first.

Call ``loader.batch_sampler.set_epoch(epoch)`` each epoch so that distributed
shuffling differs between epochs (the single-process sampler reshuffles itself).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import paddle

from ppdet_retina.core.workspace import ConfigError, register
from ppdet_retina.data.transforms import BadImageError, Compose, build_ops

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
# Sample / batch key listing the broken images met while making it (JSON as uint8 bytes in a batch).
BAD_KEY = "__bad_images__"
# Replacement attempts for one training sample before the reader gives up.
_MAX_REPLACEMENTS = 16

logger = logging.getLogger(__name__)
# Every rank names its own broken files (the package logger shows only errors on ranks other than 0).
logger.setLevel(logging.WARNING)


def _error_batch(err: BaseException) -> Dict[str, np.ndarray]:
    text = f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err)
    return {ERROR_KEY: _bytes_of(text)}


def _bytes_of(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).copy()


def _text_of(value: Any) -> str:
    return bytes(np.asarray(value).astype(np.uint8)).decode("utf-8")


def _bad_record(err: BadImageError) -> Dict[str, Any]:
    return {"im_file": err.im_file, "im_id": err.im_id, "reason": err.reason}


class _ErrorCatchingDataset(paddle.io.Dataset):
    """Returns the error of ``dataset[i]`` as a marker sample instead of raising it in a worker.

    A :class:`BadImageError` is not an error of the run: with ``replace_bad`` the next
    indices are tried until one reads, and the sample carries the failures under BAD_KEY;
    otherwise a marker sample holding only BAD_KEY stands in for it.
    """

    def __init__(self, dataset: Any, replace_bad: bool = False):
        super().__init__()
        self.dataset = dataset
        self.replace_bad = bool(replace_bad)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        # ``loader.dataset.clsid2catid`` etc. keep working through the wrapper.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, idx: int) -> dict:
        bad: List[Dict[str, Any]] = []
        for attempt in range(_MAX_REPLACEMENTS + 1):
            try:
                sample = self.dataset[(idx + attempt) % len(self.dataset)]
            except BadImageError as err:
                bad.append(_bad_record(err))
                if not self.replace_bad:
                    return {BAD_KEY: bad}
                continue
            except Exception as err:  # noqa: BLE001 - raised again in the main process
                return _error_batch(err)
            if bad:
                sample[BAD_KEY] = bad
            return sample
        return _error_batch(ValueError(
            f"{len(bad)} images in a row (dataset indices {idx}..{idx + _MAX_REPLACEMENTS}) could not be read, "
            f"the first {bad[0]['im_file']} (image id {bad[0]['im_id']}): {bad[0]['reason']}. "
            f"Check the image folder (image_dir) and the files"))


class DetDataLoader(paddle.io.DataLoader):
    """A paddle DataLoader that raises, in the main process, the errors its workers caught,
    and reports the broken images they replaced or left out.

    Args (besides paddle.io.DataLoader's):
        max_bad_image_ratio: stop (ValueError) once more than this share of an epoch's samples
            have failed to read.
        replaced: whether broken images were replaced (training) or left out; for the messages.
        owner: the config section named in the messages (``TrainReader``).
    """

    def __init__(self, *args: Any, max_bad_image_ratio: float = 1.0, replaced: bool = False,
                 owner: str = "reader", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_bad_image_ratio = float(max_bad_image_ratio)
        self.replaced = bool(replaced)
        self.owner = owner
        self.bad_images: List[Dict[str, Any]] = []
        self._bad_seen: Set[Tuple[str, Any]] = set()  # (im_file, im_id) of bad_images

    def epoch_samples(self) -> int:
        """Samples one pass yields on this process (the base of max_bad_image_ratio)."""
        per_batch = getattr(self.batch_sampler, "batch_size", None) or 1
        return len(self.batch_sampler) * int(per_batch)

    def __iter__(self):
        self.bad_images = []
        self._bad_seen = set()
        limit = self.max_bad_image_ratio * self.epoch_samples()
        for batch in super().__iter__():
            if ERROR_KEY in batch:
                raise ValueError(_text_of(batch[ERROR_KEY]))
            if BAD_KEY in batch:
                self._report_bad(json.loads(_text_of(batch.pop(BAD_KEY))), limit)
                if "image" not in batch:  # every image of this batch was left out
                    continue
            yield batch

    def _report_bad(self, records: List[Dict[str, Any]], limit: float) -> None:
        action = "replaced by another image" if self.replaced else "left out"
        for rec in records:
            # A broken file also met as another sample's replacement counts (and is named) once.
            if (rec["im_file"], rec["im_id"]) in self._bad_seen:
                continue
            self._bad_seen.add((rec["im_file"], rec["im_id"]))
            logger.warning(f"broken image {rec['im_file']} (image id {rec['im_id']}) {action}: {rec['reason']}")
            self.bad_images.append(rec)
        if len(self.bad_images) > limit:
            shown = "; ".join(f"{r['im_file']} (image id {r['im_id']}): {r['reason']}"
                              for r in self.bad_images[:3])
            raise ValueError(
                f"{len(self.bad_images)} of the {self.epoch_samples()} images of this epoch"
                f"{_rank_note()} could not be read, more than {self.owner}.max_bad_image_ratio = "
                f"{self.max_bad_image_ratio:g} allows. The first: {shown}. Fix or remove the broken files "
                f"(each is named in a warning above), or raise {self.owner}.max_bad_image_ratio")


def _rank_note() -> str:
    ranks = paddle.distributed.get_world_size()
    return f" on rank {paddle.distributed.get_rank()} of {ranks}" if ranks > 1 else ""


class BatchCollator:
    """Apply the batch ops to a list of samples, then stack each DESIGN key into one array."""

    def __init__(self, batch_ops: Sequence[Any]):
        self.batch_ops = Compose(batch_ops)

    def __call__(self, samples: List[dict]) -> Dict[str, np.ndarray]:
        for sample in samples:
            if ERROR_KEY in sample:
                return sample
        bad = [rec for s in samples for rec in s.pop(BAD_KEY, [])]
        # A sample left out for a broken image is a marker with no other key.
        samples = [s for s in samples if s]
        try:
            batch = self._collate(samples) if samples else {}
        except Exception as err:  # noqa: BLE001 - raised again in the main process
            return _error_batch(err)
        if bad:
            batch[BAD_KEY] = _bytes_of(json.dumps(bad))
        return batch

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


# Registered so that the subclasses' **kwargs reach its keys (they only change defaults).
@register
class BaseReader:
    """Turns a dataset and op lists into a DataLoader; subclasses only change defaults.

    Config keys:
        sample_transforms: list of one-key op dicts (``- Resize: {target_size: [800, 1333]}``).
        batch_transforms: list of batch ops (``- PadBatch: {pad_to_stride: 32}``).
        batch_size: images per batch (per rank when distributed).
        shuffle, drop_last: as in paddle.io.BatchSampler.
        use_shared_memory: passed to the DataLoader (worker -> main transfer through /dev/shm).
        max_bad_image_ratio: the share of an epoch's images (per process) that may fail to read
            (see the module docstring) before the run stops; 0.01 for training and evaluation,
            1.0 (never stop) for inference, which skips each broken file with a warning.

    num_classes, collate_batch, fuse_normalize and inputs_def are accepted and ignored (``__ignored__``).

    ``reader(dataset, worker_num)`` returns the DataLoader yielding batch dicts of paddle tensors.
    """

    __ignored__ = {
        "num_classes": "the reader does not depend on the class count",
        "collate_batch": "gts are always padded to one length with pad_gt_mask (what PaddleDetection's "
                         "False leaves as per-image lists)",
        "fuse_normalize": "a PaddleDetection export option, ignored (export.trace.EXPORT_IGNORED)", "inputs_def": "an export option"}
    # Training replaces a broken image with another; evaluation and inference leave it out.
    _replace_bad = False

    def __init__(self, sample_transforms: Optional[Sequence[Any]] = None,
                 batch_transforms: Optional[Sequence[Any]] = None, batch_size: int = 1,
                 shuffle: bool = False, drop_last: bool = False, use_shared_memory: bool = False,
                 max_bad_image_ratio: float = 0.01):
        name = type(self).__name__
        if int(batch_size) < 1:
            raise ConfigError(f"{name}.batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= float(max_bad_image_ratio) <= 1.0:
            raise ConfigError(f"{name}.max_bad_image_ratio must be between 0 and 1 (a share of the epoch's "
                              f"images), got {max_bad_image_ratio!r}")
        self.max_bad_image_ratio = float(max_bad_image_ratio)
        self.sample_ops = build_ops(sample_transforms, f"{name}.sample_transforms")
        self.batch_ops = build_ops(batch_transforms, f"{name}.batch_transforms")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.use_shared_memory = bool(use_shared_memory)

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
            _ErrorCatchingDataset(dataset, replace_bad=self._replace_bad),
            batch_sampler=sampler,
            collate_fn=BatchCollator(self.batch_ops),
            num_workers=max(0, int(worker_num)),
            use_shared_memory=self.use_shared_memory,
            return_list=return_list,
            max_bad_image_ratio=self.max_bad_image_ratio,
            replaced=self._replace_bad,
            owner=type(self).__name__,
        )


@register
class TrainReader(BaseReader):
    """Training reader: shuffle and drop_last on by default; a broken image is replaced by the
    next readable one. Keys: see BaseReader."""

    _replace_bad = True

    def __init__(self, shuffle: bool = True, drop_last: bool = True, **kwargs: Any):
        super().__init__(shuffle=shuffle, drop_last=drop_last, **kwargs)


@register
class EvalReader(BaseReader):
    """Evaluation reader: no shuffle, keeps the last partial batch; a broken image is left out (its
    ground truth still counts, as missed). Keys: see BaseReader."""


@register
class TestReader(BaseReader):
    """Inference reader: no shuffle, keeps the last partial batch; a broken image is left out and
    never stops the run (max_bad_image_ratio 1.0). Keys: see BaseReader."""

    __test__ = False  # not a pytest class

    def __init__(self, max_bad_image_ratio: float = 1.0, **kwargs: Any):
        super().__init__(max_bad_image_ratio=max_bad_image_ratio, **kwargs)
