"""Test-time augmentation: a declared list of views applied to a batch in one operation.

A view is a string that travels in the model bundle, ``"+"``-joined primitives:
``identity``, ``hflip``, ``rotate:<degrees>`` (counter-clockwise on screen), ``scale:<factor>``
(> 1 zooms in) and ``shift:<rows>,<cols>`` (fractions of the image side). Every view is one
affine transform, so all views of all studies go through a single ``grid_sample`` call.
Probabilities are averaged over views; attention maps can be warped back to the original
frame with :func:`invert_maps` before they are averaged, which is what localisation does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_VIEWS",
    "TTAView",
    "apply_views",
    "average_views",
    "invert_maps",
    "parse_views",
]

logger = logging.getLogger(__name__)

#: Eight views: identity, mirror, two small rotations, two scales and two shifted crops.
DEFAULT_VIEWS: tuple[str, ...] = (
    "identity",
    "hflip",
    "rotate:-10",
    "rotate:10",
    "scale:0.9",
    "scale:1.1",
    "shift:0.05,0.05",
    "shift:-0.05,-0.05",
)


@dataclass(frozen=True)
class TTAView:
    """One test-time view, parsed from its bundle string.

    Attributes
    ----------
    spec
        The string it was parsed from, written back unchanged into bundles.
    hflip
        Mirror left-right before the other operations.
    angle
        Rotation in degrees, counter-clockwise on screen.
    scale
        Zoom factor; 1.1 enlarges the anatomy by 10 %.
    shift
        Translation (rows, columns) as fractions of the image side.
    """

    spec: str
    hflip: bool = False
    angle: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def parse(cls, spec: str) -> TTAView:
        """Parse one view string; raises ValueError naming the offending part."""
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"TTA view should be a non-empty string, got {spec!r}")
        hflip, angle, scale, shift = False, 0.0, 1.0, (0.0, 0.0)
        for part in spec.split("+"):
            name, _, arg = part.strip().partition(":")
            try:
                if name == "identity" and not arg:
                    continue
                if name == "hflip" and not arg:
                    hflip = not hflip
                elif name == "rotate":
                    angle += float(arg)
                elif name == "scale":
                    scale *= float(arg)
                    if not 0.25 <= scale <= 4:
                        raise ValueError
                elif name == "shift":
                    dy, dx = (float(v) for v in arg.split(","))
                    shift = (shift[0] + dy, shift[1] + dx)
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"TTA view {spec!r}: cannot read {part!r} (expected identity, hflip, "
                    "rotate:<deg>, scale:<0.25..4> or shift:<rows>,<cols>)"
                ) from None
        return cls(spec=spec, hflip=hflip, angle=angle, scale=scale, shift=shift)

    def matrix(self) -> list[list[float]]:
        """The 3x3 forward transform in ``grid_sample`` coordinates (x = column, y = row).

        A point at normalised position p of the original appears at ``matrix @ p`` in the view.
        """
        a = math.radians(self.angle)
        cos, sin = math.cos(a), math.sin(a)
        f = -1.0 if self.hflip else 1.0
        s = self.scale
        # shift (rows, cols) as fractions of the side; normalised coordinates span 2 units
        tx, ty = 2.0 * self.shift[1], 2.0 * self.shift[0]
        # T @ R @ S @ F, with R rotating counter-clockwise on screen (y axis points down)
        return [
            [s * cos * f, s * sin, tx],
            [-s * sin * f, s * cos, ty],
            [0.0, 0.0, 1.0],
        ]


def parse_views(specs: Sequence[str]) -> tuple[TTAView, ...]:
    """Parse a bundle's list of view strings; at least one view, no duplicates."""
    if isinstance(specs, str) or not isinstance(specs, Sequence):
        raise TypeError(f'Argument "specs" should be a sequence of strings, not {type(specs)}.')
    if not specs:
        raise ValueError('Argument "specs" should name at least one view.')
    if len(set(specs)) != len(specs):
        raise ValueError(f'Argument "specs" names a view twice: {list(specs)}.')
    return tuple(TTAView.parse(spec) for spec in specs)


def _theta(views: Sequence[TTAView], inverse: bool, like: torch.Tensor) -> torch.Tensor:
    import torch

    forward = torch.tensor([v.matrix() for v in views], dtype=torch.float64)
    # grid_sample looks up, for each output position, where to read in its input
    sample = forward if inverse else torch.linalg.inv(forward)
    return sample[:, :2, :].to(device=like.device, dtype=torch.float32)


def _warp(images: torch.Tensor, views: Sequence[TTAView], inverse: bool) -> torch.Tensor:
    """Warp (B, V, C, H, W) images view by view; returns the same shape."""
    import torch.nn.functional as F  # noqa: N812

    batch, n_views, channels, rows, cols = images.shape
    theta = _theta(views, inverse, images).repeat(batch, 1, 1)
    flat = images.reshape(batch * n_views, channels, rows, cols)
    grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
    out = F.grid_sample(
        flat.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out.to(images.dtype).reshape(batch, n_views, channels, rows, cols)


def apply_views(batch: torch.Tensor, views: Sequence[TTAView]) -> torch.Tensor:
    """Return every view of every image: (B, C, H, W) -> (B * V, C, H, W), study-major.

    Pixels that a view brings in from outside the image are zero; the normalised background
    of a scintigram is close to zero, so this is the least surprising fill.
    """
    if batch.ndim != 4:
        raise ValueError(f'Argument "batch" should be (B, C, H, W), got {tuple(batch.shape)}.')
    if not views:
        raise ValueError('Argument "views" should hold at least one view.')
    expanded = batch[:, None].expand(-1, len(views), -1, -1, -1)
    out = _warp(expanded, views, inverse=False)
    return out.reshape(-1, *batch.shape[1:])


def invert_maps(maps: torch.Tensor, views: Sequence[TTAView]) -> torch.Tensor:
    """Warp per-view maps (B * V, H, W) back into the original frame: (B, V, H, W)."""
    if maps.ndim != 3 or maps.shape[0] % len(views):
        raise ValueError(f'Argument "maps" should be (B * V, H, W), got {tuple(maps.shape)}.')
    batch = maps.shape[0] // len(views)
    stacked = maps.reshape(batch, len(views), 1, *maps.shape[1:])
    return _warp(stacked, views, inverse=True)[:, :, 0]


def average_views(values: torch.Tensor, n_views: int) -> torch.Tensor:
    """Average study-major per-view rows (B * V, ...) to (B, ...)."""
    if values.shape[0] % n_views:
        raise ValueError(f"{values.shape[0]} rows cannot be split into {n_views} views")
    return values.reshape(values.shape[0] // n_views, n_views, *values.shape[1:]).mean(dim=1)
