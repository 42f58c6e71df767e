"""The sensitivity sweep on each executor: wall time and identical decisions.

For each model, runs (one subprocess per executor, so each wall time includes starting Python and,
for ``process`` and ``ray``, starting and stopping the workers)

    onnxshrink optimize M out-EX.onnx --calib calib --passes cleanup,prune,svd,quantize \
        --budget B --target-size 0.2 --executor EX --workers 2 --no-cache [extra]

and reports, per executor: the sweep's own seconds (``allocation.sensitivity.seconds``: measuring
the candidates, without the executor's start-up), the whole run's wall time, and whether the
table, the decisions and the written model's bytes equal the first executor's. The table depends
on the executor only; the decisions also on the quantize closure, which keeps more int8 units only
when they *time* faster (printed per run): on a small model a coin flip whatever the executor.

  digits   the load_digits CNN of tests/digits_cnn.py, 64 training images as calibration and
           the 497 test images (real labels) as validation, budget accuracy>=-1%
  yolov8n  YOLOv8n on 16 real photos (every 4th held out), budget cosine>=0.99, with
           --max-units 6 --sensitivity-samples 4

    PYTHONPATH=. python benchmarks/executor_bench.py [digits] [yolov8n] [--executors serial,process,ray]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _prepare(name: str, d: Path) -> tuple[Path, list[str]]:
    d.mkdir(parents=True, exist_ok=True)
    if name == "digits":
        import onnx

        from tests.digits_cnn import digits_model, digits_split, write_digits_folder
        src = d / "digits.onnx"
        if not src.exists():
            xtr, ytr, xte, yte = digits_split()
            onnx.save(digits_model(), str(src))
            write_digits_folder(d / "calib", xtr[:64], ytr[:64])
            write_digits_folder(d / "val", xte, yte)
        return src, ["--calib", str(d / "calib"), "--val", str(d / "val"), "--budget", "accuracy>=-1%"]
    from models.real import real_model, real_samples, write_samples
    if not (d / "calib").exists():
        write_samples(real_samples(name, 16, seed=0), d / "calib")
    return real_model(name), ["--calib", str(d / "calib"), "--budget", "cosine>=0.99", "--max-units", "6",
                              "--sensitivity-samples", "4"]


def _run(src: Path, d: Path, ex: str, args: list[str]) -> dict:
    out, rep = d / f"out-{ex}.onnx", d / f"report-{ex}.json"
    for p in (out, rep):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "onnxshrink", "optimize", str(src), str(out), *args,
           "--passes", "cleanup,prune,svd,quantize", "--target-size", "0.2", "--executor", ex, "--workers", "2",
           "--no-cache", "--report", str(rep), "-q"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if not rep.exists():
        raise SystemExit(f"{ex}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    a = json.loads(rep.read_text())["allocation"]
    return {"exit": r.returncode, "wall": wall, "sens": a["sensitivity"], "table": a["table"],
            "decisions": a["decisions"], "chosen_n": a["chosen_n"], "closure": a.get("closure"),
            "noise": (r.stdout + r.stderr).strip(),
            "sha": hashlib.sha256(out.read_bytes()).hexdigest() if out.exists() else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["digits", "yolov8n"])
    ap.add_argument("--executors", default="serial,process,ray")
    ap.add_argument("--out", default="/tmp/executor_bench")
    a = ap.parse_args()
    for name in a.models:
        d = Path(a.out) / name
        src, args = _prepare(name, d)
        runs = {ex: _run(src, d, ex, args) for ex in a.executors.split(",")}
        base = runs[a.executors.split(",")[0]]
        strip = lambda rows: [{k: v for k, v in r.items() if k not in ("cached", "seconds")} for r in rows]  # noqa: E731
        print(f"{name}: {base['sens']['candidates']} candidates, {base['chosen_n']} chosen, load "
              f"{os.getloadavg()[0]:.1f}")
        print(f"  {'executor':8s} {'sweep s':>8s} {'wall s':>8s}  same table / decisions / bytes  chosen  exit  output")
        for ex, r in runs.items():
            same = (strip(r["table"]) == strip(base["table"]), r["decisions"] == base["decisions"],
                    r["sha"] == base["sha"])
            print(f"  {ex:8s} {r['sens']['seconds']:8.1f} {r['wall']:8.1f}  {' / '.join(map(str, same)):30s}"
                  f"  {str(r['chosen_n']):6s}  {r['exit']:4d}  {'(none)' if not r['noise'] else repr(r['noise'][:80])}")
        for ex, r in runs.items():  # the quantize closure's choice rests on a timing: machine noise, not the executor
            print(f"  closure ({ex}): {r['closure']}")


if __name__ == "__main__":
    main()
