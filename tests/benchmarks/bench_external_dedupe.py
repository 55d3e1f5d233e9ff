"""How many images external validation excludes as seen by a run, before and after the
near-duplicate check; prints one JSON object.

    python tests/benchmarks/bench_external_dedupe.py [--data ../shared/cxr] [--run assets/model] [--n 20]

Two data sets, each through ``core.evaluate.unseen_images`` of today and of commit
``BEFORE`` (the rules before the near-duplicate check: listed paths, patient ids compared as
whole strings, byte-identical files; on the run's own data root only the sources it trained
on), both reading today's ``core.datasets`` table (with hannover):

1. ``--data`` itself (for the shipped run, whose split predates hannover, hannover is the
   natural external set);
2. a temporary folder of copies of ``--n`` training films of the run, in several variants: resized
   to 70% and JPEG re-encoded at quality 75 (the usual way a public film reappears), resized to
   35% at quality 50, and cropped by 5% on every side then resized to 70% (a variant the
   thumbnail correlation is not built for).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from core import config, datasets, evaluate, runs  # noqa: E402

BEFORE = "d0fbe2d"  # main before the hannover / near-duplicate work
VARIANTS = {
    "resize70_q75": dict(scale=0.70, quality=75, crop=0.0),
    "resize35_q50": dict(scale=0.35, quality=50, crop=0.0),
    "crop5_resize70_q75": dict(scale=0.70, quality=75, crop=0.05),
}


def old_evaluate():
    """core/evaluate.py as of commit BEFORE, loaded as a module (it imports today's core)."""
    src = subprocess.run(["git", "show", f"{BEFORE}:core/evaluate.py"], cwd=config.REPO_ROOT,
                         capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("evaluate_before", loader=None)
    mod = importlib.util.module_from_spec(spec)
    exec(compile(src, f"{BEFORE}:core/evaluate.py", "exec"), mod.__dict__)
    return mod


def copy_film(src: Path, dst: Path, scale: float, quality: int, crop: float) -> None:
    with Image.open(src) as im:
        im = im.convert("L")
        w, h = im.size
        dx, dy = round(w * crop), round(h * crop)
        im = im.crop((dx, dy, w - dx, h - dy))
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
        dst.parent.mkdir(parents=True, exist_ok=True)
        im.save(dst, "JPEG", quality=quality)


def measure(mod, run: Path, cfg: dict, root: Path) -> dict:
    t0 = time.perf_counter()
    # unseen_images(run, cfg, root) before core.unseen, unseen_images(run, root) since: measure either checkout
    old = "cfg" in inspect.signature(mod.unseen_images).parameters
    table, excluded = mod.unseen_images(run, cfg, root) if old else mod.unseen_images(run, root)
    out = {"unseen": int(len(table)), "unseen_by_source": {str(k): int(v) for k, v in
                                                          table["source"].value_counts().sort_index().items()},
           "excluded": excluded, "excluded_total": int(sum(excluded.values())),
           "seconds": round(time.perf_counter() - t0, 2)}
    near = table.attrs.get("near_duplicates")
    if near is not None:
        out["near_scores_min"] = min((p["score"] for p in near), default=None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="data root (default: $CXR_DATA_DIR or data/)")
    ap.add_argument("--run", help="run folder (default: assets/model)")
    ap.add_argument("--n", type=int, default=20, help="training films copied per variant (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="which training films (default 0)")
    args = ap.parse_args()
    root = config.data_dir(args.data)
    run = runs.resolve_run(args.run)
    cfg = runs.read_config(run)
    before, after = old_evaluate(), evaluate
    out = {"run": str(run), "data": str(root), "before_commit": BEFORE, "load_average": os.getloadavg()}

    table = datasets.load_table(root)
    out["data_set"] = {"n_images": len(table), "before": measure(before, run, cfg, root),
                       "after": measure(after, run, cfg, root)}

    split = runs.read_split(run)
    train = split[(split["split"] == "train") & split["path"].map(lambda p: (root / p).is_file())]
    pick = train.iloc[np.random.default_rng(args.seed).permutation(len(train))[: args.n]]
    out["copies"] = {"n_films": len(pick), "films_by_source": pick["source"].value_counts().sort_index().to_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in VARIANTS.items():
            folder = Path(tmp) / name
            for i, (rel, label) in enumerate(zip(pick["path"], pick["label"], strict=True)):
                copy_film(root / rel, folder / "copies" / label / f"copy{i:03d}.jpg", **kw)
            out["copies"][name] = {"before": measure(before, run, cfg, folder),
                                   "after": measure(after, run, cfg, folder)}
    print(json.dumps(evaluate.jsonable(out), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
