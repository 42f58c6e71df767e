"""How far this machine's timing noise can fake a speed difference: the evidence behind
``runtime.DECISIVE_FACTOR``.

    PYTHONPATH=. python benchmarks/timing_noise.py                    # quiet machine, 150 blocks per model
    PYTHONPATH=. python benchmarks/timing_noise.py --hogs 2 --blocks 100   # two CPU hogs beside the timing

Per model, two sessions of the same model (one intra-op thread, as every speed decision runs) are
timed in interleaved 6-round blocks (``runtime.interleaved_latency``, the early look's first block of
``runtime.compare_speeds``). The true speed ratio is 1.0, so a block whose every round reads the
second session faster by a factor x (its minimum ratio ``x``) is noise that would fake a difference
of x in every round. The table gives, over the blocks, the largest such block minimum (and the
smallest block maximum: the same in the other direction) beside the widest single ratios.
``--hogs N`` starts N processes beside the timing (one busy Python loop; the others alternate
numpy matrix products and short sleeps) for the run's duration.

A decision taken on the first block alone needs every one of its rounds ``DECISIVE_FACTOR`` (1.25)
beyond the boundary; the measured block minima stay far under that.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import quantize_bench as qb  # noqa: E402

from onnxshrink.runtime import DECISIVE_FACTOR, EARLY_ROUNDS, interleaved_latency, make_session  # noqa: E402

MODELS = ["crnn", "yolov8n", "vit_s", "ppocr_cls"]


def _hog(kind: int, seconds: float) -> None:
    import numpy as np
    t = time.time()
    if kind == 0:
        while time.time() - t < seconds:
            sum(i * i for i in range(100000))
    a = np.random.default_rng(0).random((600, 600), dtype=np.float32)
    while time.time() - t < seconds:
        for _ in range(50):
            a @ a
        time.sleep(0.05)


def blocks(model_path, sample: dict, n: int) -> tuple[list[float], list[float]]:
    """The minimum and maximum per-round ratio of ``n`` 6-round blocks of a model against itself."""
    s1, s2 = make_session(str(model_path), threads=1), make_session(str(model_path), threads=1)
    mins, maxs = [], []
    for _ in range(n):
        a, b = interleaved_latency([s1, s2], sample, rounds=EARLY_ROUNDS, runs=1, warmup=1)
        r = [x / y for x, y in zip(a, b)]
        mins.append(min(r))
        maxs.append(max(r))
    return mins, maxs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--blocks", type=int, default=150)
    ap.add_argument("--hogs", type=int, default=0, help="processes loading the CPU beside the timing")
    a = ap.parse_args(argv)
    from models.real import real_model, real_samples
    hogs = [mp.Process(target=_hog, args=(k % 2, 3600), daemon=True) for k in range(a.hogs)]
    for h in hogs:
        h.start()
    print(f"{'model':10} {'blocks':>6} {'largest block min':>18} {'smallest block max':>19} "
          f"{'widest ratios':>15}   (decisive: 1 / {DECISIVE_FACTOR:g} .. {DECISIVE_FACTOR:g} of the boundary)")
    try:
        with tempfile.TemporaryDirectory() as d:
            for name in a.models.split(","):
                if name in qb.MODELS:
                    path, samples = real_model(name), real_samples(name, 1, seed=0)
                else:
                    path, samples = qb._built_model(name, Path(d), 1)
                mins, maxs = blocks(path, samples[0], a.blocks)
                print(f"{name:10} {a.blocks:6d} {max(mins):18.3f} {min(maxs):19.3f} "
                      f"{min(mins):7.3f}-{max(maxs):.3f}")
                sys.stdout.flush()
    finally:
        for h in hogs:
            h.terminate()


if __name__ == "__main__":
    main()
