"""Test-time views: parsing, exact geometry of simple views, inversion for localisation."""

from __future__ import annotations

import pytest
import torch

from mibi_node.imaging.tta import (
    DEFAULT_VIEWS,
    TTAView,
    apply_views,
    average_views,
    invert_maps,
    parse_views,
)


def test_parse_round_trip() -> None:
    views = parse_views(DEFAULT_VIEWS)
    assert [v.spec for v in views] == list(DEFAULT_VIEWS)
    combo = TTAView.parse("hflip+rotate:5+scale:1.1+shift:0.1,-0.2")
    assert (combo.hflip, combo.angle, combo.scale, combo.shift) == (True, 5.0, 1.1, (0.1, -0.2))


@pytest.mark.parametrize("spec", ["", "flip", "rotate:x", "scale:9", "shift:0.1", "identity:1"])
def test_bad_views(spec: str) -> None:
    with pytest.raises(ValueError, match="TTA view"):
        TTAView.parse(spec)


def test_parse_views_rejects_duplicates_and_empty() -> None:
    with pytest.raises(ValueError, match="twice"):
        parse_views(["identity", "identity"])
    with pytest.raises(ValueError, match="at least one"):
        parse_views([])
    with pytest.raises(TypeError):
        parse_views("identity")


def test_simple_views_are_exact() -> None:
    batch = torch.rand(3, 2, 16, 16)
    views = parse_views(["identity", "hflip", "rotate:90"])
    out = apply_views(batch, views).reshape(3, 3, 2, 16, 16)
    torch.testing.assert_close(out[:, 0], batch, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 1], batch.flip(-1), atol=1e-5, rtol=0)
    # counter-clockwise on screen, like torch.rot90 over (rows, columns)
    torch.testing.assert_close(out[:, 2], batch.rot90(1, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_scale_and_shift_move_a_point_as_declared() -> None:
    image = torch.zeros(1, 1, 41, 41)
    image[0, 0, 10, 30] = 1.0  # 10 px above and 10 px right of the centre
    views = parse_views(["scale:2", "shift:0.1,0"])
    out = apply_views(image, views)
    zoom = out[0, 0]
    peak = divmod(int(zoom.argmax()), 41)
    assert abs(peak[0] - 0) <= 1 and abs(peak[1] - 40) <= 1  # twice as far from the centre
    shifted = out[1, 0]
    assert divmod(int(shifted.argmax()), 41) == (14, 30)  # 0.1 of 41 px further down


def test_invert_maps_returns_to_the_original_frame() -> None:
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((rows - 12) ** 2 + (cols - 20) ** 2) / 8.0)[None, None]
    views = parse_views(["identity", "hflip", "rotate:10", "scale:1.1", "shift:-0.05,0.05"])
    viewed = apply_views(blob, views)[:, 0]
    back = invert_maps(viewed, views)
    assert back.shape == (1, 5, 32, 32)
    for v in range(5):
        assert divmod(int(back[0, v].argmax()), 32) == (12, 20)
        torch.testing.assert_close(back[0, v], blob[0, 0], atol=0.12, rtol=0)


def test_average_views() -> None:
    values = torch.arange(12.0).reshape(6, 2)
    torch.testing.assert_close(average_views(values, 3), torch.tensor([[2.0, 3.0], [8.0, 9.0]]))
    with pytest.raises(ValueError):
        average_views(values, 4)
    with pytest.raises(ValueError, match='"batch"'):
        apply_views(torch.zeros(2, 8, 8), parse_views(["identity"]))
