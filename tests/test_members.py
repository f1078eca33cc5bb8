"""Every registered member builds, runs forward and backward at 64 x 64 (timm-style)."""

from __future__ import annotations

import pytest
import torch

from mibi_node.inference.members import (
    PATENT_ARCHS,
    Member,
    create_member,
    is_member,
    list_members,
)

LIGHT = {"resnet18", "resnet50", "efficientnet_b0", "densenet169", "efficientnet_b4"}
HEAVY = {"vgg19", "resnet152", "densenet264d", "efficientnet_b7"}


def _params(arch: str) -> list[object]:
    return [pytest.param(arch, marks=pytest.mark.slow) if arch in HEAVY else arch]


@pytest.mark.parametrize("arch", [p for arch in PATENT_ARCHS for p in _params(arch)])
def test_patent_member_forward_backward(arch: str) -> None:
    torch.manual_seed(0)
    member = create_member(arch, num_classes=5, in_chans=2, heads=4, embed_dim=64, input_size=64)
    batch = 1 if arch in HEAVY else 2
    x = torch.randn(batch, 2, 64, 64)
    logits = member(x)
    assert logits.shape == (batch, 5)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in member.head.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    first = next(p for p in member.backbone.parameters() if p.ndim == 4)
    assert first.shape[1] == 2 and first.grad is not None and first.grad.abs().sum() > 0

    member.eval()
    with torch.inference_mode():
        plain = member(x)
        with_attention, maps = member.forward_with_attention(x)
    torch.testing.assert_close(with_attention, plain, rtol=1e-4, atol=1e-5)
    assert maps.shape == (batch, 2, 2)  # 64 px / reduction 32
    assert (maps >= 0).all() and (maps.sum(dim=(1, 2)) <= 1 + 1e-5).all()


def test_registry_lists_the_patent_nine_and_extras() -> None:
    assert list_members(patent_only=True) == list(PATENT_ARCHS)
    assert set(PATENT_ARCHS) < set(list_members())
    assert is_member("densenet121") and not is_member("resnet9000")


def test_vgg_drops_its_fc_mlp() -> None:
    member = create_member("vgg19", input_size=64)
    names = [name for name, _ in member.named_parameters()]
    assert not any("pre_logits" in name for name in names)
    assert sum(p.numel() for p in member.parameters()) < 25_000_000


def test_head_width_and_config() -> None:
    member = create_member("resnet18", heads=8, embed_dim=512, input_size=96)
    assert isinstance(member, Member)
    assert member.head.qkv is not None and member.head.qkv.out_features == 3 * 512
    assert member.head.num_heads == 8
    assert member.config.as_dict() == {
        "arch": "resnet18",
        "num_classes": 5,
        "in_chans": 2,
        "heads": 8,
        "embed_dim": 512,
        "input_size": 96,
    }


def test_other_input_sizes_resample_the_positional_embedding() -> None:
    member = create_member("resnet10t", input_size=64, heads=2, embed_dim=32).eval()
    with torch.inference_mode():
        logits, maps = member.forward_with_attention(torch.randn(1, 2, 128, 128))
    assert logits.shape == (1, 5) and maps.shape == (1, 4, 4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"arch": "resnet9000"}, ValueError, '"arch"'),
        ({"arch": 18}, TypeError, '"arch"'),
        ({"arch": "resnet18", "heads": 3}, ValueError, '"heads"'),
        ({"arch": "resnet18", "num_classes": 1}, ValueError, '"num_classes"'),
        ({"arch": "resnet18", "in_chans": 0}, ValueError, '"in_chans"'),
        ({"arch": "resnet18", "input_size": 64.0}, TypeError, '"input_size"'),
        ({"arch": "resnet18", "drop_rate": 1.5}, ValueError, '"drop_rate"'),
    ],
)
def test_create_member_validates(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        create_member(**kwargs)  # type: ignore[arg-type]


def test_demo_resnets_are_registered_d_and_t_variants() -> None:
    # Deep 3x3 stems and average-pooled shortcuts: what lets the demo's ResNets see a focus of a
    # few pixels (docs/training.md); plain ResNet-18 subsamples its shortcuts with stride-2 1x1s.
    for arch in ("resnet10t", "resnet18d"):
        assert is_member(arch)
        member = create_member(arch, input_size=64, heads=2, embed_dim=16)
        stem = member.backbone.conv1
        assert isinstance(stem, torch.nn.Sequential) and stem[0].kernel_size == (3, 3)
        downsample = member.backbone.layer2[0].downsample
        assert isinstance(downsample[0], torch.nn.AvgPool2d)


def test_fresh_residual_members_start_as_their_shortcut_path() -> None:
    # timm zero-initialises the last norm of every ResNet residual branch; members.py does the
    # same for EfficientNets, so a member trained from scratch starts as its shortcut path.
    torch.manual_seed(0)
    effnet = create_member("efficientnet_b0", input_size=64, heads=2, embed_dim=16)
    with_skip, without_skip = [], []
    for block in effnet.backbone.modules():
        last = getattr(block, "bn3", getattr(block, "bn2", None))
        if hasattr(block, "has_skip") and last is not None:
            (with_skip if block.has_skip else without_skip).append(last.weight)
    assert len(with_skip) == 9 and without_skip
    assert all(torch.count_nonzero(weight) == 0 for weight in with_skip)
    assert all(torch.count_nonzero(weight) == weight.numel() for weight in without_skip)
    resnet = create_member("resnet18d", input_size=64, heads=2, embed_dim=16)
    blocks = [m for m in resnet.backbone.modules() if type(m).__name__ == "BasicBlock"]
    assert blocks and all(torch.count_nonzero(block.bn2.weight) == 0 for block in blocks)
