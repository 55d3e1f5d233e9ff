"""Training augmentation: the knobs (:data:`AUGMENT`), the batch map and the tf.data pipeline.

Every knob survives the per-image standardisation inside the model (random resized crop,
rotation, gamma, intensity windowing, noise, JPEG re-compression, cut-out, low resolution); the
map is stateless, so the same seed and step give the same batch (determinism, ``--resume``).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

AUGMENT = {
    # Every knob survives the per-image standardisation inside the model (a linear brightness or
    # contrast change would not: standardisation undoes it exactly).
    # rot: degrees; scale: random resized crop, (min, max) share of the side kept; shift: fraction of
    # the side; gamma: log range; window: largest share of each image's pixels an intensity window clips at
    # each end (window/level); noise: Gaussian sigma as a share of 255; jpeg: probability of a JPEG re-encoding
    # (quality 30-90); cutout: probability of one blanked rectangle (up to 1/3 of each side);
    # lowres: probability of a down- then up-scaled copy.
    "none": dict(rot=0.0, scale=(1.0, 1.0), shift=0.0, gamma=0.0, window=0.0, noise=0.0, jpeg=0.0,
                 cutout=0.0, lowres=0.0),
    "light": dict(rot=5.0, scale=(0.9, 1.0), shift=0.03, gamma=0.1, window=0.05, noise=0.01, jpeg=0.2,
                  cutout=0.0, lowres=0.1),
    "default": dict(rot=10.0, scale=(0.8, 1.0), shift=0.05, gamma=0.25, window=0.1, noise=0.02, jpeg=0.3,
                    cutout=0.25, lowres=0.25),
    "strong": dict(rot=15.0, scale=(0.7, 1.0), shift=0.08, gamma=0.4, window=0.15, noise=0.03, jpeg=0.5,
                   cutout=0.5, lowres=0.4),
}


def _affine(x, u, p: dict, size: int, hflip: bool):
    """Random resized crop, rotation, shift and (optionally) horizontal flip, one transform per image."""
    b = tf.shape(x)[0]
    c = (size - 1) / 2.0
    th = u(0, -math.radians(p["rot"]), math.radians(p["rot"]))
    # Random resized crop: keep a share s of the side (zoom in by 1/s), aspect jittered by +-10%.
    s = u(1, p["scale"][0], p["scale"][1])
    aspect = tf.exp(u(10, -0.1, 0.1)) if p["scale"][0] < 1.0 else tf.ones([b])
    sx, sy = s * tf.sqrt(aspect), s / tf.sqrt(aspect)
    tx, ty = u(2, -p["shift"], p["shift"]) * size, u(3, -p["shift"], p["shift"]) * size
    flip = tf.where(u(4, 0.0, 1.0) < 0.5, -1.0, 1.0) if hflip else tf.ones([b])
    cos, sin = tf.cos(th), tf.sin(th)
    # output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2)
    a0, a1, b0, b1 = cos * sx * flip, -sin * sx, sin * sy * flip, cos * sy
    a2 = c - a0 * c - a1 * c + tx
    b2 = c - b0 * c - b1 * c + ty
    zeros = tf.zeros([b])
    t = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=t, output_shape=tf.constant([size, size]), fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT",
    )


def _intensity(x, u, p: dict):
    """A random intensity window and gamma: non-linear grey-level changes a standardisation keeps.

    The window clips a random share (up to ``window``) of each image's darkest and brightest
    pixels, found from the image's own sorted values, and stretches the rest: as a radiologist's
    window/level, it always changes the picture, whatever the film's own range.
    """
    v = tf.clip_by_value(x / 255.0, 0.0, 1.0)
    if p["window"]:
        flat = tf.sort(tf.reshape(v, [tf.shape(v)[0], -1]), axis=1)
        n = tf.cast(tf.shape(flat)[1] - 1, tf.float32)
        lo_i = tf.cast(tf.round(u(5, 0.0, p["window"]) * n), tf.int32)
        hi_i = tf.cast(tf.round(u(6, 1.0 - p["window"], 1.0) * n), tf.int32)
        lo = tf.reshape(tf.gather(flat, lo_i, batch_dims=1), [-1, 1, 1, 1])
        hi = tf.reshape(tf.gather(flat, hi_i, batch_dims=1), [-1, 1, 1, 1])
        v = tf.clip_by_value((v - lo) / tf.maximum(hi - lo, 1e-3), 0.0, 1.0)
    if p["gamma"]:
        g = tf.reshape(tf.exp(u(7, -p["gamma"], p["gamma"])), [-1, 1, 1, 1])
        v = tf.pow(v + 1e-6, g)
    return v * 255.0


def _jpeg(x, u, prob: float):
    """Re-encode a share ``prob`` of the images as JPEG at a random quality (30-90)."""
    q = tf.cast(tf.round(u(8, 30.0, 90.0)), tf.int32)
    pick = u(9, 0.0, 1.0) < prob

    def one(args):
        img, quality, do = args
        enc = tf.image.adjust_jpeg_quality(tf.clip_by_value(img / 255.0, 0.0, 1.0), quality) * 255.0
        return tf.where(do, enc, img)

    return tf.map_fn(one, (x, q, pick), fn_output_signature=tf.float32)


def _cutout(x, u, prob: float, size: int):
    """Blank one random rectangle (up to a third of each side) to the image mean, in a share of the images."""
    yy = tf.reshape(tf.range(size, dtype=tf.float32), [1, size, 1, 1])
    xx = tf.reshape(tf.range(size, dtype=tf.float32), [1, 1, size, 1])

    def r(i, lo, hi):
        return tf.reshape(u(i, lo, hi), [-1, 1, 1, 1])

    h, w = r(11, 0.1, 0.33) * size, r(12, 0.1, 0.33) * size
    cy, cx = r(13, 0.0, 1.0) * size, r(14, 0.0, 1.0) * size
    inside = (tf.abs(yy - cy) < h / 2) & (tf.abs(xx - cx) < w / 2) & (r(15, 0.0, 1.0) < prob)
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    return tf.where(inside, mean, x)


def augment_fn(params: dict, size: int, hflip: bool, seed: int):
    """A batch map ``(step, x, y, w) -> (x', y, w)``; stateless: the same seed and step give the same batch."""
    p = {**AUGMENT["none"], **params}
    p["scale"] = tuple(p["scale"])

    def fn(step, x, y, w):
        b = tf.shape(x)[0]
        base = tf.cast(step, tf.int64) * 32

        def u(i, lo, hi, shape=None):
            s = tf.stack([tf.constant(seed, tf.int64), base + i])
            return tf.random.stateless_uniform(shape if shape is not None else [b], seed=s, minval=lo, maxval=hi)

        if p["rot"] or p["scale"] != (1.0, 1.0) or p["shift"] or hflip:
            x = _affine(x, u, p, size, hflip)
        if p["lowres"]:
            # Sources differ in resolution: sometimes train on a blurred (down- then up-scaled) copy.
            f = u(16, 0.35, 0.8, shape=[])
            small = tf.cast(tf.round(f * size), tf.int32)
            lo = tf.image.resize(tf.image.resize(x, [small, small], antialias=True), [size, size])
            pick = tf.reshape(tf.cast(u(17, 0.0, 1.0) < p["lowres"], tf.float32), [-1, 1, 1, 1])
            x = pick * lo + (1.0 - pick) * x
        if p["window"] or p["gamma"]:
            x = _intensity(x, u, p)
        if p["jpeg"]:
            x = _jpeg(x, u, p["jpeg"])
        if p["noise"]:
            sd = tf.reshape(u(18, 0.0, p["noise"] * 255.0), [-1, 1, 1, 1])
            noise = tf.random.stateless_normal(tf.shape(x), seed=tf.stack([tf.constant(seed, tf.int64), base + 19]))
            x = x + sd * noise
        if p["cutout"]:
            x = _cutout(x, u, p["cutout"], size)
        return tf.clip_by_value(x, 0.0, 255.0), y, w

    return fn


def mixup_fn(alpha: float, seed: int):
    """A batch map ``(step, x, y, w) -> (x', y', w')`` mixing each film with a partner (mixup, Zhang et al. 2018).

    The partner is the batch read backwards (batches are shuffled over every collection, so most
    pairs are of two collections); ``lam ~ Beta(alpha, alpha)``, folded to >= 0.5 so the film
    itself dominates. Films, one-hot targets (every head) and weights are mixed alike. Stateless.
    """

    def fn(step, x, y, w):
        s = tf.stack([tf.constant(seed, tf.int64) + 7, tf.cast(step, tf.int64)])
        g1 = tf.random.stateless_gamma([tf.shape(x)[0]], seed=s, alpha=alpha)
        g2 = tf.random.stateless_gamma([tf.shape(x)[0]], seed=s + tf.constant([0, 1 << 40], tf.int64), alpha=alpha)
        lam = g1 / tf.maximum(g1 + g2, 1e-12)
        lam = tf.maximum(lam, 1.0 - lam)

        def mix(v):
            a = tf.reshape(lam, [-1] + [1] * (len(v.shape) - 1))
            return a * v + (1.0 - a) * tf.reverse(v, axis=[0])

        return mix(x), tf.nest.map_structure(mix, y), tf.nest.map_structure(mix, w)

    return fn


def make_dataset(x, y, w, batch_size: int, seed: int, augment: str | dict = "default", hflip: bool = False,
                 mixup: float = 0.0):
    """An endless, shuffled, augmented, prefetched tf.data pipeline over in-memory images.

    ``y`` and ``w`` may be arrays or dicts of arrays keyed by output name (class and source heads).
    ``mixup`` > 0: each augmented batch is then mixed in pairs (:func:`mixup_fn`, Beta(mixup, mixup)).
    """
    params = AUGMENT[augment] if isinstance(augment, str) else dict(augment)
    size = x.shape[1]

    def f32(v):
        return {k: np.asarray(a, np.float32) for k, a in v.items()} if isinstance(v, dict) else np.asarray(v, np.float32)

    ds = tf.data.Dataset.from_tensor_slices((x[..., None].astype(np.float32), f32(y), f32(w))).cache()
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True).repeat().batch(batch_size)
    fn = augment_fn(params, size, hflip, seed)
    ds = tf.data.Dataset.zip(tf.data.Dataset.counter(), ds).map(lambda i, b: fn(i, *b), num_parallel_calls=1)
    if mixup:
        mix = mixup_fn(float(mixup), seed)
        ds = tf.data.Dataset.zip(tf.data.Dataset.counter(), ds).map(lambda i, b: mix(i, *b), num_parallel_calls=1)
    return ds.prefetch(2)
