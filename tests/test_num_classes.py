"""num_classes against the dataset: train and eval refuse a mismatch, naming both numbers and the key."""

import pytest

from ppdet_retina.core.workspace import ConfigError, load_config
from ppdet_retina.inference.evaluate import Evaluator
from ppdet_retina.training.trainer import Trainer

from conftest import tiny_faster_rcnn_config, write_tiny_config


@pytest.mark.parametrize("build, section", [(Trainer, "TrainDataset"), (Evaluator, "EvalDataset")])
@pytest.mark.parametrize("num_classes", [2, 5])
def test_a_num_classes_other_than_the_category_count_is_refused(tmp_path, tiny_coco, build, section, num_classes):
    config = write_tiny_config(tmp_path, tiny_coco, epoch=1)
    with pytest.raises(ConfigError) as err:
        build(load_config(config, [f"num_classes={num_classes}"]))
    assert str(err.value).startswith(
        f"{section} has 3 categories ({tiny_coco.anno_file}) but the model is built for num_classes "
        f"{num_classes}; set num_classes: 3 in the config (or -o num_classes=3).")


def test_a_section_level_num_classes_is_checked_too(tmp_path, tiny_coco):
    """The count comes from the built heads, so a head section's own num_classes cannot slip past."""
    config = write_tiny_config(tmp_path, tiny_coco, epoch=1)
    with pytest.raises(ConfigError, match="built for num_classes 4; set num_classes: 3"):
        Evaluator(load_config(config, ["RetinaHead.num_classes=4"]))
    assert Evaluator(load_config(config)).model.head.num_classes == 3


def test_faster_rcnn_heads_are_checked(tmp_path, tiny_coco):
    dataset = (f"TrainDataset: {{name: COCODataSet, dataset_dir: {tiny_coco.dataset_dir}, "
               f"image_dir: {tiny_coco.image_dir}, anno_path: {tiny_coco.anno_path}}}\n")
    cfg = tiny_faster_rcnn_config(tmp_path, dataset)
    cfg["num_classes"] = 7
    with pytest.raises(ConfigError, match="TrainDataset has 3 categories .* built for num_classes 7"):
        Trainer(cfg, mode="train")
