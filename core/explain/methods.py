"""The public explanation functions, one per registered method, and the dispatch to the engines.

Every method takes one raw grey image (H, W) or (H, W, 1), float in [0, 255], and returns a
float32 (H, W) map in [0, 1] at the input's size; see :mod:`core.explain`.
"""

from __future__ import annotations

import keras
import numpy as np

from core.explain import blackbox, graph, registry, tape, tkv
from core.explain.graph import SCORECAM_FAST_N, SMOOTHGRAD_NOISE, SMOOTHGRAD_SAMPLES, EngineError
from core.model import members

ENGINES = ("tape", "tf-keras-vis")
DEFAULT_ENGINE = "tape"

# the tape engine's routine for each registered method's Method.routine (output-only ones: blackbox)
_TAPE = {m.routine: getattr(blackbox if m.kind == "blackbox" else tape, m.routine) for m in registry.REGISTRY}


def _run(name, model, image, class_index, layer, engine, **kw):
    method = registry.get(name)
    nets = members(model)
    if nets and method.routine in registry.CAMS:
        # An ensemble's CAM is the mean of its members' maps, each taken at the member's own
        # layer of that name (members are averaged at their logits, so each has its own CAM).
        layer_name = layer.name if isinstance(layer, keras.layers.Layer) else layer
        maps = [_run(name, net, image, class_index, layer_name, engine, **kw) for net in nets]
        return graph.finish(np.mean(maps, axis=0), maps[0].shape)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    x, out_hw = graph.prepare(model, image)
    ci = graph.check_class(model, class_index)
    if engine == "tape":
        return graph.finish(_TAPE[method.routine](model, x, ci, layer, **kw)[0], out_hw)
    if method.kind == "blackbox":
        raise EngineError(f"tf-keras-vis has no {method.title}; use engine='tape'")
    raw = tkv.run(method, model, x, ci, layer, **kw)
    if not np.isfinite(raw).all():
        raise EngineError(f"tf-keras-vis gave a non-finite {name} map; use engine='tape'")
    return graph.finish(raw, out_hw)


def gradcam(model, image, class_index: int = 0, layer=None, engine: str = DEFAULT_ENGINE) -> np.ndarray:
    """Grad-CAM (Selvaraju et al., 2017): channels weighted by their mean logit gradient, ReLU."""
    return _run("gradcam", model, image, class_index, layer, engine)


def gradcam_pp(model, image, class_index: int = 0, layer=None, engine: str = DEFAULT_ENGINE) -> np.ndarray:
    """Grad-CAM++ (Chattopadhyay et al., 2018): pixel-wise weighted positive gradients."""
    return _run("gradcam_pp", model, image, class_index, layer, engine)


def layercam(model, image, class_index: int = 0, layer=None, engine: str = DEFAULT_ENGINE) -> np.ndarray:
    """LayerCAM (Jiang et al., 2021): activations times positive gradients, per position."""
    return _run("layercam", model, image, class_index, layer, engine)


def scorecam(model, image, class_index: int = 0, layer=None, max_n: int | None = None,
             engine: str = DEFAULT_ENGINE) -> np.ndarray:
    """Score-CAM (Wang et al., 2020): channels weighted by the class probability of the image
    masked by each upsampled channel. ``max_n`` keeps only the ``max_n`` channels of highest
    spatial standard deviation (Faster Score-CAM); None uses every channel (slow)."""
    return _run("scorecam", model, image, class_index, layer, engine, max_n=max_n)


def scorecam_fast(model, image, class_index: int = 0, layer=None, max_n: int = SCORECAM_FAST_N,
                  engine: str = DEFAULT_ENGINE) -> np.ndarray:
    """Faster Score-CAM: :func:`scorecam` on the ``max_n`` (default 10) most varied channels."""
    target, _ = graph.target(model, layer)
    max_n = min(int(max_n), int(target.output.shape[-1]))
    return _run("scorecam_fast", model, image, class_index, target.name, engine, max_n=max_n)


def saliency(model, image, class_index: int = 0, layer=None, engine: str = DEFAULT_ENGINE) -> np.ndarray:
    """Vanilla saliency (Simonyan et al., 2014): |d logit / d pixel|. ``layer`` is ignored."""
    return _run("saliency", model, image, class_index, None, engine, n=0)


def smoothgrad(model, image, class_index: int = 0, layer=None, n: int = SMOOTHGRAD_SAMPLES,
               noise: float = SMOOTHGRAD_NOISE, seed: int = 0, engine: str = DEFAULT_ENGINE) -> np.ndarray:
    """SmoothGrad (Smilkov et al., 2017): saliency averaged over ``n`` copies with Gaussian
    noise (sigma = ``noise`` x the image's value range), computed as one batch; a fixed ``seed``
    makes the map reproducible. ``layer`` is ignored."""
    if n < 1:
        raise ValueError(f"smoothgrad needs n >= 1 samples; got {n}")
    return _run("smoothgrad", model, image, class_index, None, engine, n=int(n), noise=noise, seed=seed)


def occlusion(model, image, class_index: int = 0, layer=None, patch: float = blackbox.OCCLUSION_PATCH,
              stride: float | None = None, engine: str = DEFAULT_ENGINE) -> np.ndarray:
    """Occlusion (Zeiler & Fergus, 2014): the drop of the class probability when a patch (``patch``
    x the side, default 1/8; stride half of it) is replaced by the image mean. Output-only: works
    on a black box. ``layer`` is ignored."""
    return _run("occlusion", model, image, class_index, None, engine, patch=patch, stride=stride)


def rise(model, image, class_index: int = 0, layer=None, n: int = blackbox.RISE_N, cells: int = blackbox.RISE_CELLS,
         keep: float = blackbox.RISE_KEEP, seed: int = 0, engine: str = DEFAULT_ENGINE) -> np.ndarray:
    """RISE (Petsiuk et al., 2018): ``n`` random soft masks from a ``cells`` x ``cells`` grid, weighted
    by the class probability of each masked image. Output-only: works on a black box. ``layer``
    is ignored; a fixed ``seed`` makes the map reproducible."""
    return _run("rise", model, image, class_index, None, engine, n=int(n), cells=int(cells), keep=keep, seed=seed)


# {name: function} in registry order; each function above is named as its registry entry
METHODS = {m.name: m.function for m in registry.REGISTRY}


def explain(model, image, method: str = "gradcam", class_index: int = 0, layer=None, **kw) -> np.ndarray:
    """Dispatch to ``METHODS[method]``; extra keywords (``engine``, ``max_n``, ``n``...) pass on."""
    return registry.get(method).function(model, image, class_index=class_index, layer=layer, **kw)


def explain_many(model, images, method: str = "gradcam", class_index: int = 0, layer=None,
                 batch_size: int = 16, **kw) -> np.ndarray:
    """Maps for many images: float32 (n, H, W), each as :func:`explain` would give it.

    ``images`` is (n, H, W) raw grey at one size. Batchable methods (Grad-CAM, Grad-CAM++,
    LayerCAM and saliency) run ``batch_size`` images per compiled call on the tape engine
    (several times faster than one by one, for audits), and Faster Score-CAM shares its masked
    forward passes between images; other methods and engines loop over :func:`explain`.
    """
    return explain_shared(model, images, [method], class_index, layer, batch_size, **kw)[method]


def _images(images) -> np.ndarray:
    imgs = np.asarray(images, dtype=np.float32)
    if imgs.ndim == 4 and imgs.shape[-1] == 1:
        imgs = imgs[..., 0]
    if imgs.ndim != 3:
        raise ValueError(f"expected images (n, H, W); got shape {np.shape(images)}")
    return imgs


def _scorecam_n(model, layer, kw) -> int | None:
    """The channel count of a Faster Score-CAM that :func:`tape.scorecam_many` can batch, else None."""
    if set(kw) - {"max_n"} or not kw.get("max_n", SCORECAM_FAST_N):
        return None
    target, _ = graph.target(model, layer)
    return min(int(kw.get("max_n", SCORECAM_FAST_N)), int(target.output.shape[-1]))


def explain_shared(model, images, methods, class_index: int = 0, layer=None, batch_size: int = 16,
                   **kw) -> dict[str, np.ndarray]:
    """{method: maps (n, H, W)} as :func:`explain_many` gives each, with the gradient CAMs among
    ``methods`` (Grad-CAM, Grad-CAM++, LayerCAM) computed from ONE forward and backward pass per
    batch (the audit's Grad-CAM and Grad-CAM++ share it) and Faster Score-CAM batched over images."""
    imgs = _images(images)
    engine = kw.pop("engine", DEFAULT_ENGINE)
    entries = {m: registry.get(m) for m in methods}
    ci = graph.check_class(model, class_index)
    nets = members(model)
    out: dict[str, np.ndarray] = {}
    for m, entry in entries.items():
        if entry.routine == "scorecam" and engine == "tape" and not nets and len(imgs):
            n = _scorecam_n(model, layer, {**kw, "max_n": kw.get("max_n", SCORECAM_FAST_N if m == "scorecam_fast"
                                                                  else None)})
            if n:
                out[m] = _batched(model, imgs, batch_size, lambda xs, n=n: tape.scorecam_many(model, xs, ci, layer, n))[0]
                continue
        if not entry.batchable or engine != "tape" or kw:
            out[m] = np.stack([explain(model, im, m, class_index, layer, engine=engine, **kw) for im in imgs]) \
                if len(imgs) else np.zeros((0,) + imgs.shape[1:], np.float32)
        elif nets and entry.routine in registry.CAMS:  # the mean of the members' maps, as in explain()
            maps = np.mean([explain_many(net, imgs, m, ci, layer, batch_size) for net in nets], axis=0)
            out[m] = np.stack([graph.finish(x, imgs.shape[1:]) for x in maps]) if len(maps) else maps
    shared = [m for m, e in entries.items() if m not in out and e.routine in tape._FROM_GRADS]
    if shared:
        routines = sorted({entries[m].routine for m in shared})
        maps = _batched(model, imgs, batch_size, lambda xs: list(tape.cams(model, xs, ci, layer, routines).values()),
                        len(routines))
        out.update({m: maps[routines.index(entries[m].routine)] for m in shared})
    for m, entry in entries.items():
        if m not in out:  # saliency
            out[m] = _batched(model, imgs, batch_size, lambda xs, r=entry.routine: _TAPE[r](model, xs, ci, None))[0]
    return {m: out[m] for m in methods}


def _batched(model, imgs: np.ndarray, batch_size: int, fn, k: int = 1) -> list[np.ndarray]:
    """``k`` stacks of finished maps (n, H, W) from ``fn(prepared batch) -> raw maps`` (a list of k
    when k > 1), ``batch_size`` images per call."""
    out = [np.zeros(imgs.shape, np.float32) for _ in range(k)]
    for start in range(0, len(imgs), batch_size):
        chunk = imgs[start : start + batch_size]
        raws = fn(np.concatenate([graph.prepare(model, im)[0] for im in chunk]))
        raws = raws if isinstance(raws, list) else [raws]
        for o, raw in zip(out, raws, strict=True):
            o[start : start + len(chunk)] = [graph.finish(r, imgs.shape[1:]) for r in raw]
    return out
