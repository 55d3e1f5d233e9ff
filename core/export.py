"""Serving export: ``python -m core.export RUN --out DIR [--json]``.

Writes a TensorFlow SavedModel that TensorFlow Serving loads as it is (``DIR`` is one version
folder, e.g. ``serving/cxr/1``). Its ``serving_default`` signature takes what a client has,
decoded grey films, and does every other step inside:

- input ``image``: float32 ``(batch, height, width, 1)``, raw grey pixels in [0, 255] as
  :func:`core.images.decode` gives them; any height and width, one size for the whole batch
  (send one film per request for films of different sizes);
- outputs ``p_covid`` ``(batch,)`` = P(COVID-19), ``probs`` ``(batch, n_classes)`` (the run's
  classes, COVID-19 first), ``box`` ``(batch, 4)`` the region the network saw (y0, x0, y1, x1,
  fractions of the film) and ``fell_back`` ``(batch,)``: True where the run crops to the lungs
  but none were found, so the whole film was used (show :data:`core.inputs.FALLBACK_WARNING`).

The preparation is :mod:`core.inputs` rewritten in TensorFlow ops: the resize of
:func:`core.images.resize` (area when shrinking, bilinear otherwise), and for a run whose config
has ``lung_crop``, the shipped lung U-Net (:mod:`core.lungs`) on the film at the net's size, the
box rule of :func:`core.inputs.lung_box` (threshold, trimmed mass per axis, margin, the
min_area / min_side fallback to the whole film), the pixel bounds of :func:`core.inputs.crop`,
the crop and the resize; for a run with ``clahe``, :func:`core.inputs.clahe` (OpenCV's 8-bit
CLAHE, clip 2.0, 8x8 tiles) on each prepared input, in TF ops that give the same grey levels
(:func:`clahe`; the network's side must be a multiple of 8). ``tests/test_export.py`` compares
both paths on real films.
``DIR/export.json`` records the run, its model's sha256, the lung-crop settings and the
signature.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from core import config, inputs, lungs, runs
from core import model as model_lib

SIGNATURE = "serving_default"


def resize(img, size: int):
    """:func:`core.images.resize` in TF ops: (h, w, 1) or (n, h, w, 1) -> (.., size, size, 1);
    area interpolation when ``size`` is below the longer side, bilinear otherwise (as cv2)."""
    h, w = tf.shape(img)[-3], tf.shape(img)[-2]
    return tf.cond(
        size < tf.maximum(h, w),
        lambda: tf.image.resize(img, [size, size], method="area"),
        lambda: tf.image.resize(img, [size, size], method="bilinear"),
    )


def lung_box(prob, crop: dict):
    """:func:`core.inputs.lung_box` in TF ops on one (n, n) probability map.

    Returns ``(box float64 (4,), found bool)``; ``box`` is the whole film when not found. All
    arithmetic is float64 on integer pixel counts, as numpy does it, so the rule is the same.
    """
    c = {**inputs.LUNG_CROP, **crop}
    m = tf.cast(prob >= c["threshold"], tf.float64)
    h, w = tf.shape(prob, out_type=tf.int64)[0], tf.shape(prob, out_type=tf.int64)[1]
    total = tf.reduce_sum(m)

    def span(counts, n):
        cum = tf.cumsum(counts)
        lo = tf.searchsorted(cum, [c["trim"] * total], side="right", out_type=tf.int64)[0]
        hi = tf.searchsorted(cum, [(1.0 - c["trim"]) * total], side="left", out_type=tf.int64)[0] + 1
        n_f = tf.cast(n, tf.float64)
        return tf.cast(lo, tf.float64) / n_f, tf.cast(tf.minimum(hi, n), tf.float64) / n_f

    y0, y1 = span(tf.reduce_sum(m, axis=1), h)
    x0, x1 = span(tf.reduce_sum(m, axis=0), w)
    found = (total >= c["min_area"] * tf.cast(h * w, tf.float64)) & (y1 - y0 >= c["min_side"]) & (
        x1 - x0 >= c["min_side"])
    dy, dx = c["margin"] * (y1 - y0), c["margin"] * (x1 - x0)
    zero, one = tf.constant(0.0, tf.float64), tf.constant(1.0, tf.float64)
    box = tf.stack([tf.maximum(zero, y0 - dy), tf.maximum(zero, x0 - dx),
                    tf.minimum(one, y1 + dy), tf.minimum(one, x1 + dx)])
    return tf.where(found, box, tf.constant(inputs.FULL_BOX, tf.float64)), found


def crop(film, box):
    """:func:`core.inputs.crop` in TF ops: the part of ``film`` (h, w, 1) inside the fractional box."""
    shape = tf.shape(film, out_type=tf.int64)
    h, w = shape[0], shape[1]
    hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
    y0, x0 = tf.cast(tf.floor(box[0] * hf), tf.int64), tf.cast(tf.floor(box[1] * wf), tf.int64)
    y1 = tf.minimum(h, tf.maximum(y0 + 1, tf.cast(tf.math.ceil(box[2] * hf), tf.int64)))
    x1 = tf.minimum(w, tf.maximum(x0 + 1, tf.cast(tf.math.ceil(box[3] * wf), tf.int64)))
    return film[y0:y1, x0:x1]


CLAHE_TILES = 8  # core.inputs.clahe: cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
CLAHE_CLIP = 2.0


def clahe_luts(u8, size: int):
    """The per-tile look-up tables of :func:`core.inputs.clahe` in TF ops, as OpenCV's 8-bit CLAHE
    builds them: (n, size, size) int32 grey levels -> (n, 64 * 256) float32, tile-major.

    Per tile, a 256-bin histogram clipped at ``max(int(2.0 * pixels / 256), 1)``; the excess
    spread ``excess // 256`` to every bin and the residual one per bin at 0, step, 2 step, ..
    (step ``max(256 // residual, 1)``); then ``round(cumsum * float32(255 / pixels))``.
    """
    t, k = size // CLAHE_TILES, CLAHE_TILES
    tiles = tf.reshape(tf.transpose(tf.reshape(u8, [-1, k, t, k, t]), [0, 1, 3, 2, 4]), [-1, t * t])
    hist = tf.math.bincount(tiles, minlength=256, maxlength=256, axis=-1)  # (n * 64, 256) int32
    limit = max(int(CLAHE_CLIP * t * t / 256), 1)
    excess = tf.reduce_sum(tf.maximum(hist - limit, 0), axis=1, keepdims=True)
    batch, residual = excess // 256, excess % 256
    step = tf.maximum(256 // tf.maximum(residual, 1), 1)
    bins = tf.range(256)[None, :]
    extra = tf.cast((residual > 0) & (bins % step == 0) & (bins // step < residual), tf.int32)
    hist = tf.minimum(hist, limit) + batch + extra
    scale = np.float32(255) / np.float32(t * t)  # OpenCV's lutScale, a float32
    lut = tf.clip_by_value(tf.round(tf.cast(tf.cumsum(hist, axis=1), tf.float32) * scale), 0.0, 255.0)
    return tf.reshape(lut, [-1, k * k * 256])


def clahe_weights(size: int):
    """OpenCV CLAHE's bilinear blend of tiles along one axis, computed in float32 as it does:
    ``(lo, hi, w)``, the two tile indices and the weight of ``hi`` for each pixel 0..size-1."""
    f = np.arange(size, dtype=np.float32) * (np.float32(1) / np.float32(size // CLAHE_TILES)) - np.float32(0.5)
    lo = np.floor(f).astype(np.int64)
    w = (f - lo.astype(np.float32)).astype(np.float32)
    return np.maximum(lo, 0), np.minimum(lo + 1, CLAHE_TILES - 1), w


def clahe(x):
    """:func:`core.inputs.clahe` in TF ops: CLAHE (clip 2.0, 8x8 tiles) of prepared inputs
    (n, size, size, 1) in [0, 255], as OpenCV's 8-bit CLAHE does it; ``size`` must be a multiple
    of 8 (OpenCV pads other sizes, which this does not replicate).

    Tile indices and weights depend only on the size, so they are numpy constants; each pixel
    blends its grey level's value in the four nearest tiles' tables (float32, OpenCV's order).
    """
    size = int(x.shape[1])
    u8 = tf.cast(tf.clip_by_value(x[..., 0] + 0.5, 0.0, 255.0), tf.int32)  # truncates, as astype(uint8)
    lut = clahe_luts(u8, size)
    lo, hi, w = clahe_weights(size)  # the image is square: the same tiles and weights on both axes
    v = tf.reshape(u8, [-1, size * size])

    def at(ty, tx):  # lut[tile (ty[y], tx[x])][v[y, x]] for every pixel
        tile = (ty[:, None] * CLAHE_TILES + tx[None, :]).reshape(-1) * 256
        return tf.gather(lut, v + tf.constant(tile, tf.int32), batch_dims=1)

    xa, ya = tf.constant(np.tile(w, size)), tf.constant(np.repeat(w, size))
    xa1, ya1 = 1.0 - xa, 1.0 - ya
    res = (at(lo, lo) * xa1 + at(lo, hi) * xa) * ya1 + (at(hi, lo) * xa1 + at(hi, hi) * xa) * ya
    return tf.reshape(tf.clip_by_value(tf.round(res), 0.0, 255.0), [-1, size, size, 1])


def serving_fn(model, lung_crop: dict | None, lung_model=None, net_size: int | None = None,
               positive_index: int = config.COVID_INDEX):
    """The signature's function: films (n, h, w, 1) -> dict of p_covid, probs, box, fell_back;
    ``p_covid`` is column ``positive_index`` of ``probs`` (an adopted run's classes have any order)."""
    size = model_lib.input_size(model)

    def prepare(films):
        n = tf.shape(films)[0]
        if lung_crop is None:
            return resize(films, size), tf.tile(tf.constant([inputs.FULL_BOX], tf.float64), [n, 1]), tf.zeros([n], tf.bool)
        probs = lung_model(resize(films, net_size), training=False)[..., 0]

        def one(args):
            film, prob = args
            box, found = lung_box(prob, lung_crop)
            return resize(crop(film, box), size), box, tf.logical_not(found)

        sig = (tf.TensorSpec([size, size, 1], tf.float32), tf.TensorSpec([4], tf.float64), tf.TensorSpec([], tf.bool))
        x, box, fell_back = tf.map_fn(one, (films, probs), fn_output_signature=sig)
        return (clahe(x) if lung_crop.get("clahe") else x), box, fell_back

    def serve(image):
        x, box, fell_back = prepare(tf.cast(image, tf.float32))
        probs = model(x, training=False)
        return {"p_covid": probs[:, positive_index], "probs": probs, "box": box, "fell_back": fell_back}

    return serve


def export(run, out) -> dict:
    """Write the SavedModel of ``run`` to ``out`` (created; must not exist or be empty); return
    what ``export.json`` records."""
    run = runs.open_run(run)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise runs.RunError(f"{out} is not empty; export into a new folder (TF Serving: <model>/<version>)")
    if run.blackbox:
        raise runs.RunError(f"{run.label} is an adopted SavedModel, which is already a SavedModel but takes the "
                            "model's own preprocessed input, so there is no model.keras to wrap with the film "
                            "preparation: serve its model_savedmodel folder and prepare films as core.adopt does")
    model = run.model()
    if (run.lung_crop or {}).get("clahe") and model_lib.input_size(model) % CLAHE_TILES:
        raise runs.RunError(f"{run.label} applies CLAHE to inputs of {model_lib.input_size(model)} px, not a multiple "
                            f"of {CLAHE_TILES}: OpenCV pads such inputs into its 8x8 tiles, which the export's "
                            "TensorFlow CLAHE does not replicate; serve it with core.predict instead")
    crop_cfg = run.lung_crop
    lung_model = net = None
    archive = keras.export.ExportArchive()
    archive.track(model)
    if crop_cfg is not None:
        lung_model, net = lungs.lung_model(), lungs.net_size()
        archive.track(lung_model)
    fn = serving_fn(model, crop_cfg, lung_model, net, run.positive_index)
    archive.add_endpoint(SIGNATURE, fn, input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32, name="image")])
    archive.write_out(str(out), verbose=False)
    classes = list(run.classes)
    record = {
        "run": str(run.path),
        "model_sha256": runs.sha256(run.file("model.keras")),
        "classes": classes,
        "lung_crop": crop_cfg,
        "lung_net_size": net,
        "signature": {
            "name": SIGNATURE,
            "inputs": {"image": "float32 (batch, height, width, 1): raw grey films in [0, 255], one size per batch"},
            "outputs": {
                "p_covid": "float32 (batch,): P(COVID-19)",
                "probs": f"float32 (batch, {len(classes)}): {', '.join(classes)}",
                "box": "float64 (batch, 4): region the network saw, y0 x0 y1 x1 as fractions of the film",
                "fell_back": "bool (batch,): lung crop asked for but no lungs found (whole film used)",
            },
        },
    }
    (out / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m core.export",
        description="Export a run as a TensorFlow SavedModel for TF Serving: grey films in, P(covid) out, "
        "preparation (resize, the run's lung crop and CLAHE) inside. Use a version folder, e.g. --out serving/cxr/1.",
    )
    runs.add_run_argument(p, positional=True)
    p.add_argument("--out", required=True, metavar="DIR", help="new folder for the SavedModel")
    p.add_argument("--json", action="store_true", help="print what export.json records as one JSON object")
    a = p.parse_args(argv)
    run = runs.open_for_cli(a.run)
    if run is None:
        return 2
    try:
        record = export(run, a.out)
    except (runs.RunError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record) if a.json else f"SavedModel written to {a.out} (signature {SIGNATURE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
