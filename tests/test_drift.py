"""Input drift (issue 19): a bundle's training input summary, each job's input summary and
the drift of each camera against the first.

Parathyroid phantoms make the training summary (through ``mibi-node bundle summarise``);
two cameras then send phantoms through the instance store (so reception records the
camera), the assembly queues their jobs and a real worker with a random-weight bundle runs
them and stores each job's inputs. One camera sends phantoms like the training ones, the
other phantoms of another matrix and three times the counts. The statistics are checked
against scipy's and numpy's on the same numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from pydicom.dataset import Dataset
from scipy.stats import ks_2samp
from sqlalchemy import select
from typer.testing import CliRunner

from bundles import random_bundle
from factory import CT_STORAGE, nm_dataset
from mibi_node.assembly.routing import route_stable_studies
from mibi_node.assembly.stability import mark_stable_studies
from mibi_node.cli import app
from mibi_node.config import Config
from mibi_node.inference.worker import Worker
from mibi_node.metrics import render_metrics
from mibi_node.phantom import CLASSES, PhantomConfig, make_study
from mibi_node.reception.validation import read_instance_meta
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import InstanceStore
from mibi_node.storage.models import Job, JobState, Study
from mibi_node.validation.drift import (
    PSI_FLOOR,
    SUMMARY_FILE,
    DriftError,
    drift_report,
    summarise_inputs,
)
from mibi_node.web import create_app

TRAINING_STUDIES = 20
CAMERA_STUDIES = 12
LIKE = "CAM-A / MIBI phantom / PHANTOM-0001"
DRIFTED = "CAM-B / MIBI phantom / PHANTOM-0001"
#: The drifted camera: a 256 matrix (half the pixel size) and three times the counts.
MORE_COUNTS = PhantomConfig(early_counts=(1.5e6, 3.0e6))


def _phantoms(seed: int, count: int, **kwargs: Any) -> list[tuple[Dataset, ...]]:
    return [
        make_study(CLASSES[i % len(CLASSES)], seed=seed, index=i, **kwargs).datasets
        for i in range(count)
    ]


def _store(store: InstanceStore, folder: Path, datasets: tuple[Dataset, ...], station: str) -> None:
    """Store a study's instances as reception does (the camera recorded on the study row)."""
    for ds in datasets:
        ds.StationName = station
        source = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(source, enforce_file_format=True)
        incoming = store.files.incoming / source.name
        shutil.copyfile(source, incoming)
        meta = read_instance_meta(incoming, ds.SOPClassUID, ds.SOPInstanceUID)
        store.store(incoming, meta, "GAMMA")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A node whose worker analysed 12 studies of each camera, and its bundle with the
    summary of 20 training phantoms."""
    root = tmp_path_factory.mktemp("drift")
    bundle = random_bundle(root / "bundle")
    training = root / "training"
    for index, datasets in enumerate(_phantoms(1, TRAINING_STUDIES)):
        folder = training / f"study-{index}"
        folder.mkdir(parents=True)
        for ds in datasets:
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    summarised = CliRunner().invoke(app, ["bundle", "summarise", str(bundle), str(training)])
    assert summarised.exit_code == 0, summarised.output
    assert f"{TRAINING_STUDIES} studies" in summarised.output
    config = Config.model_validate(
        {"node": {"data_dir": str(root / "var"), "host": "127.0.0.1"}, "web": {"port": 0},
         "workers": {"bundle": str(bundle), "device": "cpu"}, "jobs": {"batch_size": 32}}
    )  # fmt: skip
    worker = Worker(config, name="drift-test")
    store = InstanceStore(worker.database, worker.files)
    sent = root / "sent"
    sent.mkdir()
    for datasets in _phantoms(2, CAMERA_STUDIES):
        _store(store, sent, datasets, "CAM-A")
    for datasets in _phantoms(3, CAMERA_STUDIES, matrix=256, config=MORE_COUNTS):
        _store(store, sent, datasets, "CAM-B")
    mark_stable_studies(worker.database, 0.0)
    assert len(route_stable_studies(worker.database, worker.files, config.selections())) == 24
    assert worker.load_bundle(), worker.problems
    while worker.run_once():
        pass
    yield {"config": config, "database": worker.database, "bundle": bundle, "files": worker.files}
    worker.database.dispose()


def _jobs(node: Any) -> dict[str, list[Job]]:
    """Each camera's jobs, newest first (as the drift report takes them)."""
    jobs: dict[str, list[Job]] = {}
    with node["database"].session() as session:
        for job, station in session.execute(
            select(Job, Study.station_name).join(Study).order_by(Job.id.desc())
        ):
            jobs.setdefault(station, []).append(job)
            session.expunge(job)
    return jobs


def test_the_worker_stores_each_jobs_input_summary(node) -> None:
    jobs = _jobs(node)
    assert {station: len(rows) for station, rows in jobs.items()} == {"CAM-A": 12, "CAM-B": 12}
    files: FileStore = node["files"]
    with node["database"].session() as session:
        paths = {
            job.id: [files.absolute(i.path) for i in session.get_one(Study, job.study_id).instances]
            for rows in jobs.values()
            for job in rows
        }
    for station, rows in jobs.items():
        for job in rows:
            assert job.state is JobState.DONE and job.inputs is not None
            # What the worker stored is the summary of the study's stored files.
            assert job.inputs == summarise_inputs(paths[job.id])
            assert job.inputs["matrix"] == ("128x128" if station == "CAM-A" else "256x256")
            assert job.inputs["modality"] == "NM" and job.inputs["features"]["frames"] == 2


def test_a_camera_with_another_matrix_and_counts_is_flagged_and_a_like_one_is_not(node) -> None:
    [report] = drift_report(node["database"], node["config"])
    assert report.problem is None and report.reference_studies == TRAINING_STUDIES
    stations = {station.station: station for station in report.stations}
    assert set(stations) == {LIKE, DRIFTED}
    like, drifted = stations[LIKE], stations[DRIFTED]
    assert (like.studies, drifted.studies) == (CAMERA_STUDIES, CAMERA_STUDIES)
    assert not like.alarm and like.verdict in ("ok", "watch")
    assert not [f for f in like.features if f.verdict == "drift"]
    assert drifted.alarm and drifted.verdict == "drift"
    features = {f.feature: f for f in drifted.features}
    assert features["matrix"].verdict == "drift" and features["matrix"].statistic == 1.0
    assert features["matrix"].unseen == ("256x256",)
    assert features["pixel_size"].verdict == "drift" and features["pixel_size"].statistic == 1.0
    assert features["counts_per_frame"].verdict == "drift"
    assert features["modality"].verdict == "ok" and features["collimator"].verdict == "ok"

    # The statistics are scipy's KS test and the PSI over training's deciles.
    reference = json.loads((node["bundle"] / SUMMARY_FILE).read_text())
    counts = reference["features"]["counts_per_frame"]
    for station, jobs in _jobs(node).items():
        recent = [job.inputs["features"]["counts_per_frame"] for job in jobs]
        feature = next(
            f for f in stations[f"{station} / MIBI phantom / PHANTOM-0001"].features
            if f.feature == "counts_per_frame"
        )  # fmt: skip
        test = ks_2samp(counts["values"], recent)
        assert feature.ks_statistic == pytest.approx(test.statistic)
        assert feature.p_value == pytest.approx(test.pvalue)
        edges = [-np.inf, *counts["deciles"], np.inf]
        expected = np.maximum(
            np.histogram(counts["values"], edges)[0] / TRAINING_STUDIES, PSI_FLOOR
        )
        actual = np.maximum(np.histogram(recent, edges)[0] / len(recent), PSI_FLOOR)
        psi = float(np.sum((actual - expected) * np.log(actual / expected)))
        assert feature.statistic == pytest.approx(psi)
        assert feature.training_median == pytest.approx(np.median(counts["values"]))
    assert features["counts_per_frame"].p_value < 0.05 / len(
        [f for f in drifted.features if f.test == "psi+ks"]
    )


def test_too_few_studies_get_no_verdict(node) -> None:
    strict = node["config"].model_copy(
        update={"validation": node["config"].validation.model_copy(
            update={"drift_min_studies": CAMERA_STUDIES + 1})}
    )  # fmt: skip
    [report] = drift_report(node["database"], strict)
    assert {s.verdict for s in report.stations} == {"too few studies"}
    assert not any(s.alarm or s.features for s in report.stations)
    # The window takes each camera's latest studies.
    [report] = drift_report(node["database"], node["config"], window=5)
    assert {s.studies for s in report.stations} == {5}


def test_cli_rest_and_metrics_show_the_drift(node, tmp_path: Path) -> None:
    config, database = node["config"], node["database"]
    options = ["--data-dir", str(config.node.data_dir)]
    runner = CliRunner()
    bundle = node["bundle"]
    (tmp_path / "node.toml").write_text(
        f'[workers]\nbundle = "{bundle}"\n[node]\ndata_dir = "{config.node.data_dir}"\n'
    )
    shown = runner.invoke(app, ["drift", "--json", "-c", str(tmp_path / "node.toml")])
    assert shown.exit_code == 0, shown.output
    [printed] = json.loads(shown.output)
    alarms = {s["station"]: s["alarm"] for s in printed["stations"]}
    assert alarms == {LIKE: False, DRIFTED: True}
    table = runner.invoke(app, ["drift", "-c", str(tmp_path / "node.toml")])
    assert table.exit_code == 0 and "matrix drift (unseen 1.00)" in table.output
    unknown = runner.invoke(app, ["drift", "--analysis", "wrist", *options])
    assert unknown.exit_code == 2 and "unknown analysis 'wrist'" in unknown.output

    client = TestClient(
        create_app(config, database, lambda: True), base_url="http://127.0.0.1:8080"
    )
    answer = client.get("/api/drift", params={"analysis": "parathyroid"})
    assert answer.status_code == 200
    assert {s["station"]: s["alarm"] for s in answer.json()[0]["stations"]} == alarms
    assert client.get("/api/drift", params={"analysis": "wrist"}).status_code == 404
    assert client.get("/api/drift", params={"window": 0}).status_code == 422
    # The status page's Performance page shows the same verdicts per camera.
    shown_page = client.get("/performance", params={"analysis": "parathyroid", "resamples": 0})
    assert shown_page.status_code == 200
    for station, alarm in alarms.items():
        verdict = "drift" if alarm else "ok"
        assert f'data-station="{station}" data-verdict="{verdict}"' in shown_page.text
    web = config.web.model_copy(update={"token": SecretStr("s3cret")})
    guarded = TestClient(
        create_app(config.model_copy(update={"web": web}), database, lambda: True),
        base_url="http://127.0.0.1:8080",
    )
    assert guarded.get("/api/drift").status_code == 401
    assert guarded.get("/api/drift", headers={"Authorization": "Bearer s3cret"}).json() == [
        answer.json()[0]
    ]

    body, _ = render_metrics(database, config)
    text = body.decode()
    assert f'mibi_node_input_drift_alarm{{analysis="parathyroid",station="{DRIFTED}"}} 1.0' in text
    assert f'mibi_node_input_drift_alarm{{analysis="parathyroid",station="{LIKE}"}} 0.0' in text
    assert (
        f'mibi_node_input_drift{{analysis="parathyroid",feature="matrix",station="{DRIFTED}"}} 1.0'
        in text
    )


def test_a_bundle_without_a_usable_summary_is_named_not_raised(node, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(node["bundle"], bundle)
    config = node["config"].model_copy(
        update={"workers": node["config"].workers.model_copy(update={"bundle": bundle})}
    )
    (bundle / SUMMARY_FILE).unlink()
    [report] = drift_report(node["database"], config)
    assert report.stations == [] and "has no inputs.json" in (report.problem or "")
    (bundle / SUMMARY_FILE).write_text("{not json")
    [report] = drift_report(node["database"], config)
    assert "cannot read it" in (report.problem or "")

    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = runner.invoke(app, ["bundle", "summarise", str(bundle), str(empty)])
    assert refused.exit_code == 2 and "holds no DICOM image" in refused.output
    refused = runner.invoke(app, ["bundle", "summarise", str(empty), str(empty)])
    assert refused.exit_code == 2 and "not a model bundle" in refused.output


def test_a_long_series_is_sampled_and_rescaled(tmp_path: Path) -> None:
    slices = []
    for index in range(100):
        ds = nm_dataset(
            "1.2.3", frames=1, rows=16, columns=16, seed=index, sop_class_uid=CT_STORAGE
        )
        ds.Modality, ds.KVP, ds.ConvolutionKernel = "CT", "120", "B30f"
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        del ds.NumberOfFrames
        slices.append(ds)
    summary = summarise_inputs(slices)
    assert summary["sampled_instances"] == 32 and summary["features"]["frames"] == 100
    assert summary["modality"] == "CT" and "counts_per_frame" not in summary["features"]
    assert summary["settings"]["convolution_kernel"] == "B30f"
    assert summary["features"]["kvp"] == 120.0
    picked = [slices[round(i)] for i in np.linspace(0, 99, 32)]
    values = np.concatenate([ds.pixel_array.ravel().astype(float) - 1024 for ds in picked])
    assert summary["features"]["intensity_p50"] == pytest.approx(np.quantile(values, 0.5))
    assert sum(summary["histogram"]) == pytest.approx(1.0, abs=1e-4)

    report = Dataset()
    report.Modality, report.SOPClassUID = "SR", "1.2.840.10008.5.1.4.1.1.88.33"
    with pytest.raises(DriftError, match="none of the 1 instances is a readable image"):
        summarise_inputs([report])
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("no DICOM here")
    assert summarise_inputs([not_dicom, *slices[:3]])["sampled_instances"] == 3
