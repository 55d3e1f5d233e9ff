"""Lung segmentation: the U-Net builds and runs on any size; the shipped net matches held-out masks."""

from __future__ import annotations

import json
import shutil

import keras
import numpy as np
import pytest

from core import lungs


def _ellipses(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic 'chest': two dark ellipses (lungs) on a bright body, plus noise."""
    yy, xx = np.mgrid[:size, :size] / size
    cy, ry, rx = rng.uniform(0.45, 0.55), rng.uniform(0.25, 0.32), rng.uniform(0.12, 0.16)
    m = np.zeros((size, size), bool)
    for cx in (0.3, 0.7):
        m |= ((yy - cy) / ry) ** 2 + ((xx - cx + rng.uniform(-0.03, 0.03)) / rx) ** 2 <= 1
    img = np.where(m, 60.0, 180.0) + rng.normal(0, 10, m.shape)
    return np.clip(img, 0, 255).astype(np.float32), m


def test_unet_builds_trains_and_runs_on_any_size():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    net = lungs.build_unet(base=4)
    assert net.input_shape == (None, None, None, 1)
    assert net.get_layer("lung_prob").output.shape[-1] == 1
    data = [_ellipses(32, rng) for _ in range(16)]
    x = np.stack([d[0] for d in data])[..., None]
    y = np.stack([d[1] for d in data])[..., None].astype(np.float32)
    net.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    net.fit(x, y, epochs=1, batch_size=16, verbose=0)  # one step: trainable, not trained
    for h, w in [(32, 32), (48, 80), (160, 128)]:
        out = net(np.zeros((1, h, w, 1), np.float32), training=False)
        assert tuple(out.shape) == (1, h, w, 1)
        assert 0.0 <= float(np.min(out)) and float(np.max(out)) <= 1.0
    # mask() handles any image size (not a multiple of 16) and returns a bool mask of that size.
    img, _ = _ellipses(50, rng)
    m = lungs.mask(np.pad(img, ((0, 7), (0, 0)), mode="edge"), model=net)
    assert m.shape == (57, 50) and m.dtype == bool


def test_clean_keeps_two_largest_parts_and_fills_holes():
    m = np.zeros((40, 40), bool)
    m[5:30, 3:15] = True  # left lung
    m[5:30, 22:36] = True  # right lung
    m[10:14, 6:10] = False  # a hole
    m[35:37, 35:37] = True  # a speck
    out = lungs.clean(m)
    assert out[12, 8] and not out[36, 36]
    assert out.sum() == (25 * 12) + (25 * 14)


def test_dice():
    a = np.zeros((10, 10), bool)
    a[:5] = True
    assert lungs.dice(a, a) == 1.0
    assert lungs.dice(a, ~a) == 0.0
    assert lungs.dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_mask_pairs_match_stems_and_split_by_patient(cxr_root):
    pairs = lungs.mask_pairs(cxr_root)
    assert len(pairs) > 150
    for p in pairs[:20]:
        assert p["mask"].name.startswith(p["stem"]) and p["image"].stem == p["stem"]
    train, held = lungs.split_pairs(pairs)
    assert not {p["patient_id"] for p in train} & {p["patient_id"] for p in held}
    assert 0.1 < len(held) / len(pairs) < 0.35


@pytest.fixture(scope="module")
def shipped(shipped_lungs):
    return lungs.lung_model()


def test_shipped_model_loads_safely_and_is_small(shipped):
    keras.saving.load_model(lungs.MODEL_PATH, safe_mode=True)
    assert lungs.MODEL_PATH.stat().st_size < 4 * 2**20
    assert lungs.RECORD_PATH.exists()


def test_shipped_model_dice_on_held_out_masks(shipped, cxr_root):
    _, held = lungs.split_pairs(lungs.mask_pairs(cxr_root), seed=int(lungs._record().get("seed", 1337)))
    scores = lungs.held_out_dice(held[:8], model=shipped)
    assert np.median(scores) >= 0.8, scores


def test_masks_batch_matches_single(shipped):
    rng = np.random.default_rng(1)
    imgs = np.stack([_ellipses(96, rng)[0] for _ in range(3)])
    batch = lungs.masks(imgs)
    assert batch.shape == (3, 96, 96) and batch.dtype == bool
    # One film alone or in a batch of three may go through different convolution kernels (oneDNN
    # picks them by batch size and CPU), so a pixel whose probability sits on the threshold may flip.
    assert (batch[1] != lungs.mask(imgs[1])).mean() <= 1e-3


def test_shipped_lung_model_is_checked_against_its_sha256(tmp_path, shipped_lungs):
    """A lung model whose bytes differ from its training record's sha256 is refused."""
    shutil.copy(lungs.MODEL_PATH, tmp_path / "lungs.keras")
    record = json.loads(lungs.RECORD_PATH.read_text())
    assert record["model_sha256"]
    (tmp_path / "training.json").write_text(json.dumps(record))
    assert lungs.lung_model(tmp_path / "lungs.keras") is not None  # intact copy loads
    with open(tmp_path / "lungs.keras", "ab") as fh:
        fh.write(b"tampered")
    lungs.lung_model.cache_clear()  # the check runs when the file is loaded
    with pytest.raises(ValueError, match="sha256"):
        lungs.lung_model(tmp_path / "lungs.keras")
