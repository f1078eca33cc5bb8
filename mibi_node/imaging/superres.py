"""Super-resolution data enhancement: an SRGAN generator that doubles a count image's matrix.

The patent's optional "super-resolution data enhancement" step (claims 4 and 6), and seed
001's SRGAN: a generator of residual blocks and a pixel-shuffle x2 upsampling, trained
adversarially with a pixel content loss (``training/gan.py``). The generator predicts a
correction to the bicubic upsampling of its input, so a barely trained generator is already
about as good as bicubic interpolation.

On count images (:class:`SuperResolution`) the image is divided by its robust maximum
before the generator sees it and the output is scaled back so that the total counts stay
those of the input: a super-resolved pixel holds counts on the finer grid (a quarter of a
source pixel's share), and count-based steps after it (normalisation, the Poisson
resampling of training) keep their meaning.

The generator travels in a bundle as ``superres.pt`` (:func:`save_superres`), a plain
``torch.save`` dictionary of its settings and tensors, read with ``weights_only=True``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from mibi_node.errors import BundleError

__all__ = [
    "SRGenerator",
    "SuperResolution",
    "count_reference",
    "load_superres",
    "psnr",
    "save_superres",
    "ssim",
]

logger = logging.getLogger(__name__)

SUPERRES_FORMAT = 1
#: Percentile of the counts that the generator sees as 1 (as in the model input).
REFERENCE_PERCENTILE = 99.5


class _ResidualBlock(nn.Module):
    """conv-PReLU-conv with an identity shortcut (SRGAN's block, without batch norm)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRGenerator(nn.Module):
    """SRGAN generator: residual blocks, then sub-pixel (pixel-shuffle) x2 upsampling.

    Batch norm is left out of the blocks (as EDSR does): with it, the small batches of a CPU
    training run and the single images of inference see different statistics.

    Parameters
    ----------
    channels
        Feature maps of the residual trunk.
    blocks
        Number of residual blocks.

    Notes
    -----
    Input (N, 1, H, W), output (N, 1, 2H, 2W): the bicubic upsampling of the input plus the
    learned correction.
    """

    scale = 2

    def __init__(self, channels: int = 32, blocks: int = 4) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 4:
            raise ValueError(f'Argument "channels" should be an integer >= 4, got {channels!r}.')
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f'Argument "blocks" should be a positive integer, got {blocks!r}.')
        self.channels = channels
        self.blocks = blocks
        self.head = nn.Sequential(nn.Conv2d(1, channels, 5, padding=2), nn.PReLU(channels))
        self.trunk = nn.Sequential(*[_ResidualBlock(channels) for _ in range(blocks)])
        self.fuse = nn.Conv2d(channels, channels, 3, padding=1)
        self.upsample = nn.Sequential(
            nn.Conv2d(channels, channels * self.scale**2, 3, padding=1),
            nn.PixelShuffle(self.scale),
            nn.PReLU(channels),
        )
        self.tail = nn.Conv2d(channels, 1, 5, padding=2)
        nn.init.zeros_(self.tail.weight)  # start as plain bicubic interpolation
        if self.tail.bias is not None:
            nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(x)
        features = features + self.fuse(self.trunk(features))
        correction = self.tail(self.upsample(features))
        base = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return base + correction

    def settings(self) -> dict[str, int]:
        """What :func:`load_superres` needs to rebuild it."""
        return {"channels": self.channels, "blocks": self.blocks, "scale": self.scale}


class SuperResolution:
    """A trained generator applied to 2-D count images (the MIBI analysis' optional step).

    Parameters
    ----------
    generator
        A trained :class:`SRGenerator`.
    device
        Where it runs.
    """

    def __init__(self, generator: SRGenerator, device: torch.device | str = "cpu") -> None:
        if not isinstance(generator, SRGenerator):
            raise TypeError(
                f'Argument "generator" should be an SRGenerator, not {type(generator).__name__}.'
            )
        self.device = torch.device(device)
        self.generator = generator.to(self.device).eval()

    @property
    def scale(self) -> int:
        """Upsampling factor per axis."""
        return self.generator.scale

    def upsample(self, image: np.ndarray) -> np.ndarray:
        """Double the matrix of one count image, keeping its total counts.

        Parameters
        ----------
        image
            A 2-D image of counts (e.g. a denoised anterior view).

        Returns
        -------
        numpy.ndarray
            float32, ``scale`` times the rows and columns, non-negative, with the input's sum.
        """
        array = np.asarray(image, dtype=np.float32)
        if array.ndim != 2 or array.size == 0:
            raise ValueError(
                f'Argument "image" should be a non-empty 2-D array, got {array.shape}.'
            )
        array = np.nan_to_num(array)
        reference = count_reference(array)
        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(array / reference))[None, None]
            out = self.generator(tensor.to(self.device)).clamp_min(0)[0, 0].cpu().numpy()
        total, found = float(array.sum()), float(out.sum())
        if found > 0 and total > 0:
            out = out * np.float32(total / found)
        else:
            out = out * np.float32(reference / self.scale**2)
        return out.astype(np.float32, copy=False)


def count_reference(image: np.ndarray) -> float:
    """The value a count image is divided by before the generator sees it (> 0)."""
    value = float(np.percentile(image, REFERENCE_PERCENTILE))
    if not value > 0:
        value = float(np.max(image))
    return value if value > 0 else 1.0


def save_superres(path: Path | str, generator: SRGenerator, **notes: Any) -> Path:
    """Write a generator as a ``superres.pt`` file (settings, tensors and JSON-ready notes)."""
    if not isinstance(generator, SRGenerator):
        raise TypeError(
            f'Argument "generator" should be an SRGenerator, not {type(generator).__name__}.'
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    torch.save(
        {"format": SUPERRES_FORMAT, **generator.settings(), "notes": notes, "state_dict": state},
        path,
    )
    return path


def load_superres(path: Path | str, device: torch.device | str = "cpu") -> SuperResolution:
    """Read a ``superres.pt`` file written by :func:`save_superres`.

    Raises
    ------
    BundleError
        The file is missing, not a generator file, or its tensors do not fit the settings.
    """
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BundleError(f"{path}: super-resolution generator file is missing") from None
    except Exception as exc:  # torch raises pickle and zip errors of several kinds
        raise BundleError(f"{path}: not a readable super-resolution generator ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != SUPERRES_FORMAT:
        raise BundleError(f"{path}: not a format-{SUPERRES_FORMAT} super-resolution generator")
    if data.get("scale") != SRGenerator.scale:
        raise BundleError(f"{path}: scale {data.get('scale')!r}; this mibi-node upsamples x2 only")
    try:
        generator = SRGenerator(channels=data["channels"], blocks=data["blocks"])
        generator.load_state_dict(data["state_dict"], strict=True)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{path}: generator tensors do not fit its settings ({exc})") from None
    return SuperResolution(generator, device)


# -- image quality ---------------------------------------------------------------------------


def _pair(reference: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(reference, dtype=np.float64)
    img = np.asarray(image, dtype=np.float64)
    if ref.shape != img.shape or ref.ndim != 2:
        raise ValueError(
            f'Arguments "reference" and "image" should be 2-D of one shape, got {ref.shape} '
            f"and {img.shape}."
        )
    return ref, img


def psnr(reference: np.ndarray, image: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(range^2 / MSE)``.

    ``data_range`` defaults to the reference's maximum minus its minimum.
    """
    ref, img = _pair(reference, image)
    span = float(ref.max() - ref.min()) if data_range is None else float(data_range)
    mse = float(np.mean((ref - img) ** 2))
    if mse == 0:
        return float("inf")
    return 10.0 * float(np.log10(span**2 / mse))


def ssim(reference: np.ndarray, image: np.ndarray, data_range: float | None = None) -> float:
    """Mean structural similarity (Wang et al. 2004): Gaussian window, sigma 1.5, K = 0.01, 0.03.

    ``data_range`` defaults to the reference's maximum minus its minimum.
    """
    from scipy.ndimage import gaussian_filter

    ref, img = _pair(reference, image)
    span = float(ref.max() - ref.min()) if data_range is None else float(data_range)
    c1, c2 = (0.01 * span) ** 2, (0.03 * span) ** 2

    def blur(a: np.ndarray) -> np.ndarray:
        return np.asarray(gaussian_filter(a, sigma=1.5, truncate=3.5))

    mu_r, mu_i = blur(ref), blur(img)
    var_r = blur(ref * ref) - mu_r**2
    var_i = blur(img * img) - mu_i**2
    cov = blur(ref * img) - mu_r * mu_i
    numerator = (2 * mu_r * mu_i + c1) * (2 * cov + c2)
    denominator = (mu_r**2 + mu_i**2 + c1) * (var_r + var_i + c2)
    return float(np.mean(numerator / denominator))
