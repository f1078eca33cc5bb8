"""Random-weight model bundles for tests that run the node (no trained weights needed).

What the SR says does not matter in those tests, only that a real ensemble runs: the tiny
recipe is two members at 32 pixels, fast on two busy cores; the slow one takes about a
second a study on two cores, long enough for a test to kill the worker in the middle.
"""

from __future__ import annotations

from pathlib import Path

from mibi_node.inference.bundle import init_random_bundle

__all__ = [
    "SLOW_RECIPE",
    "TINY_RECIPE",
    "random_bundle",
    "random_spine_bundle",
    "random_thyroid_bundle",
]

TINY_RECIPE = """
name = "pipeline-test"
version = "0.0.1"
intended_use = "demonstration"
[input]
channels = ["early", "delayed"]
size = 32
[tta]
views = ["identity", "hflip"]
[[members]]
arch = "resnet10t"
heads = 2
embed_dim = 32
[[members]]
name = "lite"
arch = "efficientnet_lite0"
heads = 2
embed_dim = 32
"""

SLOW_RECIPE = """
name = "pipeline-slow"
version = "0.0.1"
intended_use = "demonstration"
[input]
channels = ["early", "delayed"]
size = 192
[tta]
views = ["identity", "hflip", "scale:0.9", "scale:1.1", "scale:0.95", "scale:1.05", "scale:0.85",
         "scale:1.15"]
[[members]]
arch = "resnet50"
heads = 2
embed_dim = 64
"""


def random_bundle(folder: Path, recipe: str = TINY_RECIPE) -> Path:
    """A bundle made from ``recipe`` with random weights (seed 1) in ``folder/bundle``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.toml").write_text(recipe)
    init_random_bundle(folder / "recipe.toml", folder / "bundle", seed=1)
    return folder / "bundle"


def random_thyroid_bundle(folder: Path) -> Path:
    """A two-member thyroid bundle with random weights (seed 0) in ``folder/thyroid``."""
    import torch

    import mibi_node.analyses.thyroid.model  # noqa: F401 - registers the cross-feature ResNet
    from mibi_node.analyses.thyroid.bundle import write_thyroid_bundle
    from mibi_node.analyses.thyroid.result import FINDINGS
    from mibi_node.inference.members import create_member

    torch.manual_seed(0)
    members = {
        name: create_member(arch, num_classes=6, in_chans=1, heads=2, embed_dim=16, input_size=32)
        for name, arch in (("cross", "crossfeature_resnet_s"), ("plain", "resnet10t"))
    }
    manifest = {
        "name": "thyroid-random",
        "version": "0.0.1",
        "intended_use": "demonstration",
        "input": {"size": 32},
        "denoise": {"enabled": True, "smax": 3},
        "members": [{"name": "cross"}, {"name": "plain"}],
        "fusion_weights": [0.5, 0.5],
        "thresholds": dict.fromkeys(FINDINGS, 0.5),
        "provenance": {
            "created": "2026-01-01T00:00:00+00:00",
            "package_version": "test",
            "training_command": "tests.bundles.random_thyroid_bundle",
        },
    }
    out = folder / "thyroid"
    write_thyroid_bundle(out, manifest, members, overwrite=True)
    return out


def random_spine_bundle(folder: Path) -> Path:
    """A spine bundle (keypoint net + ROI classifier at 64 px) with random weights (seed 0)
    in ``folder/spine``: eleven points of no meaning, the same code path as a trained one."""
    import torch

    from mibi_node.analyses.spine.bundle import write_spine_bundle
    from mibi_node.analyses.spine.model import create_keypoint_model, create_roi_classifier

    torch.manual_seed(0)
    manifest = {
        "name": "spine-random",
        "version": "0.0.1",
        "intended_use": "demonstration",
        "input": {"size": 64, "channels": 3},
        "crop": {"scale": 2.0, "size": 32},
        "provenance": {
            "created": "2026-01-01T00:00:00+00:00",
            "package_version": "test",
            "training_command": "tests.bundles.random_spine_bundle",
        },
    }
    out = folder / "spine"
    write_spine_bundle(
        out,
        manifest,
        create_keypoint_model(decoder_channels=16),
        create_roi_classifier(size=32, heads=2, embed_dim=16),
        overwrite=True,
    )
    return out
