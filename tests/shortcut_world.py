"""A synthetic chest-film world with a known answer, and two tiny models trained on it.

Each 32 x 32 film has a body, two dark lung fields (the same place on every film, so their mask
is known) and noise. A *disease* is a bright blob inside one lung; a *source marker* is a bright
square in the top-left corner that every film of source ``A`` carries and no film of ``B`` does.

- :func:`marker_model` is trained where COVID-19 == source A (blobs at random, unrelated to the
  label): the marker is the only signal, so it learns the source.
- :func:`lung_model` is trained where COVID-19 == blob, markers at random; like the project's
  default preset it blanks a border band of its input (where the marker sits), so it can only
  learn the lungs.

Evaluation films (:func:`films`) hold both labels in both sources, so the two are told apart by
checks that know nothing about how they were trained.
"""

from __future__ import annotations

import numpy as np

SIZE = 32


def lung_mask(size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] / size
    m = np.zeros((size, size), bool)
    for cx in (0.32, 0.68):
        m |= ((xx - cx) / 0.13) ** 2 + ((yy - 0.55) / 0.26) ** 2 < 1
    return m


def films(n: int, disease, marker, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """``n`` films (n, size, size) in [0, 255]; ``disease``/``marker`` are bool arrays (n,)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    lungs = lung_mask(size)
    x = np.full((n, size, size), 40.0, np.float32)
    body = (np.abs(xx - 0.5) < 0.42) & (yy > 0.12)
    x[:, body] = 150.0
    x[:, lungs] = 70.0
    x += rng.normal(0, 6, x.shape).astype(np.float32)
    ly, lx = np.nonzero(lungs)
    for i in np.flatnonzero(disease):
        k = rng.integers(len(ly))
        x[i][(np.arange(size)[:, None] - ly[k]) ** 2 + (np.arange(size)[None] - lx[k]) ** 2 <= 4] = 210.0
    x[np.asarray(marker, bool), 1:5, 1:5] = 250.0
    return np.clip(x, 0, 255)


def _net(border: int = 0):
    import keras
    from keras import layers

    inp = keras.Input((SIZE, SIZE, 1), name="image")
    x = layers.Rescaling(1 / 255.0, name="rescale")(inp)
    if border:
        x = layers.Cropping2D(border, name="border_crop")(x)
        x = layers.ZeroPadding2D(border, name="border_pad")(x)
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="last_conv")(x)
    x = layers.GlobalMaxPooling2D(name="gap")(x)
    x = layers.Dense(2, name="logits")(x)
    out = layers.Activation("softmax", name="probs")(x)
    return keras.Model(inp, out)


def _fit(model, x, covid, seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(x[..., None], (~np.asarray(covid, bool)).astype(int), epochs=12, batch_size=32, verbose=0)
    return model


def marker_model(seed: int = 0):
    """Trained where COVID-19 == the source marker (class 0 = COVID-19)."""
    import keras

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed + 100)
    covid = np.arange(192) % 2 == 0
    x = films(192, rng.random(192) < 0.5, covid, seed + 1)
    return _fit(_net(), x, covid, seed)


def lung_model(seed: int = 0):
    """Trained where COVID-19 == a blob in the lungs, markers at random, border band blanked."""
    import keras

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed + 200)
    covid = np.arange(192) % 2 == 0
    x = films(192, covid, rng.random(192) < 0.5, seed + 2)
    return _fit(_net(border=6), x, covid, seed)


def evaluation(n: int = 80, seed: int = 7):
    """(films, covid, source) with both labels in both sources, balanced: covid == blob."""
    i = np.arange(n)
    covid = i % 2 == 0
    source_a = (i // 2) % 2 == 0
    x = films(n, covid, source_a, seed)
    return x, covid, np.where(source_a, "A", "B")
