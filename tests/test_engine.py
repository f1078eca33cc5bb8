"""The engine end to end on synthetic studies, preprocessing geometry and localisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mibi_node.errors import UnusableStudyError
from mibi_node.imaging.preprocess import Normalisation, resize_square, to_model_input
from mibi_node.imaging.study import PhaseImage, StudyInput
from mibi_node.inference.bundle import Bundle, init_random_bundle, load_bundle, write_bundle
from mibi_node.inference.engine import InferenceEngine, cpu_has_native_bf16, resolve_device
from mibi_node.inference.localisation import find_focus, thyroid_bed
from mibi_node.inference.result import StudyResult

DEMO = Path(__file__).resolve().parents[1] / "config" / "ensemble-demo.toml"
KEYS = ["normal", "adenoma", "hyperplasia", "carcinoma", "cyst"]


def neck(
    shape: tuple[int, int] = (128, 128),
    lesion: tuple[float, float] | None = (90.0, 45.0),
    washout: float = 0.4,
    seed: int = 0,
) -> np.ndarray:
    """An anterior neck image: two thyroid lobes, optionally a retained lesion (row, col)."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0 : shape[0], 0 : shape[1]] * (128 / shape[0])
    thyroid = 200 * np.exp(-((r - 60) ** 2 / 300 + (c - 50) ** 2 / 60))
    thyroid += 200 * np.exp(-((r - 60) ** 2 / 300 + (c - 78) ** 2 / 60))
    spot = 0 * r
    if lesion is not None:
        spot = 250 * np.exp(-((r - lesion[0]) ** 2 + (c - lesion[1]) ** 2) / 10)
    return rng.poisson(washout * thyroid + spot + 3).astype(np.float32)


def make_study(
    uid: str = "1.2.3.4",
    early_shape: tuple[int, int] = (128, 128),
    delayed_shape: tuple[int, int] = (128, 128),
    lesion: tuple[float, float] | None = (90.0, 45.0),
) -> StudyInput:
    def image(name: str, pixels: np.ndarray) -> PhaseImage:
        return PhaseImage(
            name=name,
            pixels=pixels,
            pixel_spacing=(2.0, 2.0),
            sop_instance_uid=f"{uid}.{len(name)}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.20",
            series_instance_uid=f"{uid}.9",
        )

    early = neck(early_shape, lesion, washout=1.0, seed=1)
    delayed = neck(delayed_shape, lesion, washout=0.4, seed=2)
    return StudyInput(
        uid, {"early": image("early", early), "delayed": image("delayed", delayed)}, ("read",)
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return init_random_bundle(DEMO, tmp_path_factory.mktemp("demo") / "bundle", seed=0)


@pytest.fixture(scope="module")
def engine(demo: Bundle) -> InferenceEngine:
    return InferenceEngine(demo, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def adenoma_bundle(demo: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The demo bundle with every member biased towards "adenoma", so a focus is reported."""
    members = {name: demo.build_member(name) for name in demo.member_names}
    for member in members.values():
        with torch.no_grad():
            member.head.proj.bias[1] += 50.0
    manifest = demo.manifest.model_dump(mode="json")
    manifest.pop("format_version")
    manifest["members"] = [{"name": n} for n in demo.member_names]
    return write_bundle(tmp_path_factory.mktemp("adenoma") / "bundle", manifest, members)


def test_result_contract(engine: InferenceEngine) -> None:
    study = make_study()
    (result,) = engine.predict([study])
    assert isinstance(result, StudyResult)
    assert list(result.probabilities) == KEYS
    assert abs(sum(result.probabilities.values()) - 1) < 1e-9
    assert result.predicted in KEYS
    assert list(result.member_probabilities) == ["resnet10t", "resnet18d", "efficientnet_b0"]
    for probs in result.member_probabilities.values():
        assert list(probs) == KEYS and abs(sum(probs.values()) - 1) < 1e-5
    assert 0 < result.agreement <= 1 and 0 <= result.normalised_entropy <= 1
    assert result.source_images["delayed"] is study.images["delayed"]
    assert set(result.timings) == {
        "denoise",
        "preprocess",
        "tta",
        "members",
        "fusion",
        "localisation",
    }
    assert result.warnings[0] == "read" and "demonstration" in result.warnings[-1]
    assert (result.bundle_name, result.intended_use) == ("mibi-demo", "demonstration")
    assert result.to_dict()["source_images"]["early"]["sop_instance_uid"] == "1.2.3.4.5"


def test_batch_equals_single_and_order_is_kept(engine: InferenceEngine) -> None:
    studies = [make_study(f"1.2.{i}", lesion=(60 + 10 * i, 40.0)) for i in range(3)]
    batched = engine.predict(studies)
    assert [r.study_instance_uid for r in batched] == ["1.2.0", "1.2.1", "1.2.2"]
    for study, result in zip(studies, batched, strict=True):
        single = engine.predict_one(study)
        for key in KEYS:
            assert abs(single.probabilities[key] - result.probabilities[key]) < 1e-5


def test_mixed_matrix_sizes(engine: InferenceEngine) -> None:
    result = engine.predict_one(make_study(early_shape=(128, 128), delayed_shape=(256, 256)))
    assert abs(sum(result.probabilities.values()) - 1) < 1e-9


def test_missing_phase_is_unusable(engine: InferenceEngine) -> None:
    study = make_study()
    only_early = StudyInput(study.study_instance_uid, {"early": study.images["early"]})
    with pytest.raises(UnusableStudyError, match="1.2.3.4 has no delayed image"):
        engine.predict([only_early])
    with pytest.raises(TypeError, match='"studies"'):
        engine.predict(study)  # type: ignore[arg-type]
    assert engine.predict([]) == []


@pytest.fixture(scope="module")
def bf16_engine(demo: Bundle) -> InferenceEngine:
    return InferenceEngine(demo, device="cpu", precision="bf16")


def _norm_tensors(member: torch.nn.Module) -> list[torch.Tensor]:
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
    return [
        t
        for m in member.modules()
        if isinstance(m, norms)
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
    ]


def test_bf16_stays_close_to_fp32(engine: InferenceEngine, bf16_engine: InferenceEngine) -> None:
    studies = [make_study(f"1.2.{i}", lesion=(50 + 15 * i, 80.0)) for i in range(2)]
    for a, b in zip(engine.predict(studies), bf16_engine.predict(studies), strict=True):
        assert max(abs(a.probabilities[k] - b.probabilities[k]) for k in KEYS) < 1e-2
        assert sum(b.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        for name in bf16_engine.members:
            member = b.member_probabilities[name]
            assert sum(member.values()) == pytest.approx(1.0, abs=1e-6)
            reference = a.member_probabilities[name]
            assert max(abs(member[k] - reference[k]) for k in KEYS) < 1e-2


def test_bf16_engine_holds_bf16_weights(bf16_engine: InferenceEngine) -> None:
    for member in bf16_engine.members.values():
        kept = {id(t) for t in _norm_tensors(member)}
        assert kept  # the demo members have norm layers, which stay fp32
        for tensor in (*member.parameters(), *member.buffers()):
            if not tensor.is_floating_point():
                continue
            assert not tensor.is_meta
            assert tensor.dtype == (torch.float32 if id(tensor) in kept else torch.bfloat16)
        assert member.head.qkv is not None and member.head.qkv.weight.dtype == torch.bfloat16
        assert not member.training


def test_bf16_engine_weights_take_half_the_memory(
    engine: InferenceEngine, bf16_engine: InferenceEngine
) -> None:
    def nbytes(e: InferenceEngine) -> int:
        return sum(
            t.numel() * t.element_size()
            for m in e.members.values()
            for t in (*m.parameters(), *m.buffers())
        )

    assert 0.48 < nbytes(bf16_engine) / nbytes(engine) < 0.55


def test_focus_is_reported_for_a_lesion(adenoma_bundle: Bundle) -> None:
    engine = InferenceEngine(load_bundle(adenoma_bundle.directory), device="cpu")
    result = engine.predict_one(make_study(delayed_shape=(256, 256), lesion=(95.0, 40.0)))
    assert result.predicted == "adenoma"
    focus = result.focus
    assert focus is not None and focus.phase == "delayed"
    assert 0 <= focus.row <= 255 and 0 <= focus.col <= 255  # delayed image pixels
    assert focus.side in ("left", "right") and focus.pole in ("upper", "lower", "ectopic")


def test_no_focus_without_localisation(adenoma_bundle: Bundle) -> None:
    engine = InferenceEngine(adenoma_bundle, device="cpu", localise=False)
    assert engine.predict_one(make_study()).focus is None


def test_find_focus_side_pole_and_geometry() -> None:
    anatomy = neck((64, 64), lesion=None, washout=1.0) / 200
    attention = np.ones((64, 64))
    # lesion at image-left (patient right), below the lobes' middle -> right, lower
    uptake = neck((64, 64), lesion=(80.0, 40.0), washout=0.4) / 200
    geometry = to_model_input([uptake], 64, Normalisation())[1][0]
    focus = find_focus(attention, uptake, anatomy, geometry)
    assert (focus.side, focus.pole) == ("right", "lower")
    assert abs(focus.row - 40) <= 2 and abs(focus.col - 20) <= 2
    # image-right, upper
    uptake = neck((64, 64), lesion=(45.0, 90.0), washout=0.4) / 200
    focus = find_focus(attention, uptake, anatomy, geometry)
    assert (focus.side, focus.pole) == ("left", "upper")
    # far below the thyroid bed: ectopic (mediastinal)
    uptake = neck((64, 64), lesion=(125.0, 64.0), washout=0.0) / 200
    assert find_focus(attention, uptake, anatomy, geometry).pole == "ectopic"
    # attention decides between two equally hot spots
    uptake = neck((64, 64), lesion=None, washout=0.0)
    uptake[10, 10] = uptake[50, 50] = 100
    attention = np.zeros((64, 64))
    attention[45:55, 45:55] = 1
    focus = find_focus(attention, uptake, anatomy, geometry)
    assert (round(focus.row), round(focus.col)) == (50, 50)


def test_thyroid_bed_midline() -> None:
    midline, top, bottom, left, right = thyroid_bed(neck(lesion=None, washout=1.0))
    assert abs(midline - 64) < 2 and top < 60 < bottom and left < 50 and right > 78


def test_preprocess_geometry_round_trip() -> None:
    image = np.zeros((100, 60), dtype=np.float32)
    image[30, 10] = 1.0
    square, geometry = resize_square(image, 50)
    assert geometry.pad == (0, 20) and square.shape == (50, 50)
    row, col = divmod(int(square.argmax()), 50)
    src = geometry.to_source(row, col)
    assert abs(src[0] - 30) <= 1 and abs(src[1] - 10) <= 1


def test_normalisation() -> None:
    early = np.full((8, 8), 100.0, dtype=np.float32)
    delayed = np.full((8, 8), 40.0, dtype=np.float32)
    per_channel, _ = to_model_input([early, delayed], 8, Normalisation(method="max"))
    np.testing.assert_allclose(per_channel, 1.0)
    study, _ = to_model_input([early, delayed], 8, Normalisation(method="max", scope="study"))
    np.testing.assert_allclose(study[1], 0.4)
    with pytest.raises(ValueError, match='"std"'):
        Normalisation(std=(0.0,))


def test_device_and_precision_choice() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match='"device"'):
        resolve_device("tpu")
    with pytest.raises(TypeError, match='"device"'):
        resolve_device(3)  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA but there is none"):
            resolve_device("cuda")
    assert isinstance(cpu_has_native_bf16(), bool)


def test_auto_precision(demo: Bundle) -> None:
    engine = InferenceEngine(demo, device="cpu")
    assert engine.precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    with pytest.raises(ValueError, match='"precision"'):
        InferenceEngine(demo, device="cpu", precision="fp16")  # type: ignore[arg-type]
