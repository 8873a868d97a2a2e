"""COCO-format detection datasets: :class:`COCODataSet` for training/eval, :class:`ImageFolder` for inference.

A *record* is the dict one image starts from before the sample transforms::

    im_file  str            absolute path of the image
    im_id    int            COCO image id (ImageFolder: running index)
    h, w     int            image size from the annotation json (else from the file's header)
    gt_bbox  float32 [n,4]  x1,y1,x2,y2 in original pixels, clipped to the image
    gt_class int32  [n,1]   contiguous class 0..C-1 (COCO category ids sorted ascending)
    is_crowd int32  [n,1]   1 = crowd region (only present with load_crowd=True)
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ppdet_retina.core.workspace import ConfigError, register, serializable
from ppdet_retina.data.image_header import HeaderError, header_size
from ppdet_retina.data.labels import default_label_set
from ppdet_retina.data.transforms import BadImageError

__all__ = ["COCODataSet", "ImageFolder", "IMAGE_EXTENSIONS"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Fields a record can carry; segmentation fields are PaddleDetection's but no
# RetinaNet pipeline op reads them, so asking for them is a config mistake here.
_KNOWN_FIELDS = ("image", "gt_bbox", "gt_class", "is_crowd")
_GT_FIELDS = ("gt_bbox", "gt_class", "is_crowd")
_FIX_KEY = ("fix the config key TrainDataset.{key} (EvalDataset.{key} for evaluation; relative paths "
            "start at the working directory)")


def _fix_hint(dataset_dir: Optional[str], key: str) -> str:
    """What to do about a missing dataset: the demo's synthetic set is generated, others laid out."""
    if dataset_dir and os.path.basename(os.path.normpath(dataset_dir)) == "shapes":
        return "run `make demo-data` (it writes the synthetic set to dataset/shapes) or " + _FIX_KEY.format(key=key)
    return ("lay the data out as COCO ships it: <dataset_dir>/annotations/instances_train2017.json and "
            "instances_val2017.json, images in <dataset_dir>/train2017/ and val2017/ (the config's image_dir "
            "and anno_path name them); or " + _FIX_KEY.format(key=key))


def _join(root: Optional[str], sub: Optional[str]) -> str:
    if not sub:
        return root or ""
    if root and not os.path.isabs(sub):
        return os.path.join(root, sub)
    return sub


class _TransformMixin:
    """Holds the sample transforms the reader installs and applies them in ``__getitem__``."""

    _transform: Optional[Callable[[dict], dict]] = None

    def set_transform(self, transform: Optional[Callable[[dict], dict]]) -> None:
        """``transform(sample) -> sample``; the reader passes its composed sample ops."""
        self._transform = transform

    def _apply(self, record: dict) -> dict:
        sample = copy.deepcopy(record)
        if self._transform is None:
            return sample
        try:
            return self._transform(sample)
        except BadImageError as err:
            # Kept as its own type: the readers replace or skip these samples.
            err.im_file = err.im_file or record.get("im_file")
            err.im_id = record.get("im_id") if err.im_id is None else err.im_id
            raise
        except Exception as err:  # noqa: BLE001 - re-raised with the file named
            # Reader workers only forward the message, so the failing file must be in it.
            raise ValueError(f"{record.get('im_file')} (image id {record.get('im_id')}): "
                             f"{type(err).__name__}: {err}") from err


@register
@serializable
class COCODataSet(_TransformMixin):
    """COCO detection json + image folder, read with pycocotools.

    Computes one record per kept image (see the module docstring) and, through
    the reader's sample transforms, one sample dict per ``dataset[i]``.

    Config keys:
        dataset_dir: root folder; ``image_dir`` and ``anno_path`` are relative to it.
        image_dir: folder of the images (relative to ``dataset_dir``).
        anno_path: COCO instances json (relative to ``dataset_dir``).
        data_fields: record fields to keep; ``image`` plus any of gt_bbox, gt_class, is_crowd.
        sample_num: keep only the first N images (-1: all).
        load_crowd: keep ``iscrowd=1`` boxes (flagged in ``is_crowd``; the assigner ignores them).
            When False they are dropped, so an image whose boxes are all crowd counts as empty.
        allow_empty: keep images without any (kept) box, e.g. for evaluation.
        empty_ratio: with allow_empty, the largest share of empty images in the set
            (0 < r < 1); outside that range all empty images are kept.
        repeat: the dataset is seen ``repeat`` times per epoch.

    Category ids are mapped to contiguous classes in ascending id order:
    ``catid2clsid``, ``clsid2catid`` and ``label_names`` (indexed by class).
    Boxes are clipped to the image; boxes narrower or shorter than 1 px after
    clipping (including zero-area and fully outside boxes) are dropped and
    counted in one log line, as are annotations of an image id that 'images'
    does not list. An image id listed twice is an error naming both files. An
    image entry without width/height gets the size its file's header gives
    (in the decoded orientation; one log line says so).
    """

    def __init__(self, dataset_dir: Optional[str] = None, image_dir: Optional[str] = None,
                 anno_path: Optional[str] = None,
                 data_fields: Sequence[str] = ("image", "gt_bbox", "gt_class", "is_crowd"),
                 sample_num: int = -1, load_crowd: bool = False, allow_empty: bool = False,
                 empty_ratio: float = 1.0, repeat: int = 1):
        self.dataset_dir = dataset_dir
        self.image_dir = image_dir
        self.anno_path = anno_path
        self.data_fields = _check_fields(data_fields)
        self.sample_num = int(sample_num)
        self.load_crowd = bool(load_crowd)
        self.allow_empty = bool(allow_empty)
        self.empty_ratio = float(empty_ratio)
        if int(repeat) < 1:
            raise ConfigError(f"COCODataSet.repeat must be >= 1, got {repeat}")
        self.repeat = int(repeat)
        self.roidbs: List[dict] = []
        self.catid2clsid: Dict[int, int] = {}
        self.clsid2catid: Dict[int, int] = {}
        self.label_names: List[str] = []
        self.dropped_boxes = 0
        self.dropped_images = 0
        self._loaded = False
        self.parse_dataset()

    # ------------------------------------------------------------------ loading
    def get_anno(self) -> str:
        """Path of the annotation json (used by the COCO metric)."""
        return _join(self.dataset_dir, self.anno_path)

    def get_image_root(self) -> str:
        return _join(self.dataset_dir, self.image_dir)

    def parse_dataset(self) -> None:
        """Read the json, map categories, build and filter records. Called once by the constructor."""
        anno_file = self._checked_anno_file()
        data = read_coco_json(anno_file)
        self.catid2clsid, self.clsid2catid, self.label_names = _category_maps(data, anno_file)
        image_root = self.get_image_root()
        # Ids are unique (read_coco_json refuses a repeated one).
        imgs = {img["id"]: img for img in data["images"]}
        img_ids = sorted(imgs)
        ann_img = np.asarray([a["image_id"] for a in data["annotations"]])
        _warn_unlisted_images(data["annotations"], ann_img, img_ids, anno_file)
        if self.sample_num > 0:
            img_ids = img_ids[:self.sample_num]
        _check_images_exist(imgs, img_ids, image_root, anno_file, self.image_dir)
        _fill_sizes_from_headers(imgs, img_ids, image_root, anno_file)
        # The array path handles any well-formed json at COCO scale in seconds; whatever it does
        # not vouch for goes through the per-annotation path, whose errors name the annotation.
        built = self._array_records(data, ann_img, imgs, img_ids, image_root)
        if built is None:
            built = self._python_records(data, img_ids, image_root, anno_file)
        del data, imgs, ann_img
        records, has_boxes, dropped = built
        with_boxes = [r for r, keep in zip(records, has_boxes) if keep]
        empty = [r for r, keep in zip(records, has_boxes) if not keep]
        if dropped:
            logger.warning("%s: dropped %d box(es) narrower or shorter than 1 px after clipping "
                           "to the image (zero-area or outside the image)", anno_file, dropped)
        empty_kept = self._select_empty(empty, len(with_boxes))
        self.dropped_boxes = dropped
        self.dropped_images = len(empty) - len(empty_kept)
        records = sorted(with_boxes + empty_kept, key=lambda r: r["im_id"])
        if not records:
            raise ValueError(self._empty_reason(anno_file, len(img_ids), len(empty)))
        self.roidbs = records
        self._loaded = True

    def _checked_anno_file(self) -> str:
        if not self.anno_path:
            raise ConfigError("COCODataSet: anno_path is not set; "
                              + _fix_hint(self.dataset_dir, "anno_path"))
        if self.dataset_dir and not os.path.isdir(self.dataset_dir):
            raise ConfigError(f"COCODataSet: dataset_dir '{self.dataset_dir}' does not exist; "
                              + _fix_hint(self.dataset_dir, "dataset_dir"))
        anno_file = self.get_anno()
        if not os.path.isfile(anno_file):
            raise ConfigError(f"COCODataSet: annotation file '{anno_file}' does not exist; "
                              + _fix_hint(self.dataset_dir, "dataset_dir / anno_path"))
        return anno_file

    def _python_records(self, data: dict, img_ids: Sequence[int], image_root: str,
                        anno_file: str) -> Tuple[List[dict], List[bool], int]:
        """(records, whether each has a box, boxes dropped), one annotation at a time."""
        coco = coco_index(data)
        records, has_boxes, dropped = [], [], 0
        for img_id in img_ids:
            record, n_dropped = self._make_record(coco, img_id, image_root, anno_file)
            dropped += n_dropped
            has_boxes.append(len(record["gt_bbox"]) > 0)
            records.append(self._keep_fields(record))
        return records, has_boxes, dropped

    def _array_records(self, data: dict, ann_img: np.ndarray, imgs: Dict[Any, dict], img_ids: Sequence[int],
                       image_root: str) -> Optional[Tuple[List[dict], List[bool], int]]:
        """What ``_python_records`` returns, computed on whole-dataset arrays; None when the json
        has anything the arrays would not treat exactly as the per-annotation path does (odd id
        types, repeated annotation ids, a malformed, NaN or None bbox value, an unknown category,
        a missing iscrowd), which then goes there for its error or its exact result."""
        table = _annotation_table(data["annotations"], ann_img, img_ids, self.load_crowd)
        if table is None:
            return None
        try:
            sizes = [(float(imgs[i]["height"]), float(imgs[i]["width"])) for i in img_ids]
        except (TypeError, ValueError):
            return None
        pos, xywh, cat, crowd = table
        hw = np.asarray(sizes, np.float64).reshape(-1, 2)
        h, w = hw[pos, 0], hw[pos, 1]
        x1 = np.minimum(np.maximum(xywh[:, 0], 0.0), w)
        y1 = np.minimum(np.maximum(xywh[:, 1], 0.0), h)
        x2 = np.minimum(np.maximum(xywh[:, 0] + xywh[:, 2], 0.0), w)
        y2 = np.minimum(np.maximum(xywh[:, 1] + xywh[:, 3], 0.0), h)
        keep = (x2 - x1 >= 1.0) & (y2 - y1 >= 1.0)
        dropped = int(len(keep) - keep.sum())
        cls = _class_indices(cat[keep], self.catid2clsid)
        if cls is None:
            return None
        pos = pos[keep]
        boxes = np.stack([x1, y1, x2, y2], axis=1)[keep].astype(np.float32)
        counts = np.bincount(pos, minlength=len(img_ids))
        # pos is ascending (a stable sort by image kept the file's order within an image), so
        # each image's boxes are one block: per-record views, no copy per image.
        cuts = np.cumsum(counts)[:-1]
        fields = {"gt_bbox": np.split(boxes, cuts),
                  "gt_class": np.split(cls.astype(np.int32).reshape(-1, 1), cuts),
                  "is_crowd": np.split(crowd[keep].astype(np.int32).reshape(-1, 1), cuts)}
        kept = [k for k in _GT_FIELDS if k in self.data_fields]
        join = _path_joiner(image_root)
        records = []
        for k, (img_id, (ih, iw)) in enumerate(zip(img_ids, sizes)):
            record = {"im_file": join(imgs[img_id]["file_name"]), "im_id": int(img_id), "h": int(ih), "w": int(iw)}
            for key in kept:
                record[key] = fields[key][k]
            records.append(record)
        return records, (counts > 0).tolist(), dropped

    def _make_record(self, coco, img_id: int, image_root: str, anno_file: str) -> Tuple[dict, int]:
        info = coco.imgs[img_id]
        h, w = float(info["height"]), float(info["width"])
        ann_ids = coco.getAnnIds(imgIds=[img_id], iscrowd=None if self.load_crowd else False)
        boxes, classes, crowd, dropped = [], [], [], 0
        for ann in coco.loadAnns(ann_ids):
            if ann.get("ignore", False):
                continue
            box = _clipped_xyxy(ann, w, h, anno_file)
            if box is None:
                dropped += 1
                continue
            if ann["category_id"] not in self.catid2clsid:
                raise ValueError(
                    f"{anno_file}: annotation id {ann.get('id')} (image id {img_id}) has category_id "
                    f"{ann['category_id']} which is not in 'categories' "
                    f"(known ids: {sorted(self.catid2clsid)}); fix the json")
            boxes.append(box)
            classes.append(self.catid2clsid[ann["category_id"]])
            crowd.append(1 if ann.get("iscrowd", 0) else 0)
        record = {
            "im_file": os.path.join(image_root, info["file_name"]),
            "im_id": int(img_id), "h": int(h), "w": int(w),
            "gt_bbox": np.asarray(boxes, np.float32).reshape(-1, 4),
            "gt_class": np.asarray(classes, np.int32).reshape(-1, 1),
            "is_crowd": np.asarray(crowd, np.int32).reshape(-1, 1),
        }
        return record, dropped

    def _select_empty(self, empty: List[dict], num_with_boxes: int) -> List[dict]:
        if not self.allow_empty:
            return []
        if not 0.0 < self.empty_ratio < 1.0:
            return empty
        limit = int(num_with_boxes * self.empty_ratio / (1.0 - self.empty_ratio))
        if len(empty) <= limit:
            return empty
        # A fixed seed keeps the chosen empty images identical across ranks and runs.
        keep = np.random.RandomState(0).choice(len(empty), limit, replace=False)
        return [empty[i] for i in sorted(keep)]

    def _empty_reason(self, anno_file: str, num_images: int, num_empty: int) -> str:
        if num_images == 0:
            return (f"{anno_file}: no images in the json"
                    + (f" (sample_num={self.sample_num})" if self.sample_num > 0 else ""))
        return (f"{anno_file}: all {num_images} image(s) were filtered out: {num_empty} have no usable "
                f"box (crowd boxes count only with load_crowd: true) and allow_empty is false; "
                f"set allow_empty: true or fix the annotations")

    def _keep_fields(self, record: dict) -> dict:
        for key in _GT_FIELDS:
            if key not in self.data_fields:
                record.pop(key)
        return record

    # ------------------------------------------------------------------ access
    def get_imid2path(self) -> Dict[int, str]:
        return {r["im_id"]: r["im_file"] for r in self.roidbs}

    def get_label_list(self) -> List[str]:
        return list(self.label_names)

    @property
    def num_classes(self) -> int:
        return len(self.clsid2catid)

    def __len__(self) -> int:
        return len(self.roidbs) * self.repeat

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for a dataset of {len(self)} samples")
        return self._apply(self.roidbs[idx % len(self.roidbs)])


def _check_fields(data_fields: Sequence[str]) -> List[str]:
    if isinstance(data_fields, str):
        data_fields = [data_fields]
    fields = list(data_fields)
    unknown = [f for f in fields if f not in _KNOWN_FIELDS]
    if unknown:
        raise ConfigError(f"COCODataSet.data_fields: unsupported field(s) {unknown}; "
                          f"use any of {list(_KNOWN_FIELDS)}")
    return fields


def _parse_json(anno_file: str) -> Any:
    """The parsed content of ``anno_file``; a ValueError naming the file when it is not JSON."""
    try:
        with open(anno_file, "r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{anno_file}: not a COCO json (cannot parse JSON: {err})") from None


def read_coco_json(anno_file: str) -> dict:
    """Parse ``anno_file`` and check the keys pycocotools relies on (its own errors are bare KeyErrors)."""
    data = _parse_json(anno_file)
    _validate_coco_json(data, anno_file)
    return data


def load_coco(anno_file: str):
    """``anno_file`` as a pycocotools ``COCO``, read and validated by :func:`read_coco_json`."""
    return coco_index(read_coco_json(anno_file))


def coco_index(data: dict):
    """``data`` (a parsed COCO json, kept as is) as a pycocotools ``COCO``, indexed without its prints."""
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = data
    _quiet(coco.createIndex)
    return coco


def _quiet(fn: Callable[[], Any]) -> None:
    # pycocotools prints progress to stdout; the reader should not.
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        fn()


def _validate_coco_json(data: Any, anno_file: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{anno_file}: not a COCO json: top level is a {type(data).__name__}, "
                         f"expected an object with 'images', 'annotations', 'categories'")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ValueError(f"{anno_file}: not a COCO json: missing key(s) {missing} "
                         f"(a COCO instances file has 'images', 'annotations', 'categories')")
    # One pass of plain membership tests finds the first incomplete entry (a per-entry list
    # costs seconds at COCO scale); only that entry's message is worked out.
    # width and height may be missing: COCODataSet then reads them from the image files' headers.
    img = next((i for i in data["images"] if not ("id" in i and "file_name" in i)), None)
    if img is not None:
        lacks = [k for k in ("id", "file_name") if k not in img]
        raise ValueError(f"{anno_file}: not a COCO json: image entry {img.get('id', img)} lacks {lacks}")
    _check_unique_image_ids(data["images"], anno_file)
    ann = next((a for a in data["annotations"]
                if not ("id" in a and "image_id" in a and "category_id" in a and "bbox" in a)), None)
    if ann is not None:
        lacks = [k for k in ("id", "image_id", "category_id", "bbox") if k not in ann]
        raise ValueError(f"{anno_file}: not a COCO json: annotation {ann.get('id', '?')} lacks {lacks}")
    for cat in data["categories"]:
        if "id" not in cat:
            raise ValueError(f"{anno_file}: not a COCO json: category entry {cat} lacks 'id'")


def _check_unique_image_ids(images: Sequence[dict], anno_file: str) -> None:
    """Refuse an image id listed twice: pycocotools keeps the last entry, so the boxes of one
    picture would be trained and scored on the other's pixels."""
    file_of: Dict[Any, Any] = {}
    for img in images:
        img_id = img["id"]
        if img_id in file_of:
            raise ValueError(
                f"{anno_file}: image id {img_id!r} is listed twice in 'images', for {file_of[img_id]!r} and "
                f"{img.get('file_name')!r} (exports merged by hand?); give each image its own id and point "
                f"its annotations' image_id at it")
        file_of[img_id] = img.get("file_name")


def _warn_unlisted_images(anns: Sequence[dict], ann_img: np.ndarray, img_ids: Sequence[Any], anno_file: str,
                          shown: int = 5) -> None:
    """One warning for the annotations whose image_id 'images' does not list (no record has them).

    ``ann_img`` is the annotations' image ids as an array, ``img_ids`` every listed id, sorted."""
    if not len(anns):
        return
    known = np.asarray(img_ids)
    if ann_img.dtype.kind in "iu" and known.dtype.kind in "iu" and len(known):
        # Integer ids (every real export): one table lookup per annotation (a set of COCO's
        # 860,000 ids costs 0.4 s, a binary search 0.15 s).
        unlisted = ann_img[~_is_listed(ann_img, known)].tolist()
    else:
        try:
            listed = set(img_ids)
            unlisted = [a["image_id"] for a in anns if a["image_id"] not in listed]
        except TypeError:  # an unhashable id: the record builders report the json as malformed
            return
    if not unlisted:
        return
    ids = list(dict.fromkeys(unlisted))
    more = f", ... ({len(ids)} ids in all)" if len(ids) > shown else ""
    logger.warning("%s: ignored %d annotation(s) whose image_id is not in 'images' (image ids %s%s); "
                   "add those images to 'images' or remove their annotations", anno_file, len(unlisted),
                   ", ".join(repr(i) for i in ids[:shown]), more)


def _is_listed(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Whether each of the integer ``values`` is in the sorted, non-empty integer array ``known``."""
    low, high = int(known[0]), int(known[-1])
    if low >= 0 and high < 8 * (len(known) + len(values)) + 1024:
        # Ids are dense enough for a flag per id, looked up straight away.
        flags = np.zeros(high + 2, bool)  # the last flag stands for every id out of range
        flags[known] = True
        return flags[np.where((values < 0) | (values > high), high + 1, values)]
    slot = np.minimum(np.searchsorted(known, values), len(known) - 1)
    return known[slot] == values


def _has_size(img: dict) -> bool:
    # A converter that does not know the size writes nothing, null or 0.
    return bool(img.get("height")) and bool(img.get("width"))


def _fill_sizes_from_headers(imgs: Dict[Any, dict], img_ids: Sequence[int], image_root: str,
                             anno_file: str) -> None:
    """Give each entry of ``img_ids`` without width/height the size its file's header gives
    (as :func:`~ppdet_retina.data.image_header.header_size` reads it: the decoded orientation),
    so its record is the one a json with the size written in would give."""
    missing = [i for i in img_ids if not _has_size(imgs[i])]
    if not missing:
        return
    join = _path_joiner(image_root)
    for img_id in missing:
        path = join(imgs[img_id]["file_name"])
        try:
            h, w = header_size(path)
        except (HeaderError, OSError) as err:
            reason = err if isinstance(err, HeaderError) else (err.strerror or err)
            raise ValueError(
                f"{anno_file}: image id {img_id} has no width/height, and its size cannot be read from the "
                f"header of {path}: {reason}; write \"width\" and \"height\" into its entry in 'images' or "
                f"replace the file") from None
        imgs[img_id]["height"], imgs[img_id]["width"] = h, w
    logger.info("%s: %d image entr%s without width/height: sizes read from the image files' headers",
                anno_file, len(missing), "y" if len(missing) == 1 else "ies")


def _category_maps(data: dict, anno_file: str) -> Tuple[Dict[int, int], Dict[int, int], List[str]]:
    # As pycocotools' getCatIds() and index: every listed id, the last entry of a repeated one.
    cats = {cat["id"]: cat for cat in data["categories"]}
    cat_ids = sorted(cat["id"] for cat in data["categories"])
    if not cat_ids:
        raise ValueError(f"{anno_file}: 'categories' is empty; a detection dataset needs at least one")
    catid2clsid = {cat_id: i for i, cat_id in enumerate(cat_ids)}
    clsid2catid = {i: cat_id for cat_id, i in catid2clsid.items()}
    names = [str(cats[c].get("name", c)) for c in cat_ids]
    return catid2clsid, clsid2catid, names


def _annotation_table(anns: List[dict], ann_img: np.ndarray, img_ids: Sequence[int], load_crowd: bool):
    """The annotations of ``img_ids`` that ``_make_record`` would look at, as arrays ordered by image
    and, within one, by the file: (image position, xywh float64 [n,4], category ids, crowd flag),
    or None when some value needs the per-annotation path (see ``_array_records``)."""
    n = len(anns)
    ids = np.asarray(img_ids)
    if ids.dtype.kind not in "iu" or (n and ann_img.dtype.kind not in "iu"):
        return None
    ann_ids = [a["id"] for a in anns]
    try:
        if len(set(ann_ids)) != n:  # pycocotools would hand out one of the twins twice
            return None
        if load_crowd:
            wanted = np.ones(n, bool)
        else:  # pycocotools keeps ``ann["iscrowd"] == False`` and fails on a missing one
            wanted = np.fromiter((a["iscrowd"] == 0 for a in anns), bool, n)
    except (KeyError, TypeError):
        return None
    ignore = np.fromiter((bool(a.get("ignore", False)) for a in anns), bool, n)
    crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, n)
    slot = np.searchsorted(ids, ann_img) if n else np.zeros(0, np.int64)
    listed = slot < len(ids)
    listed[listed] = ids[slot[listed]] == ann_img[listed]
    take = np.flatnonzero(listed & wanted & ~ignore)
    try:
        xywh = np.asarray([anns[k]["bbox"] for k in take.tolist()] or np.zeros((0, 4)), np.float64)
        xywh = xywh.reshape(len(take), -1)
    except (TypeError, ValueError):
        return None
    # NaN and inf clip differently through Python's min/max and NumPy's: such boxes go per annotation.
    if xywh.shape[1:] != (4,) or not np.isfinite(xywh).all():
        return None
    cat = np.asarray([anns[k]["category_id"] for k in take.tolist()])
    order = np.argsort(slot[take], kind="stable")
    return slot[take][order], xywh[order], cat[order], crowd[take][order]


def _class_indices(cat_ids: np.ndarray, catid2clsid: Dict[Any, int]) -> Optional[np.ndarray]:
    """Contiguous class of each category id; None if one is unknown or not an integer."""
    if len(cat_ids) == 0:
        return np.zeros(0, np.int64)
    known = np.asarray(sorted(catid2clsid))
    if cat_ids.dtype.kind not in "iu" or known.dtype.kind not in "iu":
        return None
    slot = np.minimum(np.searchsorted(known, cat_ids), len(known) - 1)
    if (known[slot] != cat_ids).any():
        return None
    return np.asarray([catid2clsid[k] for k in known.tolist()], np.int64)[slot]


def _path_joiner(root: str) -> Callable[[str], str]:
    """``os.path.join(root, name)`` for many names; plain concatenation where that is the same."""
    if os.sep != "/" or not root:
        return lambda name: os.path.join(root, name)
    prefix = root if root.endswith("/") else root + "/"
    return lambda name: name if name.startswith("/") else prefix + name


def _check_images_exist(imgs: Dict[Any, dict], img_ids: Sequence[int], image_root: str, anno_file: str,
                        image_dir: Optional[str] = None) -> None:
    join = _path_joiner(image_root)
    # One directory listing instead of a stat per image; names it does not vouch for are stat'ed.
    try:
        with os.scandir(image_root or ".") as entries:
            listed = {e.name for e in entries if e.is_file()}
    except OSError:
        listed = set()
    missing = [(i, imgs[i]["file_name"]) for i in img_ids
               if imgs[i]["file_name"] not in listed and not os.path.isfile(join(imgs[i]["file_name"]))]
    if not missing:
        return
    shown = "; ".join(f"{os.path.join(image_root, f)} (image id {i})" for i, f in missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    raise ValueError(f"{anno_file}: {len(missing)} image file(s) listed in the json do not exist: "
                     f"{shown}{more}. Check image_dir (now '{image_root}') or regenerate the data"
                     + _doubled_dir_hint([f for _, f in missing], image_dir))


def _doubled_dir_hint(file_names: Sequence[str], image_dir: Optional[str]) -> str:
    """The fix when the json's file names already start with image_dir (Label Studio and CVAT
    export ``images/x.jpg`` beside the json), so that the folder is joined twice; else ''."""
    folder = _norm_name(image_dir or "").rstrip("/")
    if not folder or os.path.isabs(folder):
        return ""
    doubled = [f for f in file_names if _norm_name(str(f)).startswith(folder + "/")]
    if not doubled:
        return ""
    return (f"; the json's file names already start with image_dir '{image_dir}' (e.g. '{doubled[0]}'): set "
            f"image_dir: '' (TrainDataset.image_dir, EvalDataset.image_dir for evaluation) or strip "
            f"'{folder}/' from the file names")


def _clipped_xyxy(ann: dict, w: float, h: float, anno_file: str) -> Optional[List[float]]:
    """COCO xywh -> xyxy clipped to the image, or None when under 1 px wide or high after clipping."""
    bbox = ann["bbox"]
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ValueError(f"{anno_file}: annotation id {ann.get('id')} (image id {ann.get('image_id')}) "
                         f"has bbox {bbox!r}; expected [x, y, width, height]")
    x, y, bw, bh = (float(v) for v in bbox)
    x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
    x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
    if x2 - x1 < 1.0 or y2 - y1 < 1.0:
        return None
    return [x1, y1, x2, y2]


@register
@serializable
class ImageFolder(_TransformMixin):
    """Images to run inference on, given as files or folders.

    Records carry ``im_file`` and ``im_id``; the image size comes from ``Decode``,
    which applies the EXIF orientation as image viewers do. ``anno_path``, when the
    file exists, gives the label names and category ids (a COCO json, or a ``.txt``
    label list with one name per line, whose category ids are then 0..C-1). With a
    COCO json, an image it lists (matched by its ``file_name``: the longest path
    suffix, else a unique base name) gets the json's image id, so saved results can
    be scored against that json directly, and is decoded in the orientation (stored or
    EXIF-turned) whose size the json records, when one does (``anno_hw``, see Decode);
    other images get ids above the json's largest. Without a json ``im_id`` is the
    running index. Folders are listed
    without hidden files (``._x.jpg`` that macOS leaves, ``.DS_Store``).

    Config keys:
        dataset_dir: root for ``image_dir`` and ``anno_path``.
        image_dir: a folder (or one file) of images used when ``set_images`` is not called.
        anno_path: optional label source (see above).
        sample_num: keep only the first N images (-1: all).
        use_default_label: accepted and ignored (``__ignored__``).
        metric, num_classes (shared): with no readable ``anno_path`` the labels are the
            metric's default set (:func:`ppdet_retina.data.labels.default_label_set`: COCO's
            80 names and category ids, VOC's 20), else the class indices, with a warning.
    """

    __shared__ = ["metric", "num_classes"]
    __ignored__ = {"use_default_label": "the default set is used whenever there is no annotation file"}

    def __init__(self, dataset_dir: Optional[str] = None, image_dir: Optional[str] = None,
                 anno_path: Optional[str] = None, sample_num: int = -1, metric: Optional[str] = None,
                 num_classes: Optional[int] = None):
        self.dataset_dir = dataset_dir
        self.image_dir = image_dir
        self.anno_path = anno_path
        self.sample_num = int(sample_num)
        self.metric = metric
        self.num_classes = None if num_classes is None else int(num_classes)
        # The json's 'images' as _read_labels parsed them (None: no json), and the file-name
        # listing _records builds from them on first use (errors in it surface there, as before).
        self._anno_images: Optional[list] = None
        self._listed: Optional[Dict[str, Tuple[int, Optional[Tuple[int, int]]]]] = None
        self.catid2clsid, self.clsid2catid, self.label_names = self._read_labels()
        self.roidbs: List[dict] = []
        if image_dir:
            root = _join(dataset_dir, image_dir)
            if os.path.exists(root):
                self.set_images(root)

    def get_anno(self) -> Optional[str]:
        path = _join(self.dataset_dir, self.anno_path) if self.anno_path else None
        return path if path and os.path.isfile(path) else None

    def _read_labels(self) -> Tuple[Dict[int, int], Dict[int, int], List[str]]:
        path = self.get_anno()
        if path is None:
            labels = default_label_set(self.metric, self.num_classes, where="TestDataset")
            return labels.catid2clsid, labels.clsid2catid, labels.names
        if path.endswith(".txt"):
            with open(path, "r", encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
            if names[:1] == ["background"]:
                names = names[1:]  # VOC-style lists may name the background first; it is no class here
            return {i: i for i in range(len(names))}, {i: i for i in range(len(names))}, names
        data = _parse_json(path)
        cats = data.get("categories") if isinstance(data, dict) else None
        if not cats:
            raise ValueError(f"{path}: no 'categories' to read label names from; "
                             f"fix TestDataset.anno_path or remove it")
        images = data.get("images")
        if isinstance(images, list):
            _check_unique_image_ids([i for i in images if isinstance(i, dict) and "id" in i], path)
        self._anno_images = images
        cats = sorted(cats, key=lambda c: c["id"])
        catid2clsid = {c["id"]: i for i, c in enumerate(cats)}
        return catid2clsid, {i: c for c, i in catid2clsid.items()}, [str(c.get("name", c["id"])) for c in cats]

    def set_images(self, images: Sequence[str] | str) -> None:
        """Use ``images``: a file, a folder (its image files, sorted) or a list of either."""
        files = _collect_images(images)
        if self.sample_num > 0:
            files = files[:self.sample_num]
        if not files:
            raise ValueError(f"no image files found in {images!r} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
        self.roidbs = self._records(files)

    def _records(self, files: Sequence[str]) -> List[dict]:
        """Records with the json's id (and size, as ``anno_hw``) of each listed file; the other
        files' ids count up after the json's largest."""
        if self._listed is None:
            self._listed = _images_by_file_name(self._anno_images)
        listed = self._listed
        if not listed:
            return [{"im_file": f, "im_id": i} for i, f in enumerate(files)]
        by_base = _unique_base_names(listed)
        records, next_id = [], max(entry[0] for entry in listed.values()) + 1
        for f in files:
            entry = _listed_entry(f, listed, by_base)
            if entry is None:
                records.append({"im_file": f, "im_id": next_id})
                next_id += 1
            else:
                records.append({"im_file": f, "im_id": entry[0], "anno_hw": entry[1]})
        return records

    def get_imid2path(self) -> Dict[int, str]:
        return {r["im_id"]: r["im_file"] for r in self.roidbs}

    def get_label_list(self) -> List[str]:
        return list(self.label_names)

    def __len__(self) -> int:
        return len(self.roidbs)

    def __getitem__(self, idx: int) -> dict:
        if not self.roidbs:
            raise ValueError("ImageFolder has no images; call set_images(...) or set TestDataset.image_dir")
        return self._apply(self.roidbs[idx])


def _images_by_file_name(images: Optional[list]) -> Dict[str, Tuple[int, Optional[Tuple[int, int]]]]:
    """``file_name`` ('/'-separated, without a leading './') -> (image id, (height, width) or None),
    for each image of a COCO json's parsed 'images'."""
    out: Dict[str, Tuple[int, Optional[Tuple[int, int]]]] = {}
    for img in images or []:
        if isinstance(img, dict) and "file_name" in img and "id" in img:
            size = (int(img["height"]), int(img["width"])) if img.get("height") and img.get("width") else None
            out[_norm_name(str(img["file_name"]))] = (int(img["id"]), size)
    return out


def _norm_name(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _unique_base_names(listed: Dict[str, Any]) -> Dict[str, Any]:
    counts: Dict[str, int] = {}
    for name in listed:
        base = name.rsplit("/", 1)[-1]
        counts[base] = counts.get(base, 0) + 1
    return {name.rsplit("/", 1)[-1]: i for name, i in listed.items() if counts[name.rsplit("/", 1)[-1]] == 1}


def _listed_entry(path: str, listed: Dict[str, Any], by_base: Dict[str, Any]) -> Optional[Any]:
    """The json entry whose file_name is the longest suffix of ``path``; else a unique base name's."""
    parts = _norm_name(os.path.abspath(path)).split("/")
    for k in range(len(parts), 0, -1):
        found = listed.get("/".join(parts[-k:]))
        if found is not None:
            return found
    return by_base.get(parts[-1])


def _collect_images(images: Sequence[str] | str) -> List[str]:
    items = [images] if isinstance(images, str) else list(images)
    files: List[str] = []
    for item in items:
        if os.path.isdir(item):
            # Hidden files (macOS's ._x.jpg resource forks) are not pictures, whatever their extension.
            names = sorted(n for n in os.listdir(item)
                           if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
            files.extend(os.path.join(item, n) for n in names)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise ValueError(f"image path '{item}' does not exist")
    return [os.path.abspath(f) for f in files]
