"""The audit's mean maps: per class and per source, the mean X-ray, lung mask and heatmap of each method.

:func:`mean_maps` sums them over the audited images, :func:`save_maps` writes the means as
``audit_maps/*.npy`` in the run, and :func:`mean_maps_png` draws them as one sheet
(``audit_maps.png``). A "mean" over fewer than :data:`MIN_MEAN_N` images is never drawn or
written as an X-ray: it would be close to a copy of one film.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from core import explain, runs

MIN_MEAN_N = 10  # never draw a "mean" image over fewer images than this (it would be a copy)


def mean_maps(test: pd.DataFrame, x, lung, maps: dict) -> tuple[dict, dict]:
    """Step 4b of the audit: sums and counts of images, lung masks and heatmaps per class and per source."""
    sums, counts = {}, {}

    def add(key, arr):
        sums[key] = sums.get(key, 0) + arr.astype(np.float64)
        counts[key] = counts.get(key, 0) + 1

    for i, (c, s) in enumerate(zip(test["class"], test["source"], strict=True)):
        for g in (f"class-{c}", f"source-{s}"):
            add(f"image__{g}", x[i])
            add(f"lungs__{g}", lung[i])
            for method, heat in maps.items():
                add(f"heat__{method}__{g}", heat[i])
    return sums, counts


def save_maps(folder: Path, sums: dict, counts: dict) -> list[str]:
    """Write the mean maps (``sums / counts``) as ``folder/<key>.npy``; drop stale ones; return the names written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for key, arr in sums.items():
        n = counts[key]
        # A "mean" X-ray over a handful of images is close to a copy of one: not written.
        if n == 0 or (key.startswith("image__") and n < MIN_MEAN_N):
            continue
        path = folder / f"{key}.npy"
        tmp = folder / f".{key}.tmp.npy"
        np.save(tmp, (arr / n).astype(np.float32))
        os.replace(tmp, path)
        written.append(path.name)
    for old in folder.glob("*.npy"):  # maps of methods or groups this audit no longer has
        if old.name not in written:
            old.unlink()
    return written


def mean_maps_png(run, out=None, min_n: int = MIN_MEAN_N, tile: int = 224) -> Path | None:
    """One PNG of MEAN heatmaps over MEAN X-rays (per method; per class and per source), from ``audit_maps/``.

    Groups of fewer than ``min_n`` images are left out: a mean over a handful of images is close
    to a copy of one. The mean lung mask is drawn as a contour.
    """
    handle = runs.open_run(run)
    folder = handle.file("audit_maps")
    info = handle.audit()
    if info is None:
        raise runs.RunError(f"{handle.label} has not been audited (no audit.json).")
    counts = info.get("map_counts", {})
    tiles, labels = [], []
    for method in info["methods"]:
        row = []
        for key in sorted(k for k in counts if k.startswith(f"heat__{method}__")):
            group = key.split("__", 2)[2]
            if counts[key] < min_n:
                continue
            heat = np.load(folder / f"{key}.npy")
            if not (folder / f"image__{group}.npy").exists():
                continue
            img = np.load(folder / f"image__{group}.npy")
            lung = np.load(folder / f"lungs__{group}.npy")
            if img.shape[0] < tile:  # draw at a readable size
                img, heat, lung = (cv2.resize(a.astype(np.float32), (tile, tile)) for a in (img, heat, lung))
            rgb = explain.overlay(img, heat / max(float(heat.max()), 1e-8), alpha=0.45)
            rgb = np.ascontiguousarray(rgb)
            cnt, _ = cv2.findContours((lung >= 0.5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(rgb, cnt, -1, (255, 255, 255), 1)
            for k, text in enumerate((method, f"{group} n={counts[key]}")):
                cv2.putText(rgb, text, (4, 14 + 14 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                            cv2.LINE_AA)
            row.append(rgb)
        if row:
            tiles.append(np.concatenate(row, axis=1))
            labels.append(method)
    if not tiles:
        return None
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tiles]
    sheet = np.concatenate(tiles, axis=0)
    out = Path(out) if out else handle.file("audit_maps.png")
    tmp = out.with_name("." + out.name + ".tmp.png")
    cv2.imwrite(str(tmp), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    tmp.replace(out)
    return out
