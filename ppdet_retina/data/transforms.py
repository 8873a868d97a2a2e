"""Sample and batch transforms, in numpy/cv2 only (per-sample work runs in reader workers on a small CPU).

A sample is a dict. After ``Decode`` it holds at least::

    image        uint8 [H,W,3] RGB (float32 after NormalizeImage, [3,H,W] after Permute)
    im_shape     float32 [2]   (h, w) of the current image
    scale_factor float32 [2]   (scale_y, scale_x) current / original size
    gt_bbox      float32 [n,4] x1,y1,x2,y2 in current pixels (when the record has boxes)

Every op keeps ``image``, ``gt_bbox``, ``im_shape`` and ``scale_factor`` consistent.
Batch ops take and return a list of samples.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ppdet_retina.core.workspace import ConfigError, create, register, serializable
from ppdet_retina.runtime import image_bytes_complete, jpeg_segments, resize_scale

__all__ = ["Decode", "BadImageError", "decode_image", "Resize", "RandomResize", "RandomFlip", "NormalizeImage",
           "Permute", "PadBatch", "Compose", "build_ops", "resize_scale"]

logger = logging.getLogger(__name__)

# cv2 interpolation flags PaddleDetection configs use (0..4).
_INTERPS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA, cv2.INTER_LANCZOS4)
_GT_PAD_KEYS = ("gt_bbox", "gt_class", "is_crowd")


def _need(sample: dict, key: str, op: str) -> Any:
    if key not in sample:
        raise ValueError(f"{op}: sample has no '{key}' (keys: {sorted(sample)}); "
                         f"put Decode first in sample_transforms")
    return sample[key]


class BaseOperator:
    """An op is a callable on one sample dict (or, for batch ops, a list of them)."""

    def __call__(self, sample):
        return self.apply(sample)

    def apply(self, sample):
        raise NotImplementedError

    def deploy_entry(self) -> Optional[Dict[str, Any]]:
        """This op as an infer_cfg.yml ``Preprocess`` entry (``type`` + parameters), None when a
        runtime does it implicitly, NotImplemented when it has no place in deployment (random or
        training-only ops)."""
        return NotImplemented

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({keys})"


# ----------------------------------------------------------------------------- decode

@register
@serializable
class Decode(BaseOperator):
    """Read ``im_file`` into ``image`` (uint8 [H,W,3], RGB), in the orientation its boxes use.

    Grayscale is expanded to 3 channels and an alpha channel is dropped. Truncated JPEG
    and PNG files (a partial copy or upload) are refused, not decoded half grey.

    EXIF orientation: annotation tools differ in whether they applied it, so a sample that
    carries the annotation's size (``h``, ``w`` of a COCODataSet record) is decoded in the
    orientation that matches that size: the EXIF-rotated one (as viewers, OpenCV and
    PaddleDetection show it) when it matches, else the stored pixels when they match; when
    neither matches, :class:`BadImageError` names the file and image id, since the boxes would
    land in the wrong place. An ImageFolder record of a file its json lists carries that size
    as ``anno_hw``: the same choice, but a mismatch falls back to the EXIF orientation (there
    are no boxes to misplace). Otherwise the EXIF orientation is applied. Readers replace or
    skip a sample that raises BadImageError (data/reader.py).

    Sets ``im_shape`` to the decoded (h, w), ``scale_factor`` to (1, 1), and ``h``/``w`` to
    the decoded size. An ``image`` already in the sample (uint8 RGB array) is used as is.

    Config keys: none.
    """

    def __init__(self):
        # An explicit signature, so the registry rejects any key given to Decode.
        pass

    def apply(self, sample: dict) -> dict:
        image = sample.get("image")
        if image is None:
            path = _need(sample, "im_file", "Decode")
            expect, strict = _recorded_hw(sample), True
            if expect is None and sample.get("anno_hw") is not None:
                expect, strict = tuple(sample["anno_hw"]), False
            image = decode_image(path, expect, sample.get("im_id"), strict)
        elif image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        h, w = image.shape[:2]
        sample["image"] = image
        sample["h"], sample["w"] = h, w
        sample["im_shape"] = np.array([h, w], np.float32)
        sample["scale_factor"] = np.ones(2, np.float32)
        return sample

    def deploy_entry(self) -> None:
        return None  # every runtime decodes its images itself


class BadImageError(ValueError):
    """An image file that cannot be used: unreadable, truncated, or of a size that fits no
    orientation of its annotation. Readers replace (training) or skip (evaluation, inference)
    the sample; any other error in the sample ops stops the run.

    ``reason`` says what is wrong; ``im_file`` and ``im_id`` name the image when known.
    """

    def __init__(self, reason: str, im_file: Optional[str] = None, im_id: Optional[int] = None):
        self.reason, self.im_file, self.im_id = reason, im_file, im_id
        super().__init__(reason)

    def __str__(self) -> str:
        where = self.im_file or "image"
        if self.im_id is not None:
            where += f" (image id {self.im_id})"
        return f"{where}: {self.reason}"


def _recorded_hw(sample: dict) -> Optional[Tuple[int, int]]:
    h, w = sample.get("h"), sample.get("w")
    return (int(h), int(w)) if h and w else None


def decode_image(path: str, expect_hw: Optional[Tuple[int, int]] = None,
                 im_id: Optional[int] = None, strict: bool = True) -> np.ndarray:
    """uint8 RGB [H, W, 3] of ``path`` in the orientation matching ``expect_hw`` (see Decode).

    Raises BadImageError (naming ``path`` and ``im_id``) for a missing, unreadable, truncated
    or undecodable file, or, when ``strict``, if ``expect_hw`` fits neither the stored nor the
    EXIF orientation (not strict: the EXIF orientation is used then).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise BadImageError(f"cannot read the file ({err.strerror or err})", path, im_id) from None
    if not image_bytes_complete(data):
        raise BadImageError("the file is truncated (its end marker is missing: a partial copy or upload?); "
                            "replace it or remove it from the dataset", path, im_id)
    # Decoded as stored; the EXIF rotation is applied below, only where it belongs.
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if raw is None:
        raise BadImageError("cannot decode it (corrupt or not an image); replace it or remove it from the "
                            "dataset", path, im_id)
    raw = cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)
    orientation = exif_orientation(data)
    oriented = apply_exif_orientation(raw, orientation)
    if expect_hw is None or oriented.shape[:2] == tuple(expect_hw):
        return oriented
    if raw.shape[:2] == tuple(expect_hw):
        return raw
    if not strict:
        return oriented
    seen = f"{raw.shape[0]}x{raw.shape[1]}"
    if oriented.shape[:2] != raw.shape[:2]:
        seen += f" ({oriented.shape[0]}x{oriented.shape[1]} with its EXIF orientation {orientation} applied)"
    raise BadImageError(f"the decoded size {seen} (h x w) matches neither orientation of the annotation's "
                        f"height x width {expect_hw[0]}x{expect_hw[1]}, so its boxes cannot be placed; fix the "
                        f"json's size for this image (and its boxes) or replace the file", path, im_id)


def exif_orientation(data: bytes) -> int:
    """The EXIF Orientation (1..8) of JPEG bytes; 1 when absent or unreadable."""
    if data[:3] != b"\xff\xd8\xff":
        return 1
    for marker, start, end in jpeg_segments(data):
        if marker == 0xE1 and data[start:start + 6] == b"Exif\x00\x00":
            return _tiff_orientation(data[start + 6:end])
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1

    def num(at: int, size: int) -> int:
        return int.from_bytes(tiff[at:at + size], order)

    ifd = num(4, 4)
    if ifd + 2 > len(tiff):
        return 1
    for i in range(num(ifd, 2)):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            break
        if num(entry, 2) == 0x0112:  # Orientation, a SHORT stored in the entry itself
            value = num(entry + 8, 2)
            return value if 1 <= value <= 8 else 1
    return 1


def apply_exif_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """``image`` (as stored) turned the way EXIF ``orientation`` tells viewers to show it."""
    if orientation == 2:
        return cv2.flip(image, 1)
    if orientation == 3:
        return cv2.rotate(image, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(image, 0)
    if orientation == 5:
        return cv2.transpose(image)
    if orientation == 6:
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.rotate(cv2.transpose(image), cv2.ROTATE_180)
    if orientation == 8:
        return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return image


# ----------------------------------------------------------------------------- resize

def _check_target(target_size: Any, op: str) -> List[int]:
    size = [target_size, target_size] if isinstance(target_size, (int, np.integer)) else list(target_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise ConfigError(f"{op}.target_size must be a positive int or [h, w] of positive ints, "
                          f"got {target_size!r}")
    return [int(s) for s in size]


def _check_interp(interp: Any, op: str) -> int:
    if interp not in _INTERPS:
        raise ConfigError(f"{op}.interp must be a cv2 interpolation flag in {list(_INTERPS)} "
                          f"(1 = linear, 2 = cubic), got {interp!r}")
    return int(interp)


def _clip_boxes(boxes: np.ndarray, h: float, w: float) -> np.ndarray:
    boxes = boxes.copy()
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
    return boxes


def resize_sample(sample: dict, target_size: Sequence[int], keep_ratio: bool, interp: int) -> dict:
    """Resize ``image`` and ``gt_bbox`` by the nominal (sy, sx) of :func:`resize_scale`.

    As PaddleDetection: the pixels go through ``cv2.resize(fx=sx, fy=sy)`` (OpenCV rounds the
    output size but samples at the nominal scale), ``im_shape`` is the unrounded
    (h * sy, w * sx), ``scale_factor`` the previous one times (sy, sx), and boxes are scaled
    by (sx, sy) and clipped to ``im_shape``. Published weights see exactly these inputs.
    """
    image = _need(sample, "image", "Resize")
    h, w = image.shape[:2]
    sy, sx = resize_scale(h, w, target_size, keep_ratio)
    # Without keep_ratio the target itself is the size (h * (t / h) can miss t by an ulp).
    resized_h, resized_w = (h * sy, w * sx) if keep_ratio else (float(target_size[0]), float(target_size[1]))
    if round(resized_h) < 1 or round(resized_w) < 1:
        raise ValueError(f"{sample.get('im_file', 'image')}: {h}x{w} (h x w) resized by ({sy:.4g}, {sx:.4g}) "
                         f"leaves no pixel on one side; drop this image or change Resize.target_size")
    sample["image"] = cv2.resize(image, None, None, fx=sx, fy=sy, interpolation=interp)
    if "gt_bbox" in sample and len(sample["gt_bbox"]):
        boxes = sample["gt_bbox"] * np.array([sx, sy, sx, sy], np.float32)
        sample["gt_bbox"] = _clip_boxes(boxes, resized_h, resized_w).astype(np.float32)
    sample["im_shape"] = np.array([resized_h, resized_w], np.float32)
    prev = np.asarray(sample.get("scale_factor", np.ones(2, np.float32)), np.float32)
    sample["scale_factor"] = np.array([prev[0] * sy, prev[1] * sx], np.float32)
    return sample


@register
@serializable
class Resize(BaseOperator):
    """Resize the image and boxes (PaddleDetection semantics).

    Config keys:
        target_size: int or [h, w]. With keep_ratio it is [short, long] in any order:
            scale = min(min(target)/min(h, w), max(target)/max(h, w)).
        keep_ratio: keep the aspect ratio (default True).
        interp: cv2 interpolation flag (1 = linear).

    Output: image [round(h*sy), round(w*sx), 3] resampled at the nominal scale (cv2 fx/fy);
    ``im_shape`` the unrounded (h*sy, w*sx); ``scale_factor`` (sy, sx) times the previous
    one; boxes scaled by (sx, sy) and clipped to ``im_shape``.
    """

    def __init__(self, target_size: int | Sequence[int], keep_ratio: bool = True, interp: int = 1):
        self.target_size = _check_target(target_size, "Resize")
        self.keep_ratio = bool(keep_ratio)
        self.interp = _check_interp(interp, "Resize")

    def apply(self, sample: dict) -> dict:
        return resize_sample(sample, self.target_size, self.keep_ratio, self.interp)

    def deploy_entry(self) -> Dict[str, Any]:
        return {"type": "Resize", "target_size": [int(s) for s in self.target_size],
                "keep_ratio": self.keep_ratio, "interp": int(self.interp)}


@register
@serializable
class RandomResize(BaseOperator):
    """Resize to a randomly chosen target size (multi-scale training).

    Config keys:
        target_size: list of sizes (each int or [h, w]; with keep_ratio [short, long]).
        keep_ratio, interp: as in Resize.
        random_size: pick one of target_size per sample (else target_size is one size).
        random_range: instead pick the short and long edges uniformly between the
            smallest and largest short/long edges of target_size.
        random_interp: also pick the interpolation among cv2's 5 basic flags.
    """

    def __init__(self, target_size: Sequence[Any], keep_ratio: bool = True, interp: int = 1,
                 random_range: bool = False, random_size: bool = True, random_interp: bool = False):
        if not isinstance(target_size, (list, tuple)) or not target_size:
            raise ConfigError(f"RandomResize.target_size must be a non-empty list of sizes, got {target_size!r}")
        self.random_size = bool(random_size)
        self.random_range = bool(random_range)
        if self.random_size or self.random_range:
            self.target_size = [_check_target(t, "RandomResize") for t in target_size]
        else:
            self.target_size = [_check_target(target_size, "RandomResize")]
        self.keep_ratio = bool(keep_ratio)
        self.interp = _check_interp(interp, "RandomResize")
        self.random_interp = bool(random_interp)

    def _pick_size(self) -> List[int]:
        if self.random_range:
            longs = [max(t) for t in self.target_size]
            shorts = [min(t) for t in self.target_size]
            return [random.randint(min(shorts), max(shorts)), random.randint(min(longs), max(longs))]
        if self.random_size:
            return random.choice(self.target_size)
        return self.target_size[0]

    def apply(self, sample: dict) -> dict:
        interp = random.choice(_INTERPS) if self.random_interp else self.interp
        return resize_sample(sample, self._pick_size(), self.keep_ratio, interp)


# ----------------------------------------------------------------------------- flip / normalise

@register
@serializable
class RandomFlip(BaseOperator):
    """Flip the image left-right with probability ``prob``; boxes become (W - x2, y1, W - x1, y2).

    Config keys: prob (default 0.5).
    """

    def __init__(self, prob: float = 0.5):
        if not 0.0 <= float(prob) <= 1.0:
            raise ConfigError(f"RandomFlip.prob must be in [0, 1], got {prob!r}")
        self.prob = float(prob)

    def apply(self, sample: dict) -> dict:
        if random.random() >= self.prob:
            return sample
        return flip_sample(sample)


def flip_sample(sample: dict) -> dict:
    """Mirror ``image`` (HWC) and ``gt_bbox`` horizontally."""
    image = _need(sample, "image", "RandomFlip")
    width = image.shape[1]
    sample["image"] = np.ascontiguousarray(image[:, ::-1])
    if "gt_bbox" in sample and len(sample["gt_bbox"]):
        boxes = sample["gt_bbox"].copy()
        boxes[:, 0] = width - sample["gt_bbox"][:, 2]
        boxes[:, 2] = width - sample["gt_bbox"][:, 0]
        sample["gt_bbox"] = boxes
    sample["flipped"] = not sample.get("flipped", False)
    return sample


@register
@serializable
class NormalizeImage(BaseOperator):
    """image -> float32 ((image / 255 if is_scale) - mean) / std, per channel (RGB order).

    Config keys:
        mean, std: 3 floats each (on the 0..1 scale when is_scale).
        is_scale: divide by 255 first (default True).
        norm_type: 'mean_std' (default) or 'none' (only the scaling).
    """

    def __init__(self, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), is_scale: bool = True,
                 norm_type: str = "mean_std"):
        if norm_type not in ("mean_std", "none"):
            raise ConfigError(f"NormalizeImage.norm_type must be 'mean_std' or 'none', got {norm_type!r}")
        if len(mean) != 3 or len(std) != 3 or any(float(s) == 0 for s in std):
            raise ConfigError(f"NormalizeImage needs 3 means and 3 non-zero stds, got mean={mean} std={std}")
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.is_scale = bool(is_scale)
        self.norm_type = norm_type
        # Folded into one multiply-add per pixel.
        scale = np.full(3, 1.0 / 255.0 if self.is_scale else 1.0, np.float32)
        offset = np.zeros(3, np.float32)
        if norm_type == "mean_std":
            scale /= np.array(self.std, np.float32)
            offset = -np.array(self.mean, np.float32) / np.array(self.std, np.float32)
        self._scale, self._offset = scale, offset

    def apply(self, sample: dict) -> dict:
        image = _need(sample, "image", "NormalizeImage").astype(np.float32)
        image *= self._scale
        image += self._offset
        sample["image"] = image
        return sample

    def deploy_entry(self) -> Dict[str, Any]:
        return {"type": "NormalizeImage", "mean": list(self.mean), "std": list(self.std),
                "is_scale": self.is_scale, "norm_type": str(self.norm_type)}


@register
@serializable
class Permute(BaseOperator):
    """image [H,W,C] -> [C,H,W] (contiguous). Config keys: none."""

    def __init__(self):
        pass

    def apply(self, sample: dict) -> dict:
        image = _need(sample, "image", "Permute")
        sample["image"] = np.ascontiguousarray(image.transpose(2, 0, 1))
        return sample

    def deploy_entry(self) -> Dict[str, Any]:
        return {"type": "Permute"}


# ----------------------------------------------------------------------------- batch

@register
@serializable
class PadBatch(BaseOperator):
    """Pad a list of CHW samples to one image size and one gt count.

    Images are zero-padded at the bottom/right to the batch's max (H, W), rounded
    up to a multiple of ``pad_to_stride`` (0: no rounding); ``im_shape`` and boxes
    are unchanged. gt_bbox [G,4], gt_class/is_crowd [G,1] are padded with zeros to
    G = max(1, most gts in the batch), and ``pad_gt_mask`` float32 [G,1] marks real rows.

    Config keys: pad_to_stride (default 0), return_gt_mask (default True; False
    leaves out ``pad_gt_mask``).
    """

    def __init__(self, pad_to_stride: int = 0, return_gt_mask: bool = True):
        if int(pad_to_stride) < 0:
            raise ConfigError(f"PadBatch.pad_to_stride must be >= 0, got {pad_to_stride}")
        self.pad_to_stride = int(pad_to_stride)
        self.return_gt_mask = bool(return_gt_mask)

    def apply(self, samples: List[dict]) -> List[dict]:
        _pad_images(samples, self.pad_to_stride)
        if any("gt_bbox" in s for s in samples):
            _pad_gts(samples, self.return_gt_mask)
        return samples

    def deploy_entry(self) -> Dict[str, Any]:
        return {"type": "PadStride", "stride": self.pad_to_stride}  # PaddleDetection's deploy name


def _round_up(value: int, stride: int) -> int:
    return int(np.ceil(value / stride) * stride) if stride > 0 else value


def _pad_images(samples: List[dict], stride: int) -> None:
    images = [_need(s, "image", "PadBatch") for s in samples]
    if any(im.ndim != 3 or im.shape[0] not in (1, 3) for im in images):
        raise ValueError(f"PadBatch expects CHW images; got shapes {[im.shape for im in images]}. "
                         f"Put Permute last in sample_transforms")
    max_h = _round_up(max(im.shape[1] for im in images), stride)
    max_w = _round_up(max(im.shape[2] for im in images), stride)
    for s, im in zip(samples, images):
        if im.shape[1:] == (max_h, max_w):
            continue
        padded = np.zeros((im.shape[0], max_h, max_w), im.dtype)
        padded[:, :im.shape[1], :im.shape[2]] = im
        s["image"] = padded


def _pad_gts(samples: List[dict], with_mask: bool) -> None:
    num = max([1] + [len(s.get("gt_bbox", ())) for s in samples])
    for s in samples:
        n = len(s.get("gt_bbox", ()))
        for key, width, dtype in (("gt_bbox", 4, np.float32), ("gt_class", 1, np.int32),
                                  ("is_crowd", 1, np.int32)):
            out = np.zeros((num, width), dtype)
            if key in s and n:
                out[:n] = np.asarray(s[key], dtype).reshape(n, width)
            s[key] = out
        if with_mask:
            mask = np.zeros((num, 1), np.float32)
            mask[:n] = 1.0
            s["pad_gt_mask"] = mask


# ----------------------------------------------------------------------------- building

class Compose:
    """Apply ops in order; the callable a dataset's ``set_transform`` receives."""

    def __init__(self, ops: Sequence[Callable]):
        self.ops = list(ops)

    def __call__(self, data):
        for op in self.ops:
            data = op(data)
        return data

    def __repr__(self) -> str:
        return f"Compose({self.ops})"


def build_ops(op_cfgs: Optional[Sequence[Any]], where: str = "sample_transforms") -> List[Callable]:
    """Build ops from YAML entries: one-key dicts (``{Resize: {target_size: 512}}``),
    ``{name: Resize, ...}`` dicts, bare names, or built objects.

    Raises ConfigError naming ``where[i]``, the op and the key for an unknown op or key.
    """
    ops = []
    for i, entry in enumerate(op_cfgs or []):
        spot = f"{where}[{i}]"
        try:
            ops.append(create(_op_dict(entry, spot), {}))
        except ConfigError as err:
            raise ConfigError(f"{spot}: {err}") from None
    return ops


def _op_dict(entry: Any, spot: str) -> Any:
    if isinstance(entry, str):
        return {"name": entry}
    if not isinstance(entry, dict):
        return entry
    if "name" in entry:
        return dict(entry)
    if len(entry) != 1:
        raise ConfigError(f"{spot}: an op is a one-key mapping like '- Resize: {{target_size: 512}}', "
                          f"got keys {list(entry)}")
    (name, kwargs), = entry.items()
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{spot}: the keys of op '{name}' must be a mapping, got {kwargs!r}")
    return {"name": name, **kwargs}
