"""The adaptive median filter against a plain per-pixel transcription of the patent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mibi_node.imaging.denoise import adaptive_median, adaptive_median_torch


def reference_adaptive_median(image: np.ndarray, smax: int) -> np.ndarray:
    """The patent's stages A and B, one pixel at a time, borders mirrored by ``np.pad``."""
    pad = smax // 2
    padded = np.pad(image, pad, mode="reflect")
    out = np.empty_like(image)
    rows, cols = image.shape
    for r in range(rows):
        for c in range(cols):
            zxy = image[r, c]
            size = 3
            while True:
                h = size // 2
                window = padded[r + pad - h : r + pad + h + 1, c + pad - h : c + pad + h + 1]
                zmin, zmax, zmed = window.min(), window.max(), np.median(window)
                if zmin < zmed < zmax:  # stage A passed: stage B
                    out[r, c] = zxy if zmin < zxy < zmax else zmed
                    break
                size += 2
                if size > smax:
                    out[r, c] = zmed
                    break
    return out


def noisy_image(
    rng: np.random.Generator, shape: tuple[int, int], density: float, dtype: type
) -> np.ndarray:
    """A smooth blob with salt-and-pepper impulses at the given density."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    blob = 200 * np.exp(-((rows - shape[0] / 2) ** 2 + (cols - shape[1] / 3) ** 2) / 40.0)
    image = blob + rng.poisson(5, size=shape)
    impulses = rng.random(shape) < density
    image[impulses] = rng.choice([0.0, 1000.0], size=int(impulses.sum()))
    return image.astype(dtype)


CASES = [
    ((17, 23), 0.0, 7, np.float32),
    ((16, 16), 0.1, 3, np.float64),
    ((20, 15), 0.2, 5, np.uint16),
    ((9, 12), 0.3, 11, np.int16),
    ((32, 31), 0.3, 9, np.float32),
    ((4, 5), 0.3, 11, np.float32),  # windows larger than the image: repeated reflection
    ((1, 6), 0.2, 5, np.int32),
]


@pytest.mark.parametrize(("shape", "density", "smax", "dtype"), CASES)
def test_vectorised_and_torch_match_reference(
    shape: tuple[int, int], density: float, smax: int, dtype: type
) -> None:
    rng = np.random.default_rng(hash((shape, density, smax)) % 2**32)
    image = noisy_image(rng, shape, density, dtype)
    expected = reference_adaptive_median(image, smax)

    result = adaptive_median(image, smax=smax)
    assert result.dtype == image.dtype
    np.testing.assert_array_equal(result, expected)

    batch = torch.from_numpy(np.stack([image, image[::-1].copy()]).astype(np.float64))
    if np.dtype(dtype).kind != "f":
        batch = batch.to(torch.int64)
    out = adaptive_median_torch(batch, smax=smax)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    np.testing.assert_array_equal(out[0].numpy().astype(dtype), expected)
    np.testing.assert_array_equal(
        out[1].numpy().astype(dtype), reference_adaptive_median(image[::-1].copy(), smax)
    )


def test_constant_image_is_unchanged() -> None:
    image = np.full((12, 13), 7, dtype=np.uint8)
    np.testing.assert_array_equal(adaptive_median(image), image)
    np.testing.assert_array_equal(adaptive_median_torch(torch.from_numpy(image)).numpy(), image)


def test_impulses_are_removed_and_detail_kept() -> None:
    rng = np.random.default_rng(1)
    clean = noisy_image(rng, (64, 64), 0.0, np.float32)
    noisy = clean.copy()
    impulses = rng.random(clean.shape) < 0.15
    noisy[impulses] = 1000.0
    filtered = adaptive_median(noisy)
    assert np.abs(filtered - clean).mean() < 0.1 * np.abs(noisy - clean).mean()
    # non-impulse pixels are mostly passed through untouched (stage B keeps zxy)
    assert (filtered[~impulses] == clean[~impulses]).mean() > 0.8


def test_float16_torch_round_trip() -> None:
    image = torch.rand(2, 10, 11, dtype=torch.float32)
    expected = adaptive_median_torch(image.half().float(), smax=5)
    result = adaptive_median_torch(image.half(), smax=5)
    assert result.dtype == torch.float16
    torch.testing.assert_close(result.float(), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"smax": 4}, ValueError, '"smax"'),
        ({"smax": 1}, ValueError, '"smax"'),
        ({"smax": 5.0}, TypeError, '"smax"'),
        ({"smax": True}, TypeError, '"smax"'),
    ],
)
def test_bad_smax(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        adaptive_median(np.zeros((4, 4)), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        adaptive_median_torch(torch.zeros(4, 4), **kwargs)  # type: ignore[arg-type]


def test_bad_images() -> None:
    with pytest.raises(TypeError, match='"image"'):
        adaptive_median([[1, 2], [3, 4]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='"image"'):
        adaptive_median(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match='"image"'):
        adaptive_median(np.array([[np.nan, 1.0]]))
    with pytest.raises(TypeError, match='"image"'):
        adaptive_median(np.zeros((3, 3), dtype=bool))
    with pytest.raises(ValueError, match='"images"'):
        adaptive_median_torch(torch.zeros(5))
    with pytest.raises(TypeError, match='"images"'):
        adaptive_median_torch(np.zeros((3, 3)))  # type: ignore[arg-type]
