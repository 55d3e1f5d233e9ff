"""One film, analysed once: ``analyse(run, film) -> Case``, its heatmaps on demand by ``heatmap``.

The Explain page, the case report and the images behind an audit card see a film the same way:
decoded (:mod:`core.images`), checked (:mod:`core.checks`, with the lungs' box when there is a
lung mask), prepared for the run's network (:func:`core.inputs.prepare`, the run's lung crop),
its lung mask on a small copy (:mod:`core.lungs`, at :data:`core.severity.LUNG_SIDE`, the copy the
severity's lung statistics use too), the class probabilities and the penultimate features
(:mod:`core.model`). A map of one (method, class, layer) is computed the first time it is asked
for and kept in :attr:`Case.maps`, with its faithfulness (:func:`core.trust.faithfulness`).
Nothing here caches across films or sessions: the dashboard does (``dashboard.state.case``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core import checks, explain, images, inputs, lungs, markers, operating, runs, trust
from core import model as cmodel
from core import neighbours as cneighbours
from core import uncertainty as cunc
from core.severity import LUNG_SIDE

SHOWN_MAX = 1024  # longer side (px) of the film kept for display (and sent to the browser)

MapKey = tuple[str, int, "str | None"]  # (method, class index, layer)


@dataclass
class Case:
    """One analysed film (see the module's docstring); ``maps`` grows as :func:`heatmap` is called."""

    name: str
    film_shape: tuple[int, int]  # the decoded film's (H, W) at its own resolution
    x: np.ndarray  # the network's input (size, size): prepared with the run's lung crop
    box: tuple[float, float, float, float]  # the region of the film the network sees (fractions)
    fell_back: bool  # a lung crop was asked for but no lungs were found: the whole film was used
    shown: np.ndarray  # uint8 film for display, longer side <= SHOWN_MAX
    small: np.ndarray  # float film, longer side <= core.severity.LUNG_SIDE
    lungs: np.ndarray | None  # lung mask of ``small`` (None without the lung model)
    warnings: list[str]  # core.checks.image_warnings
    probs: np.ndarray  # class probabilities (n_classes,)
    features: np.ndarray | None  # penultimate features (1, d); None when unreachable (a black box)
    positive_index: int  # the column of P(positive) in ``probs``
    maps: dict = field(default_factory=dict)  # MapKey -> {"hmap", "heat", "faith"}
    spread: cunc.Spread | None = None  # range of P(positive) over test-time copies x members (core.uncertainty)
    marker_grid: np.ndarray | None = None  # burned-in text/markers on the network's grid, found once (marker_mask_on_grid)

    @property
    def p_positive(self) -> float:
        """P(positive class), i.e. P(COVID-19) for our runs."""
        return float(self.probs[self.positive_index])


def _film_bytes(film, name: str | None) -> tuple[bytes, str]:
    if isinstance(film, (bytes, bytearray, memoryview)):
        return bytes(film), name or "film"
    data, _ = images.read_bytes(film, name=name or Path(film).name)
    return data, name or Path(film).name


def analyse(run, film, *, name: str | None = None, colour_check: bool = True, model=None) -> Case:
    """Decode, check, prepare, lung mask, probabilities and features of one film (bytes or path).

    ``colour_check`` runs core.checks' colour check on the file's bytes (uploads); ``model``: the
    run's model when the caller holds it (the dashboard's shared copy), else ``run.model()``.
    Raises :class:`core.images.ImageError` for a file that cannot be used.
    """
    run = runs.open_run(run)
    m = run.model() if model is None else model
    data, name = _film_bytes(film, name)
    decoded = images.load(data, name=name)  # native size: shown, checked, and the lung mask's source
    size = cmodel.input_size(m)
    # the network's copy is read at the needed size exactly as core.predict reads it (core.inputs.load), so
    # the page and the CLIs give one P(covid) per film
    net_film = images.at_need(data, decoded, inputs.needed_side(size, run.lung_crop), name)
    x, boxes, fell_back = inputs.prepare([net_film], size, run.lung_crop)
    small = explain.display_film(decoded, LUNG_SIDE)
    try:
        mask = lungs.mask(small)
    except (FileNotFoundError, OSError, ValueError):
        mask = None
    # the frontal-view checks read the lungs' bounding box when there is a mask (tilted films pass)
    warnings = checks.image_warnings(decoded, data if colour_check else None, lungs=mask)
    return Case(name=name, film_shape=tuple(decoded.shape[:2]), x=x[0], box=tuple(float(v) for v in boxes[0]),
                fell_back=bool(fell_back[0]),
                shown=(np.clip(explain.display_film(decoded, SHOWN_MAX), 0, 255) + 0.5).astype(np.uint8),
                small=small, lungs=mask, warnings=warnings, probs=cmodel.probabilities(m, x)[0],
                features=_features(run, m, x), positive_index=run.positive_index,
                spread=cunc.film_spread(m, x[0], run.positive_index))


def _features(run: runs.Run, m, x: np.ndarray) -> np.ndarray | None:
    """Penultimate features (core.model.features, at an adopted run's ``penultimate`` layer); None for a
    model whose layers cannot be reached (a SavedModel signature): the OOD row then says so."""
    try:
        return cmodel.features(m, x, layer=(run.adopted or {}).get("penultimate"))
    except ValueError:
        return None


def heatmap(run, case: Case, method: str, class_index: int | None = None, layer: str | None = None, *,
            model=None, engine: str = explain.DEFAULT_ENGINE) -> dict:
    """The map of ``method`` for ``class_index`` (default: the positive class) at ``layer``: computed
    once and kept in ``case.maps``. ``{"hmap"`` (the network's grid), ``"heat"`` (uint8 levels on
    ``case.shown``, core.explain.quantize), ``"faith"`` (core.trust.faithfulness)``}``.
    ``engine`` (core.explain.ENGINES): a map of another engine than the default is kept under
    ``(method, class index, layer, engine)``, so the two engines' maps never mix."""
    ci = case.positive_index if class_index is None else int(class_index)
    key = (method, ci, layer) if engine == explain.DEFAULT_ENGINE else (method, ci, layer, engine)
    if key not in case.maps:
        m = runs.open_run(run).model() if model is None else model
        hmap = explain.explain(m, case.x, method, class_index=ci, layer=layer, engine=engine)
        heat = explain.quantize(inputs.to_film(hmap, case.box, case.shown.shape))
        case.maps[key] = {"hmap": hmap, "heat": heat, "faith": trust.faithfulness(m, case.x, hmap, ci)}
    return case.maps[key]


def lung_mask_on_grid(case: Case) -> np.ndarray | None:
    """The lung mask where the network looks (its input grid, bool), for the trust panel; None without one."""
    if case.lungs is None:
        return None
    return inputs.from_film(case.lungs, case.box, case.x.shape[0]) >= 0.5


def trust_rows(run, case: Case, method: str, class_index: int | None = None, layer: str | None = None, *,
               audit_summary: dict | None = None, reference: dict | None = None, model=None) -> list[dict]:
    """The trust panel (core.trust.panel) of one map of the case; rows carry a ``key`` (core.trust.row)."""
    run = runs.open_run(run)
    ci = case.positive_index if class_index is None else int(class_index)
    got = heatmap(run, case, method, ci, layer, model=model)
    return trust.panel(got["hmap"], lung_mask_on_grid(case), got["faith"], method=method,
                       audit_summary=audit_summary, model_sha256=run.config.get("model_sha256"),
                       warnings=case.warnings, reference=reference, features=case.features,
                       class_name=run.classes[ci]) + [trust.marker_row(got["hmap"], marker_mask_on_grid(case))]


def decide(run, case: Case, point=None):
    """The call on the case at an operating point (:func:`core.operating.decide`; default: the run's
    own); None when a plausibility check withheld the answer or the run has no operating point."""
    if checks.verdict(case.warnings).withheld:
        return None
    try:
        point = point if point is not None else operating.choose(run)
    except operating.SiteError:
        return None
    return operating.decide(case.p_positive, point)


def marker_mask_on_grid(case: Case) -> np.ndarray:
    """Burned-in text and markers (core.markers.detect on the shown film) where the network looks, bool;
    found once per case (every map's trust panel reads the same mask)."""
    if case.marker_grid is None:
        case.marker_grid = markers.on_grid(markers.detect(case.shown)[0], case.box, case.x.shape[0])
    return case.marker_grid


def neighbours(run, case: Case, k: int = cneighbours.K, *, call: str | None = None, exclude=()):
    """The ``k`` development films nearest to the case in the model's feature space
    (:func:`core.neighbours.nearest`: path, label, source, distance; ``attrs["sentence"]``); None for
    a model whose features cannot be reached. RunError when the run has no neighbour index."""
    if case.features is None:
        return None
    return cneighbours.nearest(run, case.features, k, call=call, exclude=exclude)
