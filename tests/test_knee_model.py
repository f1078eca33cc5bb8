"""The knee stages, preprocessing, bundle, runner and training, on tiny networks and volumes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from mibi_node.analyses.knee.bundle import (
    KneeBundle,
    knee_memory_needs,
    load_knee_bundle,
    record_knee_evaluation,
    write_knee_bundle,
)
from mibi_node.analyses.knee.labels import LABEL_OF, STRUCTURES
from mibi_node.analyses.knee.model import (
    NUM_CLASSES,
    KneeCoarseNet,
    KneeFineNet,
    cartilage_box,
    class_probabilities,
    clean_components,
    create_knee_stage,
    fit_box,
    list_knee_stages,
    merge_tibial_logits,
    split_tibial,
)
from mibi_node.analyses.knee.preprocess import (
    KneePreprocessing,
    WorkingGrid,
    labels_to_grid,
    one_hot,
    preprocess_volume,
    probabilities_to_source,
)
from mibi_node.analyses.knee.result import KneeInput, KneeResult
from mibi_node.analyses.knee.runner import (
    MIN_NORMAL_X,
    NO_CARTILAGE,
    KneeRunner,
    medial_toward_higher_slices,
)
from mibi_node.errors import BundleError, ConfigError, UnusableStudyError
from mibi_node.imaging.volume import Volume

torch.set_num_threads(1)

#: Tiny phantom cases: 16 sagittal slices of 48 x 48 px, 3 x 2 x 2 mm.
TINY_SHAPE = (16, 48, 48)
TINY_SPACING = (3.0, 2.0, 2.0)

RECIPE = """
name = "knee-tiny"
version = "0.0.1"
[preprocessing]
spacing_mm = 2.0
coarse_factor = 2
[stage1]
channels = [4, 8, 8]
strides = [2, 2]
epochs = 1
batch_size = 2
[stage2]
widths = [4, 8]
blocks = [1, 1]
aspp_channels = 4
decoder_channels = 4
stem_channels = 4
epochs = 1
batch_size = 2
patch = [16, 16, 16]
patches_per_case = 1
[split]
train = 0.5
validation = 0.25
test = 0.25
[training]
precision = "fp32"
"""

_TINY_STAGES: dict[str, dict[str, Any]] = {
    "stage1": {"channels": (4, 8, 8), "strides": (2, 2)},
    "stage2": {
        "widths": (4, 8),
        "blocks": (1, 1),
        "aspp_channels": 4,
        "decoder_channels": 4,
        "stem_channels": 4,
    },
}


def _networks() -> tuple[KneeCoarseNet, KneeFineNet]:
    torch.manual_seed(0)
    stage1 = create_knee_stage("stage1_resunet_s", **_TINY_STAGES["stage1"])
    stage2 = create_knee_stage("stage2_medicalnet10_aspp_s", **_TINY_STAGES["stage2"])
    assert isinstance(stage1, KneeCoarseNet) and isinstance(stage2, KneeFineNet)
    return stage1.eval(), stage2.eval()


def _manifest() -> dict:
    return {
        "name": "knee-random",
        "version": "0.0.1",
        "intended_use": "demonstration",
        "preprocessing": {"spacing_mm": 2.0, "coarse_factor": 2},
        "provenance": {
            "created": "2026-01-01T00:00:00+00:00",
            "package_version": "test",
            "training_command": "test",
        },
    }


def _volume(
    image: np.ndarray,
    spacing: tuple[float, float, float] = TINY_SPACING,
    row_cosines: tuple[float, float, float] = (0.0, 1.0, 0.0),
    column_cosines: tuple[float, float, float] = (0.0, 0.0, -1.0),
) -> Volume:
    return Volume(
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid="1.2.826.0.1.3680043.8.498.2",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.3",
        image=image.astype(np.float32),
        spacing=spacing,
        origin=(0.0, 0.0, 0.0),
        row_cosines=row_cosines,
        column_cosines=column_cosines,
        slices=(),
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mibi_node.analyses.knee.phantom import write_knee_dataset

    out = tmp_path_factory.mktemp("knee-cases")
    write_knee_dataset(out, 4, 11, shape=TINY_SHAPE, spacing=TINY_SPACING)
    return out


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("knee-bundle")
    write_knee_bundle(out, _manifest(), *_networks(), overwrite=True)
    return out


@pytest.mark.parametrize("arch", list_knee_stages())
def test_every_registered_stage_gives_five_class_probabilities(arch: str) -> None:
    torch.manual_seed(0)
    model = create_knee_stage(arch).eval()
    side = 2 * model.size_multiple
    x = torch.randn(2, 1, side, side + model.size_multiple, side)
    with torch.inference_mode():
        logits = model(x)
    assert logits.shape == (2, NUM_CLASSES, *x.shape[2:])
    probabilities = class_probabilities(logits)
    assert torch.allclose(probabilities.sum(1), torch.ones(2, *x.shape[2:]), atol=1e-5)
    merged = merge_tibial_logits(logits).softmax(1)
    assert merged.shape[1] == NUM_CLASSES - 1
    tibial = probabilities[:, LABEL_OF["medial_tibial_cartilage"]]
    tibial = tibial + probabilities[:, LABEL_OF["lateral_tibial_cartilage"]]
    assert torch.allclose(merged[:, 2], tibial, atol=1e-5)


def test_factory_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="no_such_stage"):
        create_knee_stage("no_such_stage")
    with pytest.raises(ValueError, match='"widths" is not an option of coarse'):
        create_knee_stage("stage1_resunet_s", widths=(4, 8))
    with pytest.raises(TypeError, match='"decoder_channels"'):
        create_knee_stage("stage2_medicalnet10_aspp_s", decoder_channels="8")
    with pytest.raises(ValueError, match="res_units"):
        create_knee_stage("stage1_resunet_s", res_units=0)


def test_components_cleanup_drops_an_island_and_keeps_the_plate() -> None:
    mask = np.zeros((20, 30, 30), dtype=bool)
    mask[2:6, 3:25, 3:25] = True  # the plate
    mask[15:17, 20:22, 20:22] = True  # an island of 8 voxels
    kept, removed = clean_components(mask, 1.0, min_volume_mm3=20.0, min_fraction=0.05)
    assert removed == 1
    assert kept[2:6, 3:25, 3:25].all() and not kept[15:17, 20:22, 20:22].any()
    assert clean_components(np.zeros((4, 4, 4), dtype=bool), 1.0)[1] == 0


def test_crop_box_holds_the_truth_with_its_margin() -> None:
    coarse = np.zeros((10, 12, 12), dtype=bool)
    coarse[3:5, 4:9, 2:7] = True
    shape = (40, 48, 48)
    box = cartilage_box(coarse, factor=3, margin=4.0, multiple=8, shape=shape)
    assert box is not None
    for (lo, hi), (start, stop), n in zip(box, [(9, 15), (12, 27), (6, 21)], shape, strict=True):
        assert lo <= start - 4 and hi >= stop + 4  # the truth in working voxels, with margin
        assert (hi - lo) % 8 == 0 and 0 <= lo < hi <= n
    assert cartilage_box(np.zeros_like(coarse), shape=shape) is None
    # longer than the grid: starts at 0 and runs past the end (the crop is padded)
    assert fit_box([(-3.0, 50.0)] * 3, 8, (40, 48, 48))[0] == (0, 56)


def _plate(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """A curved cartilage-like shell 2.4 mm thick (a piece of a sphere of radius 20 mm)."""
    k, j, i = (np.arange(n) * s for n, s in zip(shape, spacing, strict=True))
    kk, jj, ii = np.meshgrid(k, j, i, indexing="ij")
    centre = [n * s / 2 for n, s in zip(shape, spacing, strict=True)]
    r = np.sqrt((kk - centre[0]) ** 2 + (jj - centre[1] + 12.0) ** 2 + (ii - centre[2]) ** 2)
    return ((r >= 20.0) & (r <= 22.4) & (jj > centre[1])).astype(np.uint8)


def test_working_grid_round_trip_keeps_a_plate() -> None:
    spacing = (1.5, 0.8, 0.8)
    labels = _plate((24, 64, 64), spacing)
    grid = WorkingGrid.create(labels.shape, spacing, 0.7, multiple=8)
    assert all(s % 8 == 0 for s in grid.shape) and grid.extent[0] == 52
    working = labels_to_grid(labels, grid)
    assert working.shape == grid.shape and set(np.unique(working)) == {0, 1}
    back, box = probabilities_to_source(torch.from_numpy(one_hot(working, 5)), grid)
    assert back.shape == labels.shape and back.dtype == np.uint8
    assert _dice(back == 1, labels == 1) >= 0.95
    # a box of the working grid: the same labels inside, background outside
    sub = ((10, 40), (20, 60), (8, 72))
    part = one_hot(working, 5)[:, 10:40, 20:60, 8:72]
    inside, source_box = probabilities_to_source(torch.from_numpy(part), grid, box=sub)
    (k0, k1), (j0, j1), (i0, i1) = source_box
    assert not inside[:k0].any() and not inside[k1:].any()
    assert np.array_equal(inside[k0:k1, j0:j1, i0:i1], back[k0:k1, j0:j1, i0:i1])


def test_preprocessing_normalises_on_the_working_grid() -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1000, (20, 40, 40)).astype(np.float32)
    for method in ("gaussian", "median", "none"):
        config = KneePreprocessing(spacing_mm=1.0, coarse_factor=2, denoise=method)
        working, grid = preprocess_volume(image, (2.0, 1.0, 1.0), config, multiple=16)
        assert working.shape == grid.shape == (48, 48, 48) and grid.extent == (40, 40, 40)
        assert working.min() >= 0.0 and working.max() <= 1.5
        assert not working[40:].any()  # the padding reads 0
    with pytest.raises(ValueError, match='"denoise"'):
        KneePreprocessing(denoise="wavelet")  # type: ignore[arg-type]


def test_tibial_sides_are_decided_for_the_whole_knee() -> None:
    probabilities = torch.zeros(5, 20, 8, 8)
    probabilities[0] = 1.0
    medial, lateral = LABEL_OF["medial_tibial_cartilage"], LABEL_OF["lateral_tibial_cartilage"]
    for ks, own in ((slice(2, 6), 0.3), (slice(13, 18), 0.6)):  # two plates, one split
        probabilities[:, ks, 3:5] = 0.0
        probabilities[medial, ks, 3:5] = own
        probabilities[lateral, ks, 3:5] = 1.0 - own
    evidence = torch.zeros(20, 8, 8)
    evidence[:10] = 1.0  # stage 1: the low slices are medial
    evidence[10:] = -1.0
    out = split_tibial(probabilities, evidence).argmax(0)
    assert (out[2:6, 3:5] == medial).all() and (out[13:18, 3:5] == lateral).all()
    assert torch.allclose(split_tibial(probabilities).sum(0), torch.ones(20, 8, 8))
    # a known side overrules the vote
    for far_is_medial, far in ((True, medial), (False, lateral)):
        out = split_tibial(probabilities, evidence, far_is_medial=far_is_medial).argmax(0)
        near = lateral if far == medial else medial
        assert (out[2:6, 3:5] == near).all() and (out[13:18, 3:5] == far).all()


def _oblique(degrees: float) -> dict[str, tuple[float, float, float]]:
    """Cosines whose normal is the patient's x turned ``degrees`` toward y."""
    t = np.radians(degrees)
    return {"row_cosines": (-np.sin(t), np.cos(t), 0.0), "column_cosines": (0.0, 0.0, 1.0)}


@pytest.mark.parametrize(
    ("side", "cosines", "expected"),
    [
        ("R", {}, False),  # normal -x (toward the patient's right): medial at low slices
        ("L", {}, True),
        ("R", _oblique(0.0), True),  # normal +x
        ("L", _oblique(0.0), False),
        ("R", _oblique(40.0), True),  # oblique, still sagittal enough
        ("L", _oblique(180.0 - 40.0), True),  # normal -x turned 40 degrees
    ],
)
def test_the_medial_plate_follows_the_knee_side_and_the_slice_normal(
    side: str, cosines: dict[str, Any], expected: bool
) -> None:
    study = KneeInput(_volume(np.zeros(TINY_SHAPE), **cosines), laterality=side)
    assert medial_toward_higher_slices(study) == (expected, "")


def test_no_side_or_a_non_sagittal_series_leaves_the_split_to_the_vote() -> None:
    unknown, why = medial_toward_higher_slices(KneeInput(_volume(np.zeros(TINY_SHAPE))))
    assert unknown is None and "side is not known" in why
    assert np.cos(np.radians(50.0)) < MIN_NORMAL_X
    oblique = KneeInput(_volume(np.zeros(TINY_SHAPE), **_oblique(50.0)), laterality="R")
    unknown, why = medial_toward_higher_slices(oblique)
    assert unknown is None and "not sagittal enough" in why and "0.64" in why
    with pytest.raises(ValueError, match='"laterality"'):
        KneeInput(_volume(np.zeros(TINY_SHAPE)), laterality="left")


def test_bundle_round_trip_and_altered_weights(random_bundle: Path, tmp_path: Path) -> None:
    bundle = KneeBundle.load(random_bundle)
    assert (bundle.name, bundle.version, bundle.manifest.analysis) == (
        "knee-random",
        "0.0.1",
        "knee",
    )
    assert bundle.preprocessing.coarse_spacing_mm == pytest.approx(4.0)
    assert knee_memory_needs(random_bundle)[0] > 0
    stage1, stage2 = _networks()
    x = torch.randn(1, 1, 16, 16, 24)
    with torch.inference_mode():
        assert torch.equal(bundle.build_stage1()(x), stage1(x))
        assert torch.equal(bundle.build_stage2()(x), stage2(x))

    altered = tmp_path / "altered"
    write_knee_bundle(altered, _manifest(), stage1, stage2)
    weights = altered / "stage2.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="stage2.safetensors: sha256"):
        load_knee_bundle(altered)
    weights.write_bytes(b"not safetensors")
    with pytest.raises(BundleError, match="stage2.safetensors: not a readable"):
        load_knee_bundle(altered, verify=False).build_stage2()
    with pytest.raises(BundleError, match="already exists"):
        write_knee_bundle(altered, _manifest(), stage1, stage2)
    data = json.loads((random_bundle / "bundle.json").read_text())
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "bundle.json").write_text(json.dumps(data | {"colour": "red"}))
    with pytest.raises(BundleError, match="colour"):
        load_knee_bundle(tmp_path / "extra")
    recorded = record_knee_evaluation(random_bundle, {"dice": 0.5}, split="test")
    assert recorded.manifest.evaluation["0.0.1"]["test"] == {"dice": 0.5}


class _Background(nn.Module):
    """A stage 1 that sees no cartilage anywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], NUM_CLASSES, *x.shape[2:])
        logits[:, 0] = 10.0
        return logits


class _Everywhere(nn.Module):
    """A stage 1 that sees femoral cartilage everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], NUM_CLASSES, *x.shape[2:])
        logits[:, LABEL_OF["femoral_cartilage"]] = 10.0
        return logits


class _TwoPlates(nn.Module):
    """A stage 2 that sees tibial cartilage, either plate alike, in two slabs of slices."""

    size_multiple = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], NUM_CLASSES, *x.shape[2:])
        logits[:, 0] = 5.0
        depth = x.shape[2]
        for start, stop in ((depth // 8, 3 * depth // 8), (5 * depth // 8, 7 * depth // 8)):
            logits[:, 2:4, start:stop] = 10.0
        return logits


def test_the_runner_splits_the_tibial_plates_by_the_knee_side(random_bundle: Path) -> None:
    runner = KneeRunner(random_bundle)
    runner.stage1, runner.stage2 = _Everywhere(), _TwoPlates()  # type: ignore[assignment]
    image = np.random.default_rng(3).uniform(0, 100, TINY_SHAPE)
    k = np.arange(TINY_SHAPE[0])[:, None, None]
    for side in ("L", "R"):
        (result,) = runner.predict([KneeInput(_volume(image), laterality=side)])
        medial, lateral = (result.labels == value for value in (2, 3))
        assert medial.any() and lateral.any()
        # the normal is -x (the patient's right): a right knee's medial plate at low slices
        assert ((k * medial).sum() / medial.sum() < (k * lateral).sum() / lateral.sum()) == (
            side == "R"
        )
        assert not any("vote" in w for w in result.warnings)
    (result,) = runner.predict([KneeInput(_volume(image))])
    assert any("by the model's vote" in w and "side is not known" in w for w in result.warnings)


def test_runner_refuses_unusable_volumes_and_reports_no_cartilage(random_bundle: Path) -> None:
    runner = KneeRunner(random_bundle)
    assert (runner.bundle_name, runner.bundle_version, runner.device) == (
        "knee-random", "0.0.1", "cpu",
    )  # fmt: skip
    image = np.random.default_rng(1).uniform(0, 100, TINY_SHAPE)
    for bad, words in (
        (np.zeros(TINY_SHAPE), "blank"),
        (np.where(image > 50, np.nan, image), "NaN"),
        (image[:4], "too small"),
    ):
        with pytest.raises(UnusableStudyError, match=words):
            runner.predict([KneeInput(_volume(bad))])
    runner.stage1 = _Background()  # type: ignore[assignment]
    (result,) = runner.predict([KneeInput(_volume(image), warnings=("tolerated",))])
    assert result.labels.shape == TINY_SHAPE and not result.labels.any()
    assert result.found == () and result.coarse_box is None
    assert result.warnings == ("tolerated", NO_CARTILAGE)


def test_tiny_training_end_to_end(
    cases: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mibi_node.analyses.knee.reader import read_knee_study
    from training.knee import evaluate_knee, main

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "bundle"
    assert main(["train", str(recipe), str(cases), "--out", str(out)]) == 0
    assert "stage 2 epoch 1/1" in capsys.readouterr().out
    bundle = load_knee_bundle(out)
    split = bundle.manifest.split
    assert sorted(split["train"] + split["validation"] + split["test"]) == [
        f"case-{n:04d}" for n in range(1, 5)
    ]
    assert bundle.manifest.training["stage2"]["epochs"] == 1
    assert "validation" in bundle.manifest.evaluation["0.0.1"]

    runner = KneeRunner(out)
    study = read_knee_study(sorted((cases / "case-0001" / "dicom").glob("*.dcm")))
    results = runner.predict([study])
    ((first, both),) = runner.predict_arms([study])
    for result in (*results, first, both):
        assert isinstance(result, KneeResult)
        assert result.labels.shape == study.volume.shape and result.labels.dtype == np.uint8
        assert [m.structure for m in result.measurements] == list(STRUCTURES)
        assert {"preprocess", "stage1", "stage2", "postprocess", "measure"} <= set(result.timings)
        json.dumps(result.to_dict())
    assert first.timings["stage2"] == 0.0 and np.array_equal(results[0].labels, both.labels)

    summary, report = evaluate_knee(out, cases, bootstrap=0, split="test")
    assert summary.arms == ("stage 1", "both stages") and report["cases"] == 1
    assert report["peak_rss_mb"] > 0
    figures = tmp_path / "figures.json"
    assert main(["evaluate", str(out), str(cases), "--bootstrap", "0", "--json", str(figures),
                 "--record"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "Goals (mean Dice)" in printed and "s per knee" in printed
    assert json.loads(figures.read_text())["cases"] == 4
    assert "test" in load_knee_bundle(out).manifest.evaluation["0.0.1"]

    # bad input: exit status 2 and one sentence naming the key or the folder
    recipe.write_text(RECIPE.replace("[stage2]", "[stage2]\npatchez = [8, 8, 8]"))
    assert main(["train", str(recipe), str(cases), "--out", str(tmp_path / "x")]) == 2
    assert "stage2.patchez" in capsys.readouterr().err
    recipe.write_text(RECIPE.replace("[stage1]", '[stage1]\narch = "stage2_medicalnet10_aspp_s"'))
    with pytest.raises(ConfigError, match="stage1.arch"):
        from training.knee import load_knee_recipe

        load_knee_recipe(recipe)
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe.write_text(RECIPE)
    assert main(["train", str(recipe), str(empty), "--out", str(tmp_path / "y")]) == 2
    assert "no case-* folder" in capsys.readouterr().err


def test_a_volume_changes_nothing_in_the_input(random_bundle: Path) -> None:
    image = np.random.default_rng(2).uniform(0, 100, TINY_SHAPE).astype(np.float32)
    study = KneeInput(_volume(image.copy()))
    KneeRunner(random_bundle).predict([study])
    assert np.array_equal(study.volume.image, image)
    assert replace(study, reason="x").volume is study.volume
