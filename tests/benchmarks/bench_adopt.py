"""Adoption throughput and memory: ``python tests/benchmarks/bench_adopt.py [--data DIR] [--limit N]``.

Builds a ``keras.applications.DenseNet121(weights=None)`` at 224 px with a new two-class softmax
head, saves it as ``.keras``, and adopts it with ``python -m core.adopt`` on every film of the
data root (default ../shared/cxr), in a child process whose resident memory (VmRSS) is sampled
every 0.25 s. Prints one JSON object: films scored, films/s of the scoring (decode included),
wall time of the whole command (TensorFlow start and the data table included), peak RSS and the
RSS at each tenth of the run (flat memory: the late tenths are not above the early ones).

``--synthetic N --model tiny`` adopts a small network on N generated 512 px films instead (an
unlabelled archive): the streaming's memory over many films, without DenseNet's hours on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build(path: Path, size: int) -> None:
    """DenseNet121 (random weights) + GAP + Dense(2, softmax), saved as .keras."""
    import keras  # lazy: only the model build needs it; the adoption runs in a child process

    base = keras.applications.DenseNet121(weights=None, include_top=False, input_shape=(size, size, 3))
    x = keras.layers.GlobalAveragePooling2D(name="avg")(base.output)
    out = keras.layers.Dense(2, activation="softmax", name="head")(x)
    keras.Model(base.input, out, name="user_densenet").save(path)


def build_tiny(path: Path, size: int) -> None:
    """A small convolutional network with a sigmoid head, saved as .keras."""
    import keras  # lazy: as in build

    i = keras.Input((size, size, 1))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(i)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x))
    keras.Model(i, keras.layers.Dense(1, activation="sigmoid")(x)).save(path)


def synthetic_archive(folder: Path, n: int) -> Path:
    """``n`` grey 512 px PNG films (noise over a gradient) in sub-folders of 1000."""
    import cv2  # lazy: only the synthetic archive needs it
    import numpy as np

    rng = np.random.default_rng(0)
    base = np.linspace(0, 180, 512, dtype=np.float32)[None, :].repeat(512, 0)
    for k in range(n):
        sub = folder / f"part{k // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(sub / f"film{k:06d}.png"), (base + rng.uniform(0, 60, (512, 512))).astype(np.uint8))
    return folder


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "cxr"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", choices=("densenet121", "tiny"), default="densenet121")
    ap.add_argument("--synthetic", type=int, help="adopt on this many generated films instead of --data")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_adopt_"))
    model = work / f"{args.model}.keras"
    (build if args.model == "densenet121" else build_tiny)(model, args.size)
    data = str(synthetic_archive(work / "archive", args.synthetic)) if args.synthetic else args.data
    cmd = [sys.executable, "-m", "core.adopt", str(model), "--data", data, "--out", str(work / "run"),
           "--preprocess", "torch" if args.model == "densenet121" else "grey01", "--classes", "covid,other",
           "--batch-size", str(args.batch_size), "--n-boot", "200", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    samples = []
    while proc.poll() is None:
        r = rss_mb(proc.pid)
        if r is not None:
            samples.append((time.perf_counter() - t0, r))
        time.sleep(0.25)
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    summary = json.loads(out) if proc.returncode == 0 else {"error": f"exit {proc.returncode}"}
    tenths = [round(max([r for t, r in samples if k * wall / 10 <= t < (k + 1) * wall / 10] or [0.0]), 1)
              for k in range(10)]
    print(json.dumps({
        "model": args.model, "size": args.size, "films_in": args.synthetic or "all of --data",
        "films_scored": summary.get("n_scored"), "errors": len(summary.get("errors", [])),
        "films_per_s": summary.get("films_per_s"), "wall_s": round(wall, 1),
        "peak_rss_mb": round(max(r for _, r in samples), 1) if samples else None,
        "rss_mb_by_tenth_of_run": tenths, "run": str(work / "run"), "command": " ".join(cmd[1:]),
    }, indent=2))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
