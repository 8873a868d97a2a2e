"""Every benchmark figure in its own process: this tree, a previous tree and PaddleDetection, alternated.

    python tools/bench_isolated.py --rounds 2 --prev 8da674c \\
        --ppdet /work/shared/reference/PaddleDetection --ppdet-python .venv-ppdet/bin/python

Each figure is one fresh ``tools/benchmark.py`` process (nothing measured before it can leave
threads, allocator pools or oneDNN caches behind), and the whole list runs ``--rounds`` times in
turn, so load that drifts on a shared machine spreads over every figure alike; the table gives
each figure's median and range over the rounds:

* ours: ``--only-engine E`` for dygraph, paddle_inference and openvino (forward with NMS, trace +
  compile, eval images/s), in fp32 and, with ``--bf16``, bf16; the default engine (``auto``: what
  eval.py / infer.py run without ``--engine``); the train step in a fresh process
  (``--skip-infer --skip-engines``) and after an evaluation on the default engine (the full run);
* the previous tree (``--prev COMMIT``: ``git worktree add`` into a temporary folder, removed
  after): its default engine (``--skip-train``, fp32 and bf16) and its train step;
* PaddleDetection (``--ppdet``: a checkout, run with ``--ppdet-python``):
  ``tools/dev/ppdet_benchmark.py``'s dygraph forward + NMS and train step.

The CPU model and its speed flags and the load average before each run are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SPEED_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
FRESH_CACHE = "{fresh cache}"  # in a figure's env: replaced by a new empty folder for that run


def cpu_summary() -> str:
    name, flags = "unknown CPU", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="ignore") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = [fl for fl in SPEED_FLAGS if fl in line.split(":", 1)[1].split()]
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores; {' '.join(flags) or 'no avx512/AMX flags'})"


def run_json(cmd: List[str], cwd: str, env: Dict[str, str], timeout: int) -> Optional[dict]:
    """The JSON line a benchmark prints, or None (with the error's last lines on stderr)."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join((proc.stdout + proc.stderr)
                                                                         .splitlines()[-8:]), file=sys.stderr)
        return None
    return json.loads(lines[-1])


def figures(args: argparse.Namespace, prev_dir: Optional[str]) -> List[Tuple[str, str, List[str], str, Dict]]:
    """(label, key to read, command, cwd, extra env) for every figure."""
    py = sys.executable
    common = ["--iters", str(args.iters), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.infer_size:
        common += ["--infer-size", *map(str, args.infer_size)]
    if args.train_size:
        common += ["--train-size", *map(str, args.train_size)]
    ours_only = ["--config", args.config] if args.config else []
    ours = os.path.join(ROOT, "tools", "benchmark.py")
    out = []
    precisions = [False, True] if args.bf16 else [False]
    for bf16 in precisions:
        tag = " bf16" if bf16 else " fp32"
        for engine in ("dygraph", "paddle_inference", "openvino"):
            if bf16 and engine == "dygraph":
                continue
            out.append((f"ours {engine}{tag}", "forward_ms",
                        [py, ours, "--only-engine", engine] + (["--bf16"] if bf16 else []) + common + ours_only,
                        ROOT, {}))
    for bf16 in precisions:  # what eval.py / infer.py run when no --engine is given: auto's choice,
        # measured afresh each time (an empty export cache, as on a new machine)
        out.append((f"ours default engine (auto){' bf16' if bf16 else ' fp32'}", "infer_default_engine_ms",
                    [py, ours, "--skip-train"] + (["--bf16"] if bf16 else []) + common + ours_only, ROOT,
                    {"PPDET_RETINA_EXPORT_CACHE": FRESH_CACHE}))
    out.append(("ours train step, fresh process", "train_step_ms",
                [py, ours, "--skip-infer", "--skip-engines"] + common + ours_only, ROOT, {}))
    out.append(("ours train step after an evaluation", "train_step_ms", [py, ours] + common + ours_only, ROOT, {}))
    if prev_dir:
        prev = os.path.join(prev_dir, "tools", "benchmark.py")
        for bf16 in precisions:  # as ours: a fresh cache, so no choice recorded by older code is read
            out.append((f"previous default engine{' bf16' if bf16 else ' fp32'}", "infer_default_engine_ms",
                        [py, prev, "--skip-train"] + (["--bf16"] if bf16 else []) + common + ours_only, prev_dir,
                        {"PPDET_RETINA_EXPORT_CACHE": FRESH_CACHE}))
        out.append(("previous dygraph forward + NMS", "infer_ms",
                    [py, prev, "--skip-train", "--skip-engines"] + common + ours_only, prev_dir, {}))
        out.append(("previous train step, fresh process", "train_step_ms",
                    [py, prev, "--skip-infer", "--skip-engines"] + common + ours_only, prev_dir, {}))
    if args.ppdet:
        tool = os.path.join(ROOT, "tools", "dev", "ppdet_benchmark.py")
        env = {"PYTHONPATH": args.ppdet, "PPDET_CONFIGS": os.path.join(args.ppdet, "configs")}
        out.append(("PaddleDetection dygraph forward + NMS", "infer_ms",
                    [args.ppdet_python, tool, "--skip-train"] + common, ROOT, env))
        out.append(("PaddleDetection train step", "train_step_ms",
                    [args.ppdet_python, tool, "--skip-infer"] + common, ROOT, env))
    if args.only:
        out = [figure for figure in out if any(word in figure[0] for word in args.only)]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="times the whole list runs, alternated")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--config", default=None, help="our config (default: benchmark.py's R50-FPN)")
    parser.add_argument("--infer-size", type=int, nargs="+", default=None, help="benchmark.py's (default 800 1216)")
    parser.add_argument("--train-size", type=int, nargs="+", default=None, help="benchmark.py's (default 512)")
    parser.add_argument("--bf16", action="store_true", help="also the bf16 engines (CPUs with avx512_bf16)")
    parser.add_argument("--prev", default=None, metavar="COMMIT", help="a previous commit to compare with")
    parser.add_argument("--ppdet", default=None, metavar="DIR", help="a PaddleDetection checkout")
    parser.add_argument("--ppdet-python", default="python", help="python of an environment with its deps")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per process")
    parser.add_argument("--only", nargs="+", default=None, metavar="WORD",
                        help="run only the figures whose label contains one of these words")
    return parser


def main(argv: Optional[List[str]] = None) -> Dict[str, List[float]]:
    args = build_parser().parse_args(argv)
    prev_dir = None
    if args.prev:
        prev_dir = tempfile.mkdtemp(prefix="ppdet_retina_prev_")
        os.rmdir(prev_dir)
        subprocess.run(["git", "worktree", "add", "--detach", prev_dir, args.prev], cwd=ROOT, check=True,
                       capture_output=True)
    results: Dict[str, List[float]] = {}
    setup: Dict[str, List[float]] = {}
    rates: Dict[str, List[float]] = {}
    engines: Dict[str, List[str]] = {}  # what ran (auto's choice for the default-engine figures)
    try:
        env_base = dict(os.environ, GLOG_minloglevel="2")
        for r in range(args.rounds):
            for label, key, cmd, cwd, extra in figures(args, prev_dir):
                print(f"round {r + 1}: {label} (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
                with tempfile.TemporaryDirectory(prefix="ppdet_retina_bench_cache_") as fresh:
                    env = {**env_base, **{k: fresh if v == FRESH_CACHE else v for k, v in extra.items()}}
                    out = run_json(cmd, cwd, env, args.timeout)
                if out is not None and key in out:
                    results.setdefault(label, []).append(float(out[key]))
                    for k in ("trace_compile_s", "default_engine_trace_s"):
                        if k in out:
                            setup.setdefault(label, []).append(float(out[k]))
                    if isinstance(out.get("eval_images_per_s"), (int, float)):
                        rates.setdefault(label, []).append(float(out["eval_images_per_s"]))
                    engine = out.get("default_engine") or out.get("description")
                    if engine and engine not in engines.setdefault(label, []):
                        engines[label].append(engine)
            print_table(results, setup, rates, engines, args.threads, r + 1)
    finally:
        if prev_dir:
            subprocess.run(["git", "worktree", "remove", "--force", prev_dir], cwd=ROOT, capture_output=True)
            shutil.rmtree(prev_dir, ignore_errors=True)
    return results


def print_table(results: Dict[str, List[float]], setup: Dict[str, List[float]], rates: Dict[str, List[float]],
                engines: Dict[str, List[str]], threads: int, rounds: int) -> None:
    """The markdown table of medians and ranges so far."""
    print(f"CPU: {cpu_summary()}; threads {threads}; {rounds} round(s), each figure its own process", flush=True)
    print("| figure | median ms | range ms | trace + compile s | eval images/s | what ran |\n|---|---|---|---|---|---|")
    for label, values in results.items():
        trace, rate = setup.get(label), rates.get(label)
        print(f"| {label} | {statistics.median(values):.0f} | {min(values):.0f}-{max(values):.0f} | "
              f"{'%.1f' % statistics.median(trace) if trace else ''} | "
              f"{'%.2f' % statistics.median(rate) if rate else ''} | {'; '.join(engines.get(label, []))} |",
              flush=True)


if __name__ == "__main__":
    main()
