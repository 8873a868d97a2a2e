"""`make demo`: train the demo RetinaNet with evaluation, then draw its predictions and its curves.

Runs the same commands a user would (tools/train.py, tools/eval.py, tools/infer.py) so that the
README's instructions are exercised, then plots loss and mAP from the training log.

Training runs as two CPU processes (``python -m paddle.distributed.launch --nproc_per_node 2``, the
cores split between them): on a 2-core machine that is about twice as fast as one process with two
threads. The demo config's ``TrainReader.batch_size`` is per process and its LR is tuned for two
processes (8 images per step); with ``--nproc 1`` the per-process batch is doubled so that the step,
and so the LR, stays the same.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The number of processes the demo configs' per-process batch sizes and LRs were tuned for.
TUNED_PROCS = 2


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def default_nproc() -> int:
    """Two processes where there are two cores to run them on; one on a single-core machine."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return TUNED_PROCS if cpus >= TUNED_PROCS else 1


def train_command(py: str, config: str, nproc: int, save_dir: str) -> list[str]:
    """tools/train.py --eval, under the launcher when nproc > 1, keeping the tuned images per step."""
    opts = []
    if nproc != TUNED_PROCS:
        # Imported here: loading the config imports paddle, which the 2-process path leaves to the workers.
        sys.path.insert(0, ROOT)
        from ppdet_retina.core.workspace import load_config

        per_proc = int(load_config(os.path.join(ROOT, config))["TrainReader"]["batch_size"])
        total = per_proc * TUNED_PROCS
        if total % nproc:
            raise SystemExit(f"--nproc {nproc} does not divide the demo's {total} images per step")
        opts = ["-o", f"TrainReader.batch_size={total // nproc}"]
    train = ["tools/train.py", "-c", config, "--eval"] + opts
    if nproc == 1:
        return [py] + train
    # Worker logs go next to the checkpoints instead of a ./log folder in the checkout.
    return [py, "-m", "paddle.distributed.launch", "--log_level", "WARNING", "--log_dir",
            os.path.join(save_dir, "launch_log"), "--nproc_per_node", str(nproc)] + train


def plot_curves(log_path: str, out_png: str) -> bool:
    """Loss and mAP against iterations from the trainer's jsonl log; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the training-curve plot")
        return False
    steps, losses, map_steps, maps = [], [], [], []
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                steps.append(rec["step"])
                losses.append(rec["loss"])
            if "bbox_map" in rec:
                map_steps.append(rec["step"])
                maps.append(rec["bbox_map"])
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(steps, losses, color="tab:blue", label="loss")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(map_steps, maps, "o-", color="tab:red", label="bbox mAP(0.50:0.95)")
    ax2.set_ylabel("bbox mAP", color="tab:red")
    ax2.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo/retinanet_demo.yml")
    parser.add_argument("--output", default="output/demo", help="pictures and curves go here")
    parser.add_argument("--num-images", type=int, default=6, help="val images to draw predictions on")
    parser.add_argument("--nproc", type=int, default=default_nproc(),
                        help="training processes (default: 2, or 1 on a single-core machine)")
    args = parser.parse_args()

    py = sys.executable
    name = os.path.splitext(os.path.basename(args.config))[0]
    save_dir = os.path.join("output", name)
    os.makedirs(os.path.join(ROOT, args.output), exist_ok=True)
    start = time.time()
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    # The demo trains afresh each time; training appends to an existing log, and the curves are of this run.
    log_path = os.path.join(ROOT, save_dir, "train_log.jsonl")
    if os.path.exists(log_path):
        os.remove(log_path)
    run(train_command(py, args.config, args.nproc, save_dir))
    train_s = time.time() - start
    weights = os.path.join(save_dir, "best_model")
    run([py, "tools/eval.py", "-c", args.config, "-o", f"weights={weights}"])
    val_images = sorted(glob.glob(os.path.join(ROOT, "dataset/shapes/images/val/*")))[: args.num_images]
    pictures = os.path.join(args.output, "predictions")
    infer_dir = os.path.join(args.output, "infer_input")
    os.makedirs(os.path.join(ROOT, infer_dir), exist_ok=True)
    for img in val_images:
        link = os.path.join(ROOT, infer_dir, os.path.basename(img))
        if os.path.lexists(link):  # also a link left dangling by a regenerated dataset
            os.remove(link)
        os.symlink(img, link)
    run([py, "tools/infer.py", "-c", args.config, "-o", f"weights={weights}", "--infer_dir", infer_dir,
         "--output_dir", pictures, "--draw_threshold", "0.5", "--save_results"])
    curve = os.path.join(ROOT, args.output, "training_curves.png")
    plotted = plot_curves(log_path, curve)
    print("\n=== demo finished in %.0f s (training %.0f s) ===" % (time.time() - start, train_s))
    print(f"weights:          {save_dir}/best_model.pdparams, {save_dir}/model_final.pdparams")
    print(f"training log:     {os.path.relpath(log_path, ROOT)}")
    print(f"predictions:      {pictures}/ (pictures with labelled boxes, bbox.json)")
    if plotted:
        print(f"training curves:  {os.path.relpath(curve, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
