"""``python -m core.explain``: explain one chest X-ray from the command line.

    python -m core.explain IMAGE --method gradcam [--class covid] [--layer NAME] [--run R]
        --out overlay.png [--alpha 0.4] [--colormap jet] [--json]

Prints the class probabilities and writes the heatmap overlay, drawn on the original film, as a PNG.
A film that fails a plausibility check (:func:`core.checks.verdict`, the Explain page's rule) gets
no decision: the warnings and the reason are printed (``withheld``, ``reason`` in ``--json``), and
the probabilities only as the model's raw output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from core import case as case_lib
from core import checks, config, images, inputs, report, runs
from core.explain.draw import colormaps, overlay
from core.explain.graph import EngineError, default_layer
from core.explain.methods import DEFAULT_ENGINE, ENGINES, METHODS
from core.explain.registry import TITLES, get


class _Fail(Exception):
    """A user error: printed as one ``error:`` line, exit status 2."""


def _write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path}")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)


def _class_index(arg: str | None, classes: tuple[str, ...]) -> int:
    if arg is None:
        return config.COVID_INDEX
    if arg in classes:
        return classes.index(arg)
    if arg.isdigit() and int(arg) < len(classes):
        return int(arg)
    raise ValueError(f"unknown class {arg!r}; choose one of {list(classes)}")


def parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m core.explain",
        description="Explain one chest X-ray: print the class probabilities and write a heatmap overlay PNG.",
    )
    p.add_argument("image", help="image file (PNG, JPEG or DICOM)")
    p.add_argument("--method", default="gradcam", choices=sorted(METHODS), help="explanation method (default gradcam)")
    p.add_argument("--class", dest="cls", default=None,
                   help="class to explain, by name (covid, other, ...) or index (default covid)")
    p.add_argument("--layer", default=None, help="conv layer to explain (default: last_conv, else the end of the last convolution block, "
                   "at any nesting depth); a layer inside a nested model also by its path, e.g. adopted/conv5")
    p.add_argument("--run", default=None, help="run folder or name (default: the shipped model in assets/model)")
    p.add_argument("--out", default="overlay.png", help="output PNG (default overlay.png)")
    p.add_argument("--alpha", type=float, default=0.4, help="heatmap opacity in [0, 1] (default 0.4)")
    p.add_argument("--colormap", default="jet", help=f"OpenCV colour map: {', '.join(colormaps())}")
    p.add_argument("--engine", default=DEFAULT_ENGINE, choices=ENGINES, help="implementation (default tape)")
    p.add_argument("--data", default=None, help="data root; IMAGE is looked up there if not found as given")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def _check_args(args) -> Path:
    """The image's path (looked up under --data when not found as given); _Fail on a bad option."""
    if args.colormap.lower() not in colormaps():
        raise _Fail(f"unknown colormap {args.colormap!r}; choose one of {', '.join(colormaps())}")
    if not 0.0 <= args.alpha <= 1.0:
        raise _Fail(f"--alpha must be in [0, 1]; got {args.alpha}")
    src = Path(args.image)
    if not src.exists() and args.data:
        alt = config.data_dir(args.data) / args.image
        src = alt if alt.exists() else src
    return src


def _open_run(args) -> tuple[runs.Run, int]:
    """(the run, the class index to explain)."""
    try:
        run = runs.open_run(args.run)
        run.model()
    except (runs.RunError, OSError, ValueError) as exc:
        raise _Fail(str(exc)) from exc
    try:
        ci = _class_index(args.cls, run.classes)
    except ValueError as exc:
        raise _Fail(str(exc)) from exc
    return run, ci


def _analyse(args, src: Path, run: runs.Run, ci: int) -> tuple[case_lib.Case, dict, float]:
    """The film analysed as the Explain page analyses it (core.case), its map, and the seconds taken."""
    t0 = time.perf_counter()
    try:
        film = case_lib.analyse(run, src, name=str(src), colour_check=True)
    except images.ImageError as exc:
        raise _Fail(f"cannot read image {exc.name}: {exc.reason}") from exc
    if film.fell_back:
        print(f"warning: {inputs.FALLBACK_WARNING}", file=sys.stderr)
    for text in film.warnings:
        print(f"warning: {text}", file=sys.stderr)
    try:
        got = case_lib.heatmap(run, film, args.method, ci, args.layer, engine=args.engine)
    except (ValueError, EngineError) as exc:
        raise _Fail(str(exc)) from exc
    return film, got, time.perf_counter() - t0


def _report(args, src, run: runs.Run, ci: int, film: case_lib.Case, out: Path, seconds: float) -> dict:
    classes = run.classes
    verdict = checks.verdict(film.warnings)
    if verdict.withheld:
        decision = "withheld"
    else:
        decision = None if run.threshold is None else report.decision(film.p_positive, run.threshold)
    return {
        "image": str(src),
        "run": str(run.path),
        "method": args.method,
        "class": classes[ci] if ci < len(classes) else str(ci),
        "class_index": ci,
        # only the CAM family reads a layer (a black box has none to name)
        "layer": args.layer or (default_layer(run.model()) if get(args.method).kind == "cam" else None),
        "p_covid": film.p_positive,
        "box": list(film.box),
        "lung_crop_fell_back": film.fell_back,
        "probabilities": {c: float(v) for c, v in zip(classes, film.probs, strict=False)},
        "warnings": list(film.warnings),
        "withheld": verdict.withheld,
        "reason": verdict.reason,
        "threshold": run.threshold,
        "decision": decision,
        "out": str(out),
        "seconds": round(seconds, 3),
    }


def main(argv=None) -> int:
    """Run the CLI; 0 on success, 2 on a user error (one ``error:`` line on stderr)."""
    args = parser().parse_args(argv)
    try:
        src = _check_args(args)
        run, ci = _open_run(args)
        film, got, seconds = _analyse(args, src, run, ci)
    except _Fail as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    # drawn on the film as the Explain page shows it (its own resolution, at most core.case.SHOWN_MAX px)
    _write_png(out, overlay(film.shown, got["heat"], args.alpha, args.colormap))
    result = _report(args, src, run, ci, film, out, seconds)
    if args.json:
        print(json.dumps(result))
    else:
        probs = ", ".join(f"{c}: {v:.3f}" for c, v in result["probabilities"].items())
        if result["withheld"]:
            print(f"{checks.WITHHELD} Raw output, not meaningful for such an image: "
                  f"P(covid) = {result['p_covid']:.3f}  ({probs})")
        else:
            print(f"P(covid) = {result['p_covid']:.3f}  ({probs}); decision: {result['decision'] or 'no operating point'}")
        print(f"{TITLES[args.method]} for class {result['class']!r} at layer {result['layer']!r} -> {out}")
    return 0
