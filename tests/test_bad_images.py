"""Broken image files: detected (truncated ones too), replaced in training, left out of evaluation,
skipped by tools/infer.py and tools/deploy.py on a folder (which still write every other result and
exit non-zero), and a clear error once more than max_bad_image_ratio of an epoch fails."""

from __future__ import annotations

import json
import logging
import os
import shutil

import cv2
import numpy as np
import paddle
import pytest

from conftest import REPO, launch_two_ranks, load_script, make_coco, run_tool, write_tiny_config
from ppdet_retina.core.workspace import create, load_config
from ppdet_retina.data.coco import COCODataSet
from ppdet_retina.data.transforms import BadImageError, decode_image, image_bytes_complete

SAMPLE_OPS = [{"Decode": {}}, {"Resize": {"target_size": [64, 64], "keep_ratio": False}}, {"Permute": {}}]
BATCH_OPS = [{"PadBatch": {"pad_to_stride": 32}}]


def _photo_bytes(ext: str = ".jpg") -> bytes:
    """A smooth 120x160 picture (so the JPEG has a long scan to cut)."""
    y, x = np.mgrid[0:120, 0:160]
    image = np.stack([x * 1.5, y * 2.0, (x + y) * 0.9], axis=-1).astype(np.uint8)
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def reader_log():
    """Warnings of the reader's logger, caught at the logger itself (whatever its parents do)."""
    handler = _Messages()
    logger = logging.getLogger("ppdet_retina.data.reader")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


# ----------------------------------------------------------------------------- detection

def test_truncated_jpeg_and_png_are_refused(tmp_path):
    jpeg = _photo_bytes(".jpg")
    assert jpeg[-2:] == b"\xff\xd9" and image_bytes_complete(jpeg)
    # An EXIF thumbnail carries its own end marker before the scan: it must not pass for the image's.
    thumb = b"Exif\x00\x00" + b"\xff\xd8 thumbnail \xff\xd9"
    with_thumb = jpeg[:2] + b"\xff\xe1" + (len(thumb) + 2).to_bytes(2, "big") + thumb + jpeg[2:]
    cut = with_thumb[:int(len(with_thumb) * 0.7)]
    assert image_bytes_complete(with_thumb) and not image_bytes_complete(cut)
    # Bytes after the end marker (phones append a video or maker data) are fine.
    assert image_bytes_complete(jpeg + b"\x00" * 64 + b"ftypmp42")
    path = tmp_path / "upload.jpg"
    path.write_bytes(cut)
    with pytest.raises(BadImageError, match="upload.jpg.*truncated"):
        decode_image(str(path))
    png = _photo_bytes(".png")
    assert image_bytes_complete(png)
    path = tmp_path / "half.png"
    path.write_bytes(png[:len(png) // 2])
    with pytest.raises(BadImageError, match="half.png.*truncated"):
        decode_image(str(path))
    (tmp_path / "full.jpg").write_bytes(jpeg)
    assert decode_image(str(tmp_path / "full.jpg")).shape == (120, 160, 3)


# ----------------------------------------------------------------------------- readers

def _reader(name, **keys):
    return create({"name": name, "sample_transforms": SAMPLE_OPS, "batch_transforms": BATCH_OPS, **keys})


def _break(coco, *ids):
    for i in ids:
        with open(os.path.join(coco.image_root, f"img_{i}.png"), "wb") as f:
            f.write(b"a text file saved as .png")


@pytest.mark.parametrize("workers", [0, 1])
def test_train_reader_replaces_a_broken_image_and_counts_it(tiny_coco, reader_log, workers):
    _break(tiny_coco, 2)
    ds = COCODataSet(dataset_dir=tiny_coco.dataset_dir, image_dir=tiny_coco.image_dir,
                     anno_path=tiny_coco.anno_path)  # images 1, 2, 5 (3 has no box)
    loader = _reader("TrainReader", batch_size=1, shuffle=False, drop_last=False,
                     max_bad_image_ratio=0.5)(ds, workers)
    for _ in range(2):  # the count starts again each epoch
        ids = [int(b["im_id"].numpy()[0, 0]) for b in loader]
        assert ids == [1, 5, 5]  # image 2 replaced by the next one in dataset order
        assert [(os.path.basename(r["im_file"]), r["im_id"]) for r in loader.bad_images] == [("img_2.png", 2)]
    assert len(reader_log) == 2 and all("img_2.png (image id 2) replaced" in w for w in reader_log)


def test_a_broken_file_met_again_as_a_replacement_counts_once(tiny_coco, reader_log):
    _break(tiny_coco, 1, 2)
    ds = COCODataSet(dataset_dir=tiny_coco.dataset_dir, image_dir=tiny_coco.image_dir,
                     anno_path=tiny_coco.anno_path)
    loader = _reader("TrainReader", batch_size=1, shuffle=False, drop_last=False,
                     max_bad_image_ratio=0.7)(ds, 0)
    # Sample 0 tries images 1 and 2 before 5; sample 1 tries 2 again.
    assert [int(b["im_id"].numpy()[0, 0]) for b in loader] == [5, 5, 5]
    assert [r["im_id"] for r in loader.bad_images] == [1, 2] and len(reader_log) == 2


def test_more_than_the_ratio_stops_with_a_clear_error(tiny_coco):
    _break(tiny_coco, 2)
    ds = COCODataSet(dataset_dir=tiny_coco.dataset_dir, image_dir=tiny_coco.image_dir,
                     anno_path=tiny_coco.anno_path)
    # Default 1%: one image of three is too many.
    with pytest.raises(ValueError) as err:
        list(_reader("TrainReader", batch_size=1, shuffle=False, drop_last=False)(ds, 0))
    msg = str(err.value)
    assert "1 of the 3 images" in msg and "TrainReader.max_bad_image_ratio = 0.01" in msg
    assert "img_2.png (image id 2)" in msg and "cannot decode" in msg
    _break(tiny_coco, 5)  # two of three > 0.5
    with pytest.raises(ValueError, match="2 of the 3 images"):
        list(_reader("TrainReader", batch_size=1, shuffle=False, drop_last=False, max_bad_image_ratio=0.5)(ds, 0))


def test_eval_reader_leaves_broken_images_out(tiny_coco, reader_log):
    _break(tiny_coco, 1, 2)
    ds = COCODataSet(dataset_dir=tiny_coco.dataset_dir, image_dir=tiny_coco.image_dir,
                     anno_path=tiny_coco.anno_path, allow_empty=True)  # 1, 2, 3, 5
    loader = _reader("EvalReader", batch_size=2, max_bad_image_ratio=0.5)(ds, 0)
    batches = list(loader)  # the first batch lost both images and is not yielded
    assert [b["im_id"].numpy()[:, 0].tolist() for b in batches] == [[3, 5]]
    assert sorted(r["im_id"] for r in loader.bad_images) == [1, 2]
    assert len(reader_log) == 2 and all("left out: cannot decode" in w for w in reader_log)


# ----------------------------------------------------------------------------- training (CLI)

def test_training_replaces_broken_image_and_reports_it(tmp_path, tiny_coco):
    _break(tiny_coco, 2)
    cfg = write_tiny_config(tmp_path, tiny_coco, epoch=1)
    # Two processes, batch 2 (DataLoader workers: see the reader test above): rank 0 reads
    # images 1 and 2 (rank 1 image 5, and 1 again as padding).
    proc, logs = launch_two_ranks(str(tmp_path / "log"), [
        os.path.join(REPO, "tools", "train.py"), "-c", cfg, "-o", "TrainReader.max_bad_image_ratio=0.5"],
        timeout=120, extra_env={"PYTHONUNBUFFERED": "1"})
    rank0 = logs[0]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bad = os.path.join(tiny_coco.image_root, "img_2.png")
    assert f"broken image {bad} (image id 2) replaced by another image" in rank0
    assert "Epoch: [0/1] done; 1 broken image(s) were replaced by others this epoch" in rank0

    proc = run_tool("train.py", "-c", cfg)  # the default 1% of 2 images allows none
    assert proc.returncode != 0
    assert "1 of the 2 images of this epoch could not be read" in proc.stderr
    assert "TrainReader.max_bad_image_ratio" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- infer.py and deploy.py

@pytest.fixture(scope="module")
def scored_model(tmp_path_factory):
    """A tiny RetinaNet whose classifier scores every anchor near 0.5 (detections on any picture), its
    weights, an export of it, and a folder of 5 good pictures, one truncated JPEG and two hidden or
    non-image files."""
    root = tmp_path_factory.mktemp("broken")
    coco = make_coco(str(root / "coco"))
    cfg_path = write_tiny_config(root, coco, epoch=1)
    cfg = load_config(cfg_path)
    paddle.seed(0)
    model = create(cfg["architecture"], cfg)
    with paddle.no_grad():
        model.head.cls_logits.bias.set_value(np.zeros(model.head.cls_logits.bias.shape, "float32"))
    model.eval()
    weights = str(root / "scored.pdparams")
    paddle.save(model.state_dict(), weights)
    from ppdet_retina.export import paddle_inference as export
    model_dir = export.export_model(cfg, str(root / "inference"), model=model)

    folder = root / "pictures"
    shutil.copytree(coco.image_root, folder)  # img_1, 2, 3, 5: listed in the json with those ids
    (folder / "extra.png").write_bytes(_photo_bytes(".png"))  # not in the json
    jpeg = _photo_bytes(".jpg")
    (folder / "broken.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (folder / "._img_1.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    (folder / "notes.txt").write_text("not a picture")
    return {"cfg": cfg_path, "weights": weights, "model_dir": model_dir, "folder": str(folder)}


GOOD = ["extra.png", "img_1.png", "img_2.png", "img_3.png", "img_5.png"]


def test_infer_folder_skips_broken_file_writes_the_rest_and_fails(scored_model, tmp_path):
    out_dir = tmp_path / "infer"
    proc = run_tool("infer.py", "-c", scored_model["cfg"], "-o", f"weights={scored_model['weights']}",
                   "--infer_dir", scored_model["folder"], "--output_dir", str(out_dir), "--save_results",
                   "--draw_threshold", "0.9")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert sorted(os.listdir(out_dir)) == sorted(GOOD + ["bbox.json"])
    broken = os.path.join(scored_model["folder"], "broken.jpg")
    assert f"broken image {broken}" in out and "truncated" in out
    assert "1 image(s) could not be read and were skipped (5 written" in proc.stderr
    assert "._img_1" not in out and "notes.txt" not in out
    with open(out_dir / "bbox.json") as f:
        dets = json.load(f)
    # Listed files keep the json's image ids; unlisted ones count up from 6 in name order
    # (broken.jpg had 6).
    ids = {d["file_name"]: d["image_id"] for d in dets}
    assert ids == {"img_1.png": 1, "img_2.png": 2, "img_3.png": 3, "img_5.png": 5, "extra.png": 7}
    # Every detection is saved, not only those drawn (none scores 0.9: all are near 0.5).
    assert "img_1.png: 0 detection(s) >= 0.9" in out
    assert len(dets) >= 5 and max(d["score"] for d in dets) < 0.9


def test_deploy_folder_skips_broken_file_writes_the_rest_and_fails(scored_model, tmp_path):
    out_dir = tmp_path / "deploy"
    proc = run_tool("deploy.py", "--model_dir", scored_model["model_dir"], "--image_dir", scored_model["folder"],
                   "--output_dir", str(out_dir), "--batch_size", "2", "--save_results")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert sorted(os.listdir(out_dir)) == sorted(GOOD + ["bbox.json"])
    broken = os.path.join(scored_model["folder"], "broken.jpg")
    assert f"warning: image '{broken}' is truncated" in proc.stderr
    assert "error: 1 of 6 image(s) could not be read" in proc.stderr
    assert "._img_1" not in proc.stdout + proc.stderr
    with open(out_dir / "bbox.json") as f:
        assert {d["file_name"] for d in json.load(f)} == set(GOOD)


def test_deploy_reads_one_batch_at_a_time(scored_model, monkeypatch):
    deploy = load_script("tools/deploy.py", "deploy_for_bad_images")
    files = deploy.collect_images(None, scored_model["folder"])
    assert [os.path.basename(f) for f in files] == ["broken.jpg"] + GOOD
    reads = []
    real = deploy.read_image_bgr
    monkeypatch.setattr(deploy, "read_image_bgr", lambda f: reads.append(f) or real(f))
    failed = {}
    batches = deploy.image_batches(files, 2, failed)
    first = next(batches)
    # broken.jpg, extra.png, img_1.png read so far: one batch of two readable pictures.
    assert [os.path.basename(f) for _, f, _, _ in first] == ["extra.png", "img_1.png"] and len(reads) == 3
    assert list(failed) == [files[0]]
    assert [i for i, *_ in first] == [1, 2]


def test_infer_refuses_a_picture_it_cannot_write(tmp_path):
    from ppdet_retina.inference.predict import write_picture

    (tmp_path / "taken.png").mkdir()  # a folder where the picture should go
    with pytest.raises(ValueError, match="cannot write .*taken.png"):
        write_picture(str(tmp_path / "taken.png"), np.zeros((4, 4, 3), np.uint8))
    write_picture(str(tmp_path / "ok.png"), np.full((4, 4, 3), 9, np.uint8))
    assert cv2.imread(str(tmp_path / "ok.png"))[0, 0].tolist() == [9, 9, 9]
