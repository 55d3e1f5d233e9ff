"""Benchmark: training throughput of our pipeline vs the original project's, and inference latency.

    .venv/bin/python tests/benchmarks/bench_train.py [--data DIR] [--n 256] [--size 128] [--threads 2]

Prints ONE JSON object. In one run it measures:

* ``ours``: the ``default`` preset at ``--size`` fed by core.train's tf.data pipeline (images
  decoded once through core.images and held in memory, seeded augmentation, prefetch): steady-state
  images/s over full epochs after one warm-up epoch; the one-off decoding time is reported apart.
* ``original``: a faithful re-creation of the original project's pipeline: a Keras
  ImageDataGenerator-style generator that re-reads and decodes every file from disk each epoch
  (PIL, RGB, 224x224 nearest resize), applies on-the-fly shear (0.2 degrees), zoom (0.8-1.2) and
  horizontal flip with scipy.ndimage.affine_transform per channel, rescales by 1/255, and trains
  the ``seed`` network (Conv32, Conv64, pool, dropout, Conv64, pool, dropout, Conv128, pool,
  dropout, Flatten, Dense64, dropout, sigmoid unit) on 224x224x3.
* ``latency_ms``: warm single-image inference of the default model (median of 50 calls, after
  warm-up), through core.model.probabilities and through a compiled call.

Both pipelines see the same ``--n`` real images with batch size 32, on ``--threads`` CPU threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402


def original_model(size=224):
    """The original project's network, input 224x224x3 in [0, 1], one sigmoid unit."""
    import keras
    from keras import layers

    inp = keras.Input((size, size, 3))
    x = layers.Conv2D(32, 3, activation="relu")(inp)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Dropout(0.25)(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Dropout(0.25)(x)
    x = layers.Conv2D(128, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Dropout(0.25)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    out = layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    return model


def _random_transform(x, rng, shear_deg=0.2, zoom=0.2, hflip=True):
    """ImageDataGenerator.random_transform + apply_affine_transform (scipy, per channel)."""
    from scipy import ndimage

    h, w = x.shape[:2]
    shear = np.deg2rad(rng.uniform(-shear_deg, shear_deg))
    zx, zy = rng.uniform(1 - zoom, 1 + zoom, 2)
    m = np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]]) @ np.array(
        [[zx, 0, 0], [0, zy, 0], [0, 0, 1]]
    )
    o_x, o_y = h / 2 + 0.5, w / 2 + 0.5
    offset = np.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]])
    reset = np.array([[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]])
    m = offset @ m @ reset
    out = np.stack(
        [ndimage.affine_transform(x[..., c], m[:2, :2], m[:2, 2], order=1, mode="nearest") for c in range(3)],
        axis=-1,
    )
    if hflip and rng.random() < 0.5:
        out = out[:, ::-1]
    return out


def original_batches(paths, labels, batch=32, size=224, seed=0):
    """flow_from_directory-like: decode each file from disk every time it is used."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    order = np.arange(len(paths))
    while True:
        rng.shuffle(order)
        for s in range(0, len(order) - batch + 1, batch):
            xs = []
            for i in order[s : s + batch]:
                img = Image.open(paths[i]).convert("RGB").resize((size, size), Image.NEAREST)
                xs.append(_random_transform(np.asarray(img, np.float32), rng) / 255.0)
            yield np.stack(xs), labels[order[s : s + batch]].astype(np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data")
    p.add_argument("--n", type=int, default=256, help="images per epoch (both pipelines)")
    p.add_argument("--size", type=int, default=128, help="our input size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="our timed epochs (after one warm-up)")
    a = p.parse_args(argv)

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(a.threads)
    tf.config.threading.set_inter_op_parallelism_threads(a.threads)
    import keras

    from core import augment, config, image_cache, splits
    from core import model as model_lib

    root = config.data_dir(a.data)
    table = splits.prepare(root)
    table = table[table["split"] == "train"].sample(n=min(a.n, int((table["split"] == "train").sum())), random_state=0)
    paths = [str(root / q) for q in table["path"]]
    y = (table["label"] == "covid").to_numpy().astype(int)
    n = len(paths) - len(paths) % 32
    out = {"n_images": n, "batch_size": 32, "threads": a.threads, "cpu_count": os.cpu_count()}

    # ----- ours
    keras.utils.set_random_seed(0)
    t0 = time.perf_counter()
    pix, _, _, kept, _ = image_cache.prepare_images(root, table["path"].tolist()[:n], a.size, None, cache_dir=None,
                                                    progress=False)
    decode_s = time.perf_counter() - t0
    yy = np.eye(2, dtype=np.float32)[1 - y[kept]]
    w = np.ones(len(kept), np.float32)
    ds = augment.make_dataset(pix, yy, w, 32, seed=0, augment="default")
    model = model_lib.build("default", "binary", a.size, contrast="local")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    steps = n // 32
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)  # warm-up (tracing)
    t0 = time.perf_counter()
    model.fit(ds, epochs=a.epochs, steps_per_epoch=steps, verbose=0)
    ours_s = (time.perf_counter() - t0) / a.epochs
    out["ours"] = {
        "preset": "default (contrast=local)",
        "size": a.size,
        "params": int(model.count_params()),
        "epoch_seconds": round(ours_s, 3),
        "images_per_s": round(n / ours_s, 1),
        "decode_once_seconds": round(decode_s, 2),
        "images_per_s_incl_decode_1_epoch": round(n / (ours_s + decode_s), 1),
    }

    # ----- original
    keras.utils.set_random_seed(0)
    orig = original_model()
    gen = original_batches(paths[:n], y[:n])
    orig.fit(gen, epochs=1, steps_per_epoch=1, verbose=0)  # warm-up (tracing)
    t0 = time.perf_counter()
    orig.fit(gen, epochs=1, steps_per_epoch=steps, verbose=0)
    orig_s = time.perf_counter() - t0
    out["original"] = {
        "preset": "seed (224x224x3, Flatten), ImageDataGenerator-style disk decode + shear/zoom/flip",
        "size": 224,
        "params": int(orig.count_params()),
        "epoch_seconds": round(orig_s, 3),
        "images_per_s": round(n / orig_s, 1),
    }
    out["speedup"] = round(out["ours"]["images_per_s"] / out["original"]["images_per_s"], 2)
    out["speedup_incl_decode"] = round(out["ours"]["images_per_s_incl_decode_1_epoch"] / out["original"]["images_per_s"], 2)

    # ----- warm single-image latency
    img = pix[0]
    for _ in range(5):
        model_lib.probabilities(model, img)
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        model_lib.probabilities(model, img)
        times.append(time.perf_counter() - t0)
    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    x1 = img[None, ..., None]
    for _ in range(5):
        fn(x1)
    times_c = []
    for _ in range(50):
        t0 = time.perf_counter()
        np.asarray(fn(x1))
        times_c.append(time.perf_counter() - t0)
    out["latency_ms"] = {
        "size": a.size,
        "probabilities_median": round(1000 * float(np.median(times)), 2),
        "probabilities_p90": round(1000 * float(np.percentile(times, 90)), 2),
        "compiled_median": round(1000 * float(np.median(times_c)), 2),
    }
    out["load_average"] = os.getloadavg()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
