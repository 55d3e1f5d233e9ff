"""One worker of the two-process multi-worker test (``tests/test_distribute.py``).

    TF_CONFIG=... python tests/multiworker_job.py OUT.npz

Builds the project's ``default`` network (small: 32 px, quarter width) under
``core.distribute.strategy("multiworker")``, trains it for a few steps on synthetic films with a
known answer (a bright blob means covid) through ``core.train.make_dataset`` and
``core.distribute.shard``, and saves its weights before and after training to ``OUT.npz``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from core import distribute  # noqa: E402

SIZE, N, BATCH, STEPS = 32, 64, 16, 6


def films(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """N grey films (SIZE x SIZE, [0, 255]); class 0 (covid) has a bright blob."""
    rng = np.random.default_rng(seed)
    x = rng.normal(90, 20, (N, SIZE, SIZE)).clip(0, 255).astype(np.float32)
    y = np.arange(N) % 2
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in np.flatnonzero(y == 0):
        cy, cx = rng.integers(8, SIZE - 8, 2)
        x[i] += 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0)
    return x.clip(0, 255), np.eye(2, dtype=np.float32)[y]


def main(out: str) -> int:
    strategy = distribute.strategy("multiworker")  # first: before TensorFlow runs any operation
    import keras

    keras.config.disable_traceback_filtering()

    from core import model as model_lib
    from core import train

    keras.utils.set_random_seed(1)
    x, y = films()
    with strategy.scope():
        model = model_lib.build("default", "binary", SIZE, width=0.25)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.CategoricalCrossentropy())
    before = [np.array(v.numpy()) for v in model.weights]
    ds = distribute.shard(train.make_dataset(x, y, np.ones(N, np.float32), BATCH, seed=3, augment="light"))
    model.fit(ds, epochs=2, steps_per_epoch=STEPS // 2, verbose=0, callbacks=distribute.callbacks(strategy, model))
    after = [np.array(v.numpy()) for v in model.weights]
    np.savez(out, replicas=strategy.num_replicas_in_sync, chief=distribute.is_chief("multiworker"),
             **{f"before_{i}": w for i, w in enumerate(before)}, **{f"after_{i}": w for i, w in enumerate(after)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
