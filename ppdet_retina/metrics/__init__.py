"""COCO-style evaluation."""
