"""Analyses as units: the registry, the selection rules, the site settings, the memory budget.

The selection tests run on real phantom files: a parathyroid subtraction study (sestamibi
early/delayed images plus a 99mTc-pertechnetate thyroid image) and a plain thyroid scan.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from bundles import random_bundle
from mibi_node.analyses import Analysis, available_analyses, get_analysis, register_analysis
from mibi_node.analyses.thyroid.phantom import make_thyroid_study
from mibi_node.assembly.routing import select_analyses
from mibi_node.config import Config, load_config
from mibi_node.errors import ConfigError, MibiNodeError
from mibi_node.inference.worker import Worker
from mibi_node.phantom.generator import make_study


def _headers(datasets: list[Dataset], tmp_path: Path) -> list[Dataset]:
    """Write and read back the headers, as routing reads them from the store."""
    headers = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    for index, ds in enumerate(datasets):
        path = tmp_path / f"{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        headers.append(pydicom.dcmread(path, stop_before_pixels=True))
    return headers


def _selections(config: Config) -> dict:
    return {name: config.selection(name) for name in ("parathyroid", "thyroid")}


def test_the_built_in_analyses_are_registered_and_described() -> None:
    analyses = available_analyses()
    assert list(analyses)[:2] == ["parathyroid", "thyroid"]
    for name, analysis in analyses.items():
        assert isinstance(analysis, Analysis) and analysis.name == name
        described = analysis.describe()
        assert described["name"] == name and described["outputs"][0] == "sr"
    with pytest.raises(MibiNodeError, match="no analysis called 'wrist'.*parathyroid"):
        get_analysis("wrist")
    with pytest.raises(ValueError, match="registered already"):

        class Impostor(type(get_analysis("thyroid"))):  # type: ignore[misc]
            pass

        register_analysis(Impostor)
    with pytest.raises(TypeError, match='"analysis" should be an Analysis'):
        register_analysis(object())  # type: ignore[arg-type]


def test_a_subtraction_study_is_a_mibi_study_and_a_thyroid_scan_a_thyroid_study(
    tmp_path: Path,
) -> None:
    config = Config()
    selections = _selections(config)
    subtraction = make_study("adenoma", seed=3, with_thyroid_scan=True)
    headers = _headers(list(subtraction.datasets), tmp_path / "mibi")
    codes = {
        str(code.CodeValue)
        for h in headers
        for item in h.RadiopharmaceuticalInformationSequence
        for code in item.RadiopharmaceuticalCodeSequence
    }
    assert {"424299003", "19495007"} <= codes  # sestamibi and the pertechnetate image
    decision = select_analyses(headers, "CAM", selections)
    assert decision.analyse and set(decision.analyses or {}) == {"parathyroid"}

    scan = make_thyroid_study(5, ("graves",))
    thyroid = select_analyses(_headers(scan.datasets, tmp_path / "thy"), "CAM", selections)
    assert thyroid.analyse and set(thyroid.analyses or {}) == {"thyroid"}
    assert "19495007" in thyroid.reason

    # The pertechnetate image sent on its own still belongs to a parathyroid study (its
    # Study Description says so); the same image under a thyroid description is a scan.
    [pertechnetate] = [h for h in headers if "THYROID" in str(h.SeriesDescription).upper()]
    assert "PARATHYROID" in str(pertechnetate.StudyDescription).upper()
    alone = select_analyses([pertechnetate], "CAM", selections)
    assert set(alone.analyses or {}) == {"parathyroid"}
    pertechnetate.StudyDescription = "THYROID SCAN"
    renamed = select_analyses([pertechnetate], "CAM", selections)
    assert set(renamed.analyses or {}) == {"thyroid"}

    ct = Dataset()
    ct.Modality, ct.SOPClassUID, ct.StudyDescription = "CT", "1.2.840.10008.5.1.4.1.1.2", "NECK"
    ignored = select_analyses([ct], "CAM", selections)
    assert not ignored.analyse
    assert ignored.reason.startswith("no analysis takes it: parathyroid: modality CT")
    assert "thyroid: modality CT" in ignored.reason


def test_a_site_rule_overrides_the_default_and_bad_keys_are_named(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        "[analyses.thyroid]\nbundle = 'b/thyroid'\nseries_number = 42\n"
        "[analyses.thyroid.selection]\ncalling_ae_titles = ['THY_CAM']\n"
    )
    config = load_config(toml)
    assert config.enabled_analyses == ("parathyroid", "thyroid")
    assert config.bundle_for("thyroid") == Path("b/thyroid")
    assert config.bundle_for("parathyroid") == config.workers.bundle  # workers.bundle, as before
    assert config.series_number_for("thyroid") == 42
    assert config.series_number_for("parathyroid") == config.report.series_number
    rule = config.selection("thyroid")
    assert rule.calling_ae_titles == ("THY_CAM",)
    assert rule.exclude_radiopharmaceutical_codes == ("424299003", "C-B1115")  # the default kept
    neck = Dataset()
    neck.Modality, neck.SOPClassUID, neck.StudyDescription = "NM", "1.2.840.10008.5.1.4.1.1.20", "x"
    assert select_analyses([neck], "THY_CAM", config.selections()).analyses == {
        "thyroid": "calling AE title THY_CAM"
    }
    off = tmp_path / "off.toml"
    off.write_text("[analyses.parathyroid]\nenabled = false\n[analyses.thyroid]\n")
    assert load_config(off).enabled_analyses == ("thyroid",)
    for text, key in (
        ("[analyses.wrist]\n", "analyses.wrist: no such analysis"),
        ("[analyses.thyroid.selection]\nmodality = ['NM']\n", "selection.modality: unknown key"),
        (
            "[analyses.thyroid.selection]\ndescription_pattern = '('\n",
            "selection.description_pattern: Value error, not a valid regular expression",
        ),
        (
            "[routing]\nmodalities = ['NM']\n[analyses.parathyroid.selection]\nmodalities = ['NM']\n",
            "keep analyses.parathyroid.selection only",
        ),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(".", r"\.")):
            load_config(bad)


def test_a_bundle_over_the_memory_budget_is_refused_at_start_with_the_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = random_bundle(tmp_path / "tiny")
    needs = get_analysis("parathyroid").memory_needs(bundle, "cpu")
    assert needs.cpu_mb > 0 and needs.source == "estimated from the weight files"
    # The worker's own memory (torch, timm, ...), measured at start; fixed here, since this
    # test process holds far more than a worker would.
    baseline = 950.0
    monkeypatch.setattr("mibi_node.analyses.memory.worker_baseline_megabytes", lambda: baseline)

    def worker(budget: float) -> Worker:
        config = Config.model_validate(
            {
                "node": {"data_dir": str(tmp_path / f"var{budget:g}")},
                "workers": {"bundle": str(bundle), "memory_budget_mb": budget},
            }
        )
        return Worker(config, device="cpu", name=f"budget-{budget:g}")

    small = worker(baseline + needs.cpu_mb / 2)
    assert small.load_bundle() is False and small.runners == {}
    [problem] = small.problems.values()
    assert f"needs {needs.cpu_mb:.0f} MiB" in problem and "not loaded" in problem
    assert f"the worker itself {baseline:.0f} MiB" in problem
    assert "workers.memory_budget_mb" in problem
    with small.database.session() as session:
        from mibi_node.storage.models import WorkerStatus

        row = session.get_one(WorkerStatus, small.name)
        assert row.state == "waiting for a bundle" and "not loaded" in (row.message or "")
    # A budget for the bundles alone, as the check was before it counted the worker itself.
    bundles_only = worker(needs.cpu_mb * 4)
    assert needs.cpu_mb * 4 < baseline + needs.cpu_mb
    assert bundles_only.load_bundle() is False and bundles_only.runners == {}
    big = worker(baseline + needs.cpu_mb * 2)
    assert big.load_bundle() is True and set(big.runners) == {"parathyroid"}
    assert big.runners["parathyroid"].memory == needs
    # No budget configured: the worker's baseline plus 85 % of the memory free at start.
    default = worker(0)
    assert default.memory_budget_mb() > baseline and default.baseline_mb() == baseline


def _mr(description: str, series: str = "T2_TSE_SAG", body_part: str = "LSPINE") -> Dataset:
    header = Dataset()
    header.Modality, header.SOPClassUID = "MR", "1.2.840.10008.5.1.4.1.1.4"
    header.StudyDescription, header.SeriesDescription = description, series
    header.BodyPartExamined = body_part
    return header


def test_the_spine_rule_takes_lumbar_mr_studies_only() -> None:
    config = load_config(None)
    selections = {name: config.selection(name) for name in ("parathyroid", "thyroid", "spine")}
    for description in ("MRI LUMBAR SPINE", "MRT LWS nativ", "IRM rachis lombaire", "L-SPINE"):
        decision = select_analyses([_mr(description)], "MR_SCANNER", selections)
        assert decision.analyses is not None and set(decision.analyses) == {"spine"}, description
    for description in ("MRI CERVICAL SPINE", "MRT HWS", "MRI KNEE RIGHT", "MRI BRAIN"):
        decision = select_analyses([_mr(description, series="T2 SAG")], "MR_SCANNER", selections)
        assert not decision.analyse, description
        assert "spine: " in decision.reason, decision.reason
    # A lumbar description on an NM study is not an MR study.
    nm = _mr("MRI LUMBAR SPINE")
    nm.Modality = "NM"
    assert "spine" not in (select_analyses([nm], "CAM", selections).analyses or {})


def test_the_knee_rule_takes_knee_mr_studies_only() -> None:
    config = load_config(None)
    names = ("parathyroid", "thyroid", "spine", "knee")
    selections = {name: config.selection(name) for name in names}
    for description in ("MRI KNEE RIGHT", "MRT Knie links", "IRM genou gauche", "RM GINOCCHIO"):
        decision = select_analyses([_mr(description, "SAG 3D DESS", "KNEE")], "MR", selections)
        assert decision.analyses is not None and set(decision.analyses) == {"knee"}, description
    for description in ("MRI LUMBAR SPINE", "MRI HIP LEFT", "MRI ANKLE", "MRI BRAIN"):
        decision = select_analyses([_mr(description, "T2 SAG")], "MR", selections)
        assert "knee" not in (decision.analyses or {}), description


def _ct(description: str, series: str = "CHEST LUNG 1.0", body_part: str = "CHEST") -> Dataset:
    header = Dataset()
    header.Modality, header.SOPClassUID = "CT", "1.2.840.10008.5.1.4.1.1.2"
    header.StudyDescription, header.SeriesDescription = description, series
    header.BodyPartExamined = body_part
    return header


def test_the_lung_rule_takes_chest_ct_studies_only() -> None:
    config = load_config(None)
    names = ("parathyroid", "thyroid", "spine", "knee", "lung")
    selections = {name: config.selection(name) for name in names}
    for description in ("CT CHEST", "CT Thorax nativ", "TDM thoracique", "TC TORACE", "HRCT LUNG"):
        decision = select_analyses([_ct(description)], "CT", selections)
        assert decision.analyses is not None and set(decision.analyses) == {"lung"}, description
    for description in ("CT HEAD", "CT BRAIN", "CT CARDIAC CALCIUM SCORE", "CT LUMBAR SPINE"):
        decision = select_analyses([_ct(description, "AXIAL")], "CT", selections)
        assert "lung" not in (decision.analyses or {}), description
    # A chest description on an MR study is not a CT study.
    assert "lung" not in (select_analyses([_mr("MRI CHEST")], "MR", selections).analyses or {})


def test_the_key_image_follows_the_analysis_then_the_site(tmp_path: Path) -> None:
    config = load_config(None)
    assert config.key_image_for("spine") is True  # the spine analysis sends one by default
    assert config.key_image_for("lung") is True  # and so does the lung analysis
    assert config.key_image_for("parathyroid") is True  # as report.key_image says (default)
    toml = tmp_path / "node.toml"
    toml.write_text(
        "[report]\nkey_image = false\n[analyses.spine]\nkey_image = false\n[analyses.lung]\n"
        "[analyses.thyroid]\nkey_image = true\n"
    )
    site = load_config(toml)
    assert site.key_image_for("spine") is False and site.key_image_for("lung") is True
    assert site.key_image_for("parathyroid") is False and site.key_image_for("thyroid") is True


def test_reception_accepts_what_the_enabled_analyses_read(tmp_path: Path) -> None:
    from mibi_node.reception.contexts import MIBI_STORAGE_CLASSES, storage_sop_classes

    mr = "1.2.840.10008.5.1.4.1.1.4"
    plain = load_config(None)
    assert mr not in storage_sop_classes(False, plain.analysis_storage_classes())
    toml = tmp_path / "node.toml"
    toml.write_text("[analyses.spine]\n")
    spine = load_config(toml)
    accepted = storage_sop_classes(False, spine.analysis_storage_classes())
    assert accepted[: len(MIBI_STORAGE_CLASSES)] == MIBI_STORAGE_CLASSES and mr in accepted
    every = storage_sop_classes(True, spine.analysis_storage_classes())
    assert len(every) == len(set(every)) and mr in every  # listed once with accept_all_storage
    ct = "1.2.840.10008.5.1.4.1.1.2"
    assert ct not in storage_sop_classes(False, spine.analysis_storage_classes())
    toml.write_text("[analyses.lung]\n")
    assert ct in storage_sop_classes(False, load_config(toml).analysis_storage_classes())
