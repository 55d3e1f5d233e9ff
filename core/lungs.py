"""Lung fields of a frontal chest X-ray, from a small U-Net the project trains itself.

The net is trained on the lung masks that ship with the ieee8023 collection
(``ieee8023/annotations/lungVAE-masks/<image stem>_mask.png``, predicted by the lungVAE model of
Selvan et al., 2020), held out by patient, and shipped at ``assets/lungs/lungs.keras`` with its
training record ``assets/lungs/training.json``. Nothing is downloaded.

Use :func:`mask` for one raw grey image of any size (values in [0, 255], as from
``core.images.load``) and :func:`masks` for a batch of same-sized images. The model takes raw
pixels; the per-image normalisation is a layer inside it, so it loads with
``keras.saving.load_model(path, safe_mode=True)``.

CLI::

    python -m core.lungs train [--data DIR] [--epochs 60] [--size 128] [--out assets/lungs]
    python -m core.lungs dice  [--data DIR]          # held-out Dice of the shipped model
    python -m core.lungs sheet [--data DIR] --out runs/lung_sheet.png
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import re
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage

from core import config, runs
from core import images as imgs

LUNGS_DIR = config.ASSETS_DIR / "lungs"
MODEL_PATH = LUNGS_DIR / "lungs.keras"
RECORD_PATH = LUNGS_DIR / "training.json"
MASK_DIR = Path("ieee8023") / "annotations" / "lungVAE-masks"
IMAGE_DIR = Path("ieee8023") / "images"
DEFAULT_NET_SIZE = 128
DEPTH = 4  # number of 2x poolings: input sides must be divisible by 2**DEPTH
HOLDOUT = 0.2
# The net finds the lung box (core.inputs) at its training side. Held-out Dice of the shipped 128-px
# net: 0.953 at 128 and at 112, 0.949 at 96, 0.922 at 80, 0.46 at 64. 112 keeps the Dice but moves
# crop boxes by up to 8 % of the film (mean 1 %) on its 177 films, and the classifier, trained on
# boxes found at 128, moves with them (films decoded at 256 px: 23 of 1163 decisions flipped with the
# net at 112, 8 at 128; max |dP| 0.35 against 0.23), so it is not run smaller.
_MASK_RE = re.compile(r"_mask(\.png)+$", re.IGNORECASE)


# --------------------------------------------------------------------------- the network
def build_unet(base: int = 8, depth: int = DEPTH, max_filters: int = 64, name: str = "lungs_unet"):
    """A small U-Net: raw grey pixels (None, None, 1) in [0, 255] -> lung probability, same size.

    Built-in layers only. Per-image standardisation (``GroupNormalization`` with one group over a
    single channel) sits inside, so contrast and brightness of the source do not matter. Input
    sides must be divisible by ``2**depth`` (16 by default).
    """
    # lazy: keras costs ~4.8 s; masks, Dice and `python -m core.lungs --help` need none of it
    import keras
    from keras import layers

    def block(x, filters, tag):
        for k in (1, 2):
            x = layers.Conv2D(min(filters, max_filters), 3, padding="same", use_bias=False, name=f"{tag}_conv{k}")(x)
            x = layers.BatchNormalization(name=f"{tag}_bn{k}")(x)
            x = layers.Activation("relu", name=f"{tag}_relu{k}")(x)
        return x

    inp = keras.Input((None, None, 1), name="image")
    x = layers.GroupNormalization(groups=1, name="standardise")(inp)
    skips = []
    for level in range(depth):
        x = block(x, base * 2**level, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = block(x, base * 2**depth, "bottom")
    for level in reversed(range(depth)):
        x = layers.UpSampling2D(2, name=f"up{level}")(x)
        x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = block(x, base * 2**level, f"dec{level}")
    out = layers.Conv2D(1, 1, activation="sigmoid", name="lung_prob")(x)
    return keras.Model(inp, out, name=name)


def _record(path: Path | None = None) -> dict:
    path = Path(path) if path else RECORD_PATH
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@functools.lru_cache(maxsize=4)
def lung_model(path: str | os.PathLike | None = None):
    """The shipped lung U-Net (cached). Raises FileNotFoundError with a hint if it is missing."""
    import keras  # lazy: see build_unet

    path = Path(path) if path else MODEL_PATH
    if not path.exists():
        raise FileNotFoundError(f"lung model not found at {path}: train it with `python -m core.lungs train`")
    expected = _record(path.with_name("training.json")).get("model_sha256")
    if expected:
        if runs.sha256(path) != expected:
            raise ValueError(f"lung model {path}: sha256 does not match its training.json (altered or corrupt file)")
    return keras.saving.load_model(path, safe_mode=True, compile=False)


def model_sha256(path: str | os.PathLike | None = None) -> str:
    """The sha256 of the lung model (from its training record; hashed from the file if absent)."""
    path = Path(path) if path else MODEL_PATH
    recorded = _record(path.with_name("training.json")).get("model_sha256")
    if recorded:
        return str(recorded)
    return runs.sha256(path)


def net_size(path: str | os.PathLike | None = None) -> int:
    """The square size the lung net was trained at (from its training record; 128 by default)."""
    rec_path = Path(path).with_name("training.json") if path else RECORD_PATH
    size = int(_record(rec_path).get("size", DEFAULT_NET_SIZE))
    return size - size % 2**DEPTH or DEFAULT_NET_SIZE


# --------------------------------------------------------------------------- masks
def probabilities(images: np.ndarray, model=None, size: int | None = None) -> np.ndarray:
    """Lung probability maps (n, size, size) for raw grey images (n, H, W) or (H, W)."""
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    model = model if model is not None else lung_model()
    size = size or net_size()
    small = np.stack([_resize(a, size, size) for a in arr])[..., None]
    from core.model import inference  # lazy: core.model imports keras (~4.8 s)

    fn = inference(model)
    out = []
    for i in range(0, len(small), 32):
        out.append(np.asarray(fn(small[i : i + 32]))[..., 0])
    return np.concatenate(out).astype(np.float32)


def clean(binary: np.ndarray, keep: int = 2, min_share: float = 0.05) -> np.ndarray:
    """Keep the ``keep`` largest connected parts (each at least ``min_share`` of the largest), fill holes."""
    binary = np.asarray(binary, dtype=bool)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    if n <= 1:
        return binary
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(areas)[::-1][:keep]
    kept = [i + 1 for i in order if areas[i] >= min_share * areas[order[0]]]
    out = np.isin(labels, kept)
    return ndimage.binary_fill_holes(out)


def _to_mask(prob: np.ndarray, shape: tuple[int, int], threshold: float) -> np.ndarray:
    # Resize the probability (not the binary mask) so that edges stay smooth at large sizes.
    h, w = shape
    big = _resize(prob, h, w)
    return clean(big >= threshold)


def mask(image: np.ndarray, model=None, threshold: float = 0.5) -> np.ndarray:
    """Lung mask, bool (H, W), of one raw grey image (H, W) of any size with values in [0, 255].

    The image is resized to the net's size, segmented, thresholded at ``threshold``; the two
    largest parts are kept, holes filled, and the mask resized back to (H, W).
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = image[..., :3].mean(axis=-1) if image.shape[-1] in (3, 4) else image[..., 0]
    if image.ndim != 2:
        raise ValueError(f"mask() takes one grey image (H, W); got shape {image.shape}")
    prob = probabilities(image, model=model)[0]
    return _to_mask(prob, image.shape, threshold)


def masks(images: np.ndarray, model=None, threshold: float = 0.5) -> np.ndarray:
    """Lung masks, bool (n, H, W), of a batch of same-sized raw grey images (n, H, W) (batched net call)."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 2:
        images = images[None]
    probs = probabilities(images, model=model)
    return np.stack([_to_mask(p, images.shape[1:3], threshold) for p in probs])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(a, b).sum() / s)


def _resize(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    if arr.shape == (h, w):
        return arr
    interp = cv2.INTER_AREA if h * w < arr.shape[0] * arr.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(arr, (w, h), interpolation=interp)


# --------------------------------------------------------------------------- data
def mask_pairs(root: str | os.PathLike) -> list[dict]:
    """Pairs of ieee8023 image and lungVAE mask under ``root``: dicts(image, mask, stem, patient_id).

    Masks are named ``<image stem>_mask.png`` (a few ``_mask.png.png``); masks whose image is not in
    ``images/`` (dropped upstream filters) are skipped. Patient ids come from metadata.csv.
    """
    root = Path(root)
    mask_dir, image_dir = root / MASK_DIR, root / IMAGE_DIR
    if not mask_dir.is_dir():
        raise FileNotFoundError(f"no lung masks at {mask_dir}")
    images = {}
    for p in sorted(image_dir.iterdir()):
        images.setdefault(p.stem, p)
    patients = {}
    meta = root / "ieee8023" / "metadata.csv"
    if meta.exists():
        df = pd.read_csv(meta, dtype=str)
        for fn, pid in zip(df["filename"], df["patientid"], strict=False):
            patients.setdefault(Path(str(fn)).stem, f"ieee8023:{pid}")
    pairs, seen = [], set()
    for m in sorted(mask_dir.glob("*.png")):
        stem = _MASK_RE.sub("", m.name)
        if stem == m.name or stem not in images or stem in seen:
            continue
        seen.add(stem)
        pairs.append(
            {"image": images[stem], "mask": m, "stem": stem, "patient_id": patients.get(stem, f"stem:{stem}")}
        )
    return pairs


def split_pairs(pairs: list[dict], holdout: float = HOLDOUT, seed: int = config.SEED):
    """Split pairs by patient: (train, held_out); about ``holdout`` of the patients are held out."""
    pids = sorted({p["patient_id"] for p in pairs})
    rng = np.random.default_rng(seed)
    rng.shuffle(pids)
    n_out = max(1, round(holdout * len(pids)))
    out = set(pids[:n_out])
    return [p for p in pairs if p["patient_id"] not in out], [p for p in pairs if p["patient_id"] in out]


def read_pair(pair: dict, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 [0,255], mask bool) of a pair; both at ``size`` or at the image's native size."""
    img = imgs.decode(pair["image"])
    m = cv2.imread(str(pair["mask"]), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise ValueError(f"cannot read mask {pair['mask']}")
    h, w = (size, size) if size else img.shape
    img = _resize(img, h, w)
    m = _resize(m.astype(np.float32), h, w) >= 127.5
    return img, m


def _augment(img: np.ndarray, m: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random affine (rotate, scale, shift), flip, crop-like zoom, gamma/contrast and noise."""
    size = img.shape[0]
    angle = rng.uniform(-12, 12)
    scale = rng.uniform(0.8, 1.15)
    tx, ty = rng.uniform(-0.08, 0.08, size=2) * size
    mat = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    mat[:, 2] += (tx, ty)
    border = float(rng.choice([0.0, img.mean(), 255.0 * rng.uniform()]))
    img = cv2.warpAffine(img, mat, (size, size), flags=cv2.INTER_LINEAR, borderValue=border)
    m = cv2.warpAffine(m.astype(np.uint8), mat, (size, size), flags=cv2.INTER_NEAREST, borderValue=0) > 0
    if rng.random() < 0.5:
        img, m = img[:, ::-1], m[:, ::-1]
    x = np.clip(img / 255.0, 0, 1)
    x = x ** rng.uniform(0.6, 1.6)
    x = (x - 0.5) * rng.uniform(0.7, 1.3) + 0.5 + rng.uniform(-0.1, 0.1)
    if rng.random() < 0.3:
        x = cv2.GaussianBlur(x.astype(np.float32), (0, 0), rng.uniform(0.5, 1.5))
    x = x + rng.normal(0, rng.uniform(0, 0.03), x.shape)
    return (np.clip(x, 0, 1) * 255).astype(np.float32), m.copy()


# --------------------------------------------------------------------------- training
def _dice_loss(y_true, y_pred):
    import keras.ops as K  # lazy: see build_unet

    inter = K.sum(y_true * y_pred, axis=(1, 2, 3))
    s = K.sum(y_true, axis=(1, 2, 3)) + K.sum(y_pred, axis=(1, 2, 3))
    return 1.0 - (2.0 * inter + 1.0) / (s + 1.0)


def _loss(y_true, y_pred):
    import keras  # lazy: see build_unet

    return keras.losses.binary_crossentropy(y_true, y_pred, axis=(1, 2, 3)) + _dice_loss(y_true, y_pred)


def held_out_dice(pairs: list[dict], model=None, size: int | None = None) -> list[float]:
    """Dice of :func:`mask` against each pair's mask, at the image's native size."""
    scores = []
    for p in pairs:
        img, truth = read_pair(p)
        scores.append(dice(mask(img, model=model) if size is None else _mask_at(img, model, size), truth))
    return scores


def _mask_at(img, model, size):
    prob = probabilities(img, model=model, size=size)[0]
    return _to_mask(prob, img.shape, 0.5)


def train(
    data: str | os.PathLike | None = None,
    epochs: int = 60,
    size: int = DEFAULT_NET_SIZE,
    base: int = 8,
    batch_size: int = 16,
    lr: float = 3e-3,
    out: str | os.PathLike | None = None,
    seed: int = config.SEED,
    progress: bool = True,
) -> dict:
    """Train the lung U-Net on the ieee8023 lungVAE masks and write ``lungs.keras`` + ``training.json``.

    About 20 % of the patients are held out and only used for the Dice figure in the record.
    Returns the training record.
    """
    import keras  # lazy: keras costs ~4.8 s; masks, Dice and the CLI's --help need none of it

    if size % 2**DEPTH:
        raise ValueError(f"--size must be divisible by {2**DEPTH}; got {size}")
    root = config.data_dir(data)
    out = Path(out) if out else LUNGS_DIR
    keras.utils.set_random_seed(seed)
    pairs = mask_pairs(root)
    tr, ho = split_pairs(pairs, seed=seed)
    print(f"lung masks: {len(pairs)} pairs, train {len(tr)}, held out {len(ho)} "
          f"({len({p['patient_id'] for p in ho})} patients)", file=sys.stderr)
    model, history, train_s = _fit(
        [read_pair(p, size) for p in tr], np.random.default_rng(seed), base, epochs, batch_size, lr, progress
    )
    # Save an uncompiled copy: the custom loss must not be needed to load the model safely.
    final = build_unet(base=base)
    final.set_weights(model.get_weights())
    scores = held_out_dice(ho, model=final, size=size)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".lungs.tmp.keras"
    final.save(tmp)
    os.replace(tmp, out / "lungs.keras")
    record = _training_record(
        out, pairs, tr, ho, scores, history,
        dict(seed=seed, size=size, base_filters=base, params=int(model.count_params()), epochs=epochs,
             batch_size=batch_size, lr=lr, train_seconds=round(train_s, 1)),
    )
    tmp = out / ".training.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out / "training.json")
    lung_model.cache_clear()
    return record


def _fit(data_tr: list, rng: np.random.Generator, base: int, epochs: int, batch_size: int, lr: float,
         progress: bool) -> tuple:
    """A compiled U-Net fitted on freshly augmented copies of ``data_tr`` each epoch:
    (model, loss per epoch, seconds the epochs took)."""
    import keras  # lazy: see train

    model = build_unet(base=base)
    steps = max(1, len(data_tr) // batch_size)
    sched = keras.optimizers.schedules.CosineDecay(lr, decay_steps=epochs * steps, alpha=0.05)
    model.compile(optimizer=keras.optimizers.Adam(sched), loss=_loss)
    t0 = time.time()
    history = []
    for epoch in range(epochs):
        aug = [_augment(i, m, rng) for i, m in data_tr]
        x = np.stack([a[0] for a in aug])[..., None]
        y = np.stack([a[1] for a in aug])[..., None].astype(np.float32)
        h = model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=True, verbose=0)
        loss = float(h.history["loss"][-1])
        history.append(loss)
        if progress:
            print(f"epoch {epoch + 1}/{epochs} loss {loss:.4f} ({time.time() - t0:.0f} s)", file=sys.stderr)
    return model, history, time.time() - t0


def _training_record(out: Path, pairs: list, tr: list, ho: list, scores: list[float], history: list[float],
                     settings: dict) -> dict:
    """``training.json``: data, split, ``settings`` (seed, size, ... in this order), loss and held-out Dice."""
    s = settings
    return {
        "command": "python -m core.lungs " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("lungs.py") else
        f"core.lungs.train(epochs={s['epochs']}, size={s['size']}, base={s['base_filters']})",
        "data": "ieee8023/annotations/lungVAE-masks (lungVAE predictions, Selvan et al. 2020) paired "
                "with ieee8023/images/<stem>.*",
        "n_pairs": len(pairs),
        "n_train": len(tr),
        "n_held_out": len(ho),
        "held_out_patients": len({p["patient_id"] for p in ho}),
        "split": f"by patient_id, {HOLDOUT:.0%} of patients held out, seed {s['seed']}",
        **{k: s[k] for k in ("seed", "size", "base_filters", "params", "epochs", "batch_size", "lr")},
        "augment": "rotate +-12 deg, scale 0.8-1.15, shift 8%, h-flip, gamma/contrast/brightness, blur, noise",
        "loss": "binary cross-entropy + soft Dice",
        "final_train_loss": history[-1] if history else None,
        "train_seconds": s["train_seconds"],
        "held_out_dice_mean": float(np.mean(scores)) if scores else None,
        "held_out_dice_median": float(np.median(scores)) if scores else None,
        "held_out_dice_min": float(np.min(scores)) if scores else None,
        "held_out_dice_note": "mask() (net + two largest parts + hole filling) vs lungVAE mask, "
                              "at each image's native size",
        "model_bytes": (out / "lungs.keras").stat().st_size,
        "model_sha256": runs.sha256(out / "lungs.keras"),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- contact sheet
def _sheet_files(root: Path, n: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    files = []
    for folder in ("kermany/NORMAL", "kermany/PNEUMONIA", "nih/No_findings", "nih/Pneumonia"):
        d = root / folder
        if not d.is_dir():
            continue
        cand = sorted(p for p in d.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
        k = min(len(cand), n)
        files += [cand[i] for i in rng.choice(len(cand), size=k, replace=False)]
    return files


def contact_sheet(data=None, out="runs/lung_sheet.png", n_per_folder: int = 6, tile: int = 192,
                  seed: int = config.SEED) -> Path:
    """Masks drawn over Kermany and NIH images, as one PNG to check by eye.

    It shows real X-rays, so write it outside the repository's tracked files (``runs/`` is ignored).
    """
    root = config.data_dir(data)
    files = _sheet_files(root, n_per_folder, seed)
    if not files:
        raise FileNotFoundError(f"no Kermany or NIH images under {root}")
    tiles = []
    for f in files:
        img = imgs.load(f, size=tile)
        m = mask(img)
        rgb = np.repeat(img[..., None], 3, axis=-1).astype(np.uint8)
        green = rgb.copy()
        green[m] = (0.6 * green[m] + 0.4 * np.array([0, 255, 0])).astype(np.uint8)
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(green, contours, -1, (255, 0, 0), 1)
        cv2.putText(green, f.parent.parent.name[:3] + "/" + f.parent.name[:4], (3, 12),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 0), 1)
        tiles.append(green)
    cols = n_per_folder
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i : i + cols], axis=1) for i in range(0, len(tiles), cols)]
    sheet = np.concatenate(rows, axis=0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name("." + out.name + ".tmp.png")
    cv2.imwrite(str(tmp), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.lungs",
        description="Train, check and look at the lung-field U-Net (assets/lungs/lungs.keras).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="train on ieee8023 lungVAE masks (20%% of patients held out)")
    p.add_argument("--data", help="data root (default: $CXR_DATA_DIR or data/)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--size", type=int, default=DEFAULT_NET_SIZE, choices=[96, 128, 160, 192, 256])
    p.add_argument("--base", type=int, default=8, help="filters of the first level (doubles per level)")
    p.add_argument("--out", default=str(LUNGS_DIR), help="folder for lungs.keras and training.json")
    p.add_argument("--json", action="store_true", help="print the training record as JSON")
    d = sub.add_parser("dice", help="held-out Dice of a lung model")
    d.add_argument("--data")
    d.add_argument("--model", default=str(MODEL_PATH))
    d.add_argument("--json", action="store_true")
    s = sub.add_parser("sheet", help="contact sheet of masks over Kermany and NIH images (real images: keep it under runs/)")
    s.add_argument("--data")
    s.add_argument("--out", default="runs/lung_sheet.png")
    s.add_argument("-n", type=int, default=6, help="images per folder")
    args = parser.parse_args(argv)

    if args.cmd == "train":
        rec = train(args.data, epochs=args.epochs, size=args.size, base=args.base, out=args.out)
        if args.json:
            print(json.dumps(rec))
        else:
            print(f"held-out Dice mean {rec['held_out_dice_mean']:.3f} median {rec['held_out_dice_median']:.3f}"
                  f" -> {Path(args.out) / 'lungs.keras'}")
    elif args.cmd == "dice":
        model = lung_model(args.model)
        root = config.data_dir(args.data)
        seed = int(_record(Path(args.model).with_name("training.json")).get("seed", config.SEED))
        _, ho = split_pairs(mask_pairs(root), seed=seed)
        t0 = time.time()
        scores = held_out_dice(ho, model=model, size=net_size(args.model))
        res = {"n": len(scores), "dice_mean": float(np.mean(scores)), "dice_median": float(np.median(scores)),
               "dice_min": float(np.min(scores)), "seconds": round(time.time() - t0, 2)}
        print(json.dumps(res) if args.json else "  ".join(f"{k} {v}" for k, v in res.items()))
    else:
        path = contact_sheet(args.data, args.out, n_per_folder=args.n)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
