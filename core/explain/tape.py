"""The tape engine: tf-keras-vis 0.8.7's formulas on cached, ``tf.function``-compiled tapes.

Each routine takes a prepared batch ``x`` (n, h, w, 1) at the model's size and returns raw maps
(n, h, w), upsampled as tf-keras-vis does (corner-aligned linear, as scipy's zoom). It is 2-15x
faster than tf-keras-vis (which rebuilds a Keras model and runs it eagerly on every call, and
loops over SmoothGrad's samples), which is what keeps Grad-CAM under 100 ms per image; the tests
check that both engines agree (correlation >= 0.99 on the same model). It also reaches a target
layer inside a nested sub-model (a backbone wrapped in the classifier), which tf-keras-vis cannot.

Grad-CAM++: tf-keras-vis multiplies the gradients by exp(score); this positive per-image factor
cancels after normalisation but overflows to inf (NaN maps) for logits above ~88, so this engine
leaves it out.

Score-CAM: the weight of each activation channel is the class *probability* of the input masked
by that channel (Wang et al., 2020), softmax(logits): the model's own probability.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf

from core import keras_adapter
from core.explain import graph
from core.explain.graph import BATCH, SMOOTHGRAD_NOISE

# --------------------------------------------------------------------------------------------
# Compiled functions, one per model (and target layer), in the model's cache


def _cam_fn(model, target, nested: bool, grads: bool = True):
    """Compiled fn(x, class_index) -> (activations, d logit / d activations, logits);
    with ``grads=False`` fn(x) -> activations (forward only, for Score-CAM)."""
    key = ("cam" if grads else "acts", id(target))
    return graph.compiled(model, key, lambda lin: _build_cam_fn(lin, target, nested, grads))


def _build_cam_fn(lin, target, nested: bool, grads: bool):
    if not nested:
        outputs = keras.Model(lin.inputs, [keras_adapter.output_in(lin, target), lin.outputs[0]])

        def forward(x):
            acts, logits = outputs(x, training=False)
            return acts, logits
    else:
        # The layer lives in a sub-model, so its output is not a tensor of the outer graph
        # (why tf-keras-vis fails): record it during the forward pass instead.
        def forward(x):
            store: dict = {}
            with keras_adapter.capture_output(target, store, "acts"):
                logits = lin(x, training=False)
            return store["acts"], logits

    if not grads:

        @tf.function(reduce_retracing=True)
        def acts_only(x):
            return forward(x)[0]

        return acts_only

    @tf.function(reduce_retracing=True)
    def fn(x, class_index):
        with tf.GradientTape() as tape:
            tape.watch(x)
            acts, logits = forward(x)
            score = tf.gather(logits, class_index, axis=-1)
        return acts, tape.gradient(score, acts), logits

    return fn


def _build_input_grad_fn(lin):
    @tf.function(reduce_retracing=True)
    def fn(x, class_index):
        with tf.GradientTape() as tape:
            tape.watch(x)
            score = tf.gather(lin(x, training=False), class_index, axis=-1)
        return tape.gradient(score, x)

    return fn


def _acts_grads(model, x, class_index, layer):
    target, nested = graph.target(model, layer)
    fn = _cam_fn(model, target, nested)
    acts, grads, logits = fn(tf.constant(x), tf.constant(class_index, tf.int32))
    if grads is None:
        raise ValueError(f"layer {target.name!r} does not influence the output")
    return acts.numpy(), grads.numpy(), logits.numpy()


# --------------------------------------------------------------------------------------------
# Upsampling as tf-keras-vis does it


def _relu(a):
    return np.maximum(a, 0.0)


@functools.lru_cache(maxsize=64)
def interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of linear interpolation with the end points aligned."""
    pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def upsample(a, hw):
    """Linear upsampling of (h, w[, c]) to hw with corners aligned: what tf-keras-vis does with
    scipy's zoom(order=1), so both engines give the same maps, as two small matrix products
    (10-50x faster than zoom over many channels)."""
    a = np.asarray(a, dtype=np.float64)
    mh, mw = interp_matrix(a.shape[0], int(hw[0])), interp_matrix(a.shape[1], int(hw[1]))
    if a.ndim == 2:
        return mh @ a @ mw.T
    return np.einsum("Hh,hwc,Ww->HWc", mh, a, mw, optimize=True)


def _upsample_batch(a, hw):
    """(n, h, w) -> (n, H, W) as :func:`upsample`."""
    mh, mw = interp_matrix(a.shape[1], int(hw[0])), interp_matrix(a.shape[2], int(hw[1]))
    return np.einsum("Hh,nhw,Ww->nHW", mh, np.asarray(a, np.float64), mw, optimize=True)


def smooth_inputs(x, n, noise, seed):
    """``n`` copies of the image batch ``x`` (1, h, w, 1) with Gaussian noise of sigma
    ``noise`` x its value range (SmoothGrad's samples; both engines use these)."""
    rng = np.random.default_rng(seed)
    sigma = noise * float(x.max() - x.min())
    return (x + rng.normal(0.0, sigma, (n,) + x.shape[1:])).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Routines (keyed by Method.routine)


def gradcam(model, x, class_index, layer):
    """Grad-CAM: channels weighted by their mean gradient, summed, ReLU."""
    acts, grads, _ = _acts_grads(model, x, class_index, layer)
    return _gradcam_from(acts, grads, x.shape[1:3])


def _gradcam_from(acts, grads, hw):
    weights = grads.mean(axis=(1, 2), keepdims=True)
    return _upsample_batch(_relu((acts * weights).sum(-1)), hw)


def gradcam_pp(model, x, class_index, layer):
    """Grad-CAM++ without tf-keras-vis's exp(score) factor (see the module docstring)."""
    acts, grads, _ = _acts_grads(model, x, class_index, layer)
    return _gradcam_pp_from(acts, grads, x.shape[1:3])


def _gradcam_pp_from(acts, grads, hw):
    acts, grads = acts.astype(np.float64), grads.astype(np.float64)
    first = grads  # exp(score) left out: a positive factor that normalisation cancels
    second = first * grads
    third = second * grads
    global_sum = acts.sum(axis=(1, 2), keepdims=True)
    denom = 2.0 * second + third * global_sum
    denom = denom + (second == 0.0)
    alphas = second / denom
    norm = alphas.sum(axis=(1, 2), keepdims=True)
    alphas = alphas / (norm + (norm == 0.0))
    weights = (_relu(first) * alphas).sum(axis=(1, 2), keepdims=True)
    return _upsample_batch(_relu((acts * weights).sum(-1)), hw)


def layercam(model, x, class_index, layer):
    """LayerCAM: activations times positive gradients, per position, summed, ReLU."""
    acts, grads, _ = _acts_grads(model, x, class_index, layer)
    return _layercam_from(acts, grads, x.shape[1:3])


def _layercam_from(acts, grads, hw):
    return _upsample_batch(_relu((acts * _relu(grads)).sum(-1)), hw)


# the gradient CAMs as formulas over one (activations, gradients) pass: the audit shares that pass
_FROM_GRADS = {"gradcam": _gradcam_from, "gradcam_pp": _gradcam_pp_from, "layercam": _layercam_from}


def cams(model, x, class_index, layer, routines) -> dict:
    """Several gradient CAMs (``routines`` among gradcam, gradcam_pp, layercam) of one batch from ONE
    forward and backward pass: {routine: raw maps (n, h, w)}, each equal to its own routine's."""
    acts, grads, _ = _acts_grads(model, x, class_index, layer)
    return {r: _FROM_GRADS[r](acts, grads, x.shape[1:3]) for r in routines}


def scorecam(model, x, class_index, layer, max_n=None):
    """Score-CAM over all channels, or the ``max_n`` of highest spatial std (one image)."""
    target, nested = graph.target(model, layer)
    acts = _cam_fn(model, target, nested, grads=False)(tf.constant(x)).numpy()[0]
    channels = acts.shape[-1]
    if max_n is not None and max_n > 0:
        if max_n > channels:
            raise ValueError(f"max_n must be 1..{channels}; got {max_n}")
        keep = np.argsort(-acts.std(axis=(0, 1)), kind="stable")[:max_n]
        acts = acts[..., keep]
    h, w = x.shape[1:3]
    fn = graph.compiled(model, "scorecam_many", _build_scorecam_many_fn)  # one image: a batch of one
    mh = tf.constant(interp_matrix(acts.shape[0], h), tf.float32)
    mw = tf.constant(interp_matrix(acts.shape[1], w), tf.float32)
    xt, ct = tf.constant(x), tf.constant(class_index, tf.int32)
    weights = np.concatenate([
        fn(xt, tf.constant(acts[None, ..., s : s + BATCH]), mh, mw, ct).numpy()[0]
        for s in range(0, acts.shape[-1], BATCH)
    ]).astype(np.float64)
    return upsample(_relu((acts * weights).sum(-1)), (h, w))[None]


def _build_scorecam_many_fn(lin):
    """fn(x (n, H, W, 1), acts (n, h, w, c), mh (H, h), mw (W, w), class_index) -> (n, c): the class
    probability of each image masked by each of its upsampled, [0, 1]-scaled channels, all n x c
    masked copies in one forward pass."""

    @tf.function(reduce_retracing=True)
    def fn(x, acts, mh, mw, class_index):
        up = tf.einsum("Hh,nhwc,Ww->ncHW", mh, acts, mw)
        lo = tf.reduce_min(up, axis=(2, 3), keepdims=True)
        hi = tf.reduce_max(up, axis=(2, 3), keepdims=True)
        masks = (up - lo) / (hi - lo + 1e-7)
        masked = x[:, None, :, :, 0] * masks
        flat = tf.reshape(masked, tf.stack([-1, tf.shape(x)[1], tf.shape(x)[2], 1]))
        probs = tf.nn.softmax(lin(flat, training=False), axis=-1)
        return tf.reshape(tf.gather(probs, class_index, axis=-1), tf.shape(up)[:2])

    return fn


def scorecam_many(model, x, class_index, layer, max_n: int):
    """Faster Score-CAM of a batch ``x`` (n, h, w, 1): per image its ``max_n`` channels of highest
    spatial std, as :func:`scorecam`; the masked copies of several images share forward passes of
    about :data:`BATCH` images (Score-CAM is most of an audit's explain time on a large network)."""
    target, nested = graph.target(model, layer)
    acts = _cam_fn(model, target, nested, grads=False)(tf.constant(x)).numpy()
    if not 0 < max_n <= acts.shape[-1]:
        raise ValueError(f"max_n must be 1..{acts.shape[-1]}; got {max_n}")
    keep = np.argsort(-acts.std(axis=(1, 2)), axis=-1, kind="stable")[:, :max_n]
    acts = np.take_along_axis(acts, keep[:, None, None, :], axis=-1)
    h, w = x.shape[1:3]
    fn = graph.compiled(model, "scorecam_many", _build_scorecam_many_fn)
    mh = tf.constant(interp_matrix(acts.shape[1], h), tf.float32)
    mw = tf.constant(interp_matrix(acts.shape[2], w), tf.float32)
    ct = tf.constant(class_index, tf.int32)
    step = max(1, BATCH // max_n)
    weights = np.concatenate([
        fn(tf.constant(x[s : s + step]), tf.constant(acts[s : s + step]), mh, mw, ct).numpy()
        for s in range(0, len(x), step)
    ]).astype(np.float64)
    return _upsample_batch(_relu((acts * weights[:, None, None, :]).sum(-1)), (h, w))


def saliency(model, x, class_index, layer=None, n=0, noise=SMOOTHGRAD_NOISE, seed=0):
    """|d logit / d x| (max over channels); with ``n`` > 0, SmoothGrad: the mean over ``n``
    noisy copies of the one image in ``x``. ``layer`` is ignored."""
    fn = graph.compiled(model, "input_grad", _build_input_grad_fn)
    if n <= 0:  # vanilla saliency, for a whole batch of images at once
        return np.abs(fn(tf.constant(x), tf.constant(class_index, tf.int32)).numpy()).max(axis=-1)
    batch = smooth_inputs(x, n, noise, seed)
    total = None
    for start in range(0, len(batch), BATCH):
        g = fn(tf.constant(batch[start : start + BATCH]), tf.constant(class_index, tf.int32)).numpy()
        g = np.abs(g).max(axis=-1).sum(axis=0)
        total = g if total is None else total + g
    return (total / len(batch))[None]
