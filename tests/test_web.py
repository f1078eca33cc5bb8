"""The status page and REST API against a database filled through the node's own functions.

Studies are stored with the instance store, made stable and routed by the assembly code,
claimed, completed and failed through the job queue, and a delivery is tried against a port
where nothing listens. The pages are read with FastAPI's TestClient, and rendered by headless
Chromium from a real :class:`~mibi_node.web.WebServer` (skipped with the reason when Chromium
is not installed: ``scripts/install-peers.sh`` installs it).
"""

from __future__ import annotations

import io
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.uid import generate_uid

from factory import CT_STORAGE, nm_dataset, write
from mibi_node.assembly.routing import route_stable_studies
from mibi_node.assembly.stability import mark_stable_studies
from mibi_node.config import Config, DispatchConfig, RoutingConfig
from mibi_node.dispatch.deliveries import deliver
from mibi_node.errors import MibiNodeError
from mibi_node.imaging.nm import read_study
from mibi_node.inference.result import Focus, StudyResult
from mibi_node.jobs.queue import CompletedJob, claim_jobs, complete_job, fail_job
from mibi_node.phantom.generator import make_study
from mibi_node.storage.database import Database, open_database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import InstanceMeta, InstanceStore
from mibi_node.storage.models import AuditEvent, WorkerStatus, utcnow
from mibi_node.web import WebServer, create_app
from mibi_node.web.focus import FOCUS_COLOUR
from ports import free_port

TOKEN = "correct-horse-battery-staple"
CLASSES = ("normal", "adenoma", "hyperplasia", "carcinoma", "cyst")


@dataclass
class Filled:
    """A node's database with one study in each interesting state."""

    config: Config
    database: Database
    done: int
    failed: int
    ignored: int
    receiving: int
    done_uid: str
    instance_uids: list[str]
    patient_names: list[str]
    focus: Focus
    delivery_message: str


def _config(data_dir: Path, **web: object) -> Config:
    return Config.model_validate(
        {
            "node": {"data_dir": str(data_dir), "host": "127.0.0.1"},
            "storage": {"min_free_mb": 0},
            "web": {"port": 0, **web},
        }
    )


def _store(store: InstanceStore, folder: Path, ds: pydicom.Dataset, calling: str) -> None:
    source = write(ds, folder / f"{ds.SOPInstanceUID}.dcm")
    incoming = store.files.incoming / f"{ds.SOPInstanceUID}.part"
    shutil.copyfile(source, incoming)
    meta = InstanceMeta(
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        modality=str(ds.Modality),
        study_description=str(ds.get("StudyDescription", "")) or None,
    )
    store.store(incoming, meta, calling)


def _result(study_uid: str, paths: list[Path], focus: Focus) -> StudyResult:
    images = read_study(paths).images
    probabilities = dict(zip(CLASSES, (0.05, 0.81, 0.08, 0.03, 0.03), strict=True))
    return StudyResult(
        study_instance_uid=study_uid,
        probabilities=probabilities,
        predicted="adenoma",
        member_probabilities={
            "resnet10t": probabilities,
            "lite": dict(zip(CLASSES, (0.1, 0.2, 0.6, 0.05, 0.05), strict=True)),
        },
        agreement=0.5,
        normalised_entropy=0.41,
        focus=focus,
        source_images=images,
        timings={"denoise": 0.2},
        bundle_name="web-test",
        bundle_version="0.0.1",
    )


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    root = tmp_path_factory.mktemp("web")
    config = _config(root / "var")
    database = open_database(config.database_url)
    files = FileStore(config.store_dir)
    store = InstanceStore(database, files)
    adenoma = make_study("adenoma", seed=7, index=0)
    cyst = make_study("cyst", seed=7, index=1)
    for study in (adenoma, cyst):
        for ds in study.datasets:
            _store(store, root, ds, "GAMMA_CAM1")
    ct = nm_dataset(seed=3, sop_class_uid=CT_STORAGE)
    ct.Modality, ct.StudyDescription = "CT", "CHEST"
    _store(store, root, ct, "CT_SCANNER")
    mark_stable_studies(database, 0)
    route_stable_studies(database, files, RoutingConfig())
    first, second = claim_jobs(database, "worker-a", 60, 2)
    done, failed = (
        (first, second)
        if first.study_instance_uid == adenoma.study_instance_uid
        else (second, first)
    )
    lesion = adenoma.parameters.lesions[0]
    row, col = adenoma.pixel(lesion.x_mm, lesion.y_mm)
    focus = Focus(row=row, col=col, side=lesion.side, pole=lesion.pole)
    paths = [files.absolute(p) for p in done.paths]
    result = _result(done.study_instance_uid, paths, focus)
    destination = {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
    complete_job(
        database,
        "worker-a",
        done.id,
        CompletedJob(
            result=result.to_dict(),
            timings={"read": 0.25, "denoise": 0.5, "inference": 0.5, "sr": 0.25},
            bundle="web-test 0.0.1",
            sr_path="aa/sr.dcm",
            sr_sop_instance_uid=generate_uid(),
            sr_series_instance_uid=generate_uid(),
            files=("aa/sr.dcm",),
            destinations=(destination,),
        ),
    )
    # Any DICOM file stands in for the SR: the PACS port is closed, so it is never sent.
    (config.results_dir / "aa").mkdir(parents=True)
    write(nm_dataset(seed=5), config.results_dir / "aa" / "sr.dcm")
    [outcome] = deliver(
        database,
        config.results_dir,
        DispatchConfig(timeout=5),
        calling_ae_title="MIBI_NODE",
        owner="dispatch-test",
    )
    fail_job(
        database,
        "worker-a",
        failed.id,
        "The study holds no delayed image (checked by the test).",
        retry=False,
        max_attempts=3,
    )
    late = nm_dataset(seed=4)
    _store(store, root, late, "GAMMA_CAM2")
    with database.session() as session, session.begin():
        now = utcnow()
        session.add(
            WorkerStatus(
                name="worker-a",
                pid=11,
                device="cpu",
                bundle="web-test 0.0.1",
                state="ready",
                heartbeat_at=now,
            )
        )
        session.add(
            WorkerStatus(
                name="worker-gone",
                pid=12,
                device="cuda:1",
                state="busy",
                heartbeat_at=now - timedelta(minutes=10),
            )
        )
    ids = {uid: study_id for study_id, uid in _study_ids(database)}
    yield Filled(
        config=config,
        database=database,
        done=ids[adenoma.study_instance_uid],
        failed=ids[cyst.study_instance_uid],
        ignored=ids[str(ct.StudyInstanceUID)],
        receiving=ids[str(late.StudyInstanceUID)],
        done_uid=adenoma.study_instance_uid,
        instance_uids=[str(ds.SOPInstanceUID) for ds in adenoma.datasets],
        patient_names=sorted(
            {str(ds.PatientName) for s in (adenoma, cyst) for ds in s.datasets}
            | {str(ct.PatientName), str(late.PatientName)}
        ),
        focus=focus,
        delivery_message=outcome.message,
    )
    database.dispose()


def _study_ids(database: Database) -> list[tuple[int, str]]:
    with database.engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.exec_driver_sql("SELECT id, study_instance_uid FROM study")
        ]  # type: ignore[misc]


def _client(filled: Filled, config: Config | None = None, listening: bool = True) -> TestClient:
    app = create_app(config or filled.config, filled.database, lambda: listening)
    return TestClient(app, base_url="http://127.0.0.1:8080", follow_redirects=False)


def _audit(database: Database) -> list[tuple[str, str, str, int | None]]:
    with database.session() as session:
        return [
            (e.kind, e.outcome, e.actor, e.study_id)
            for e in session.query(AuditEvent).order_by(AuditEvent.id)
        ]


# -- pages ------------------------------------------------------------------------------------


def test_studies_page_shows_state_phases_result_sr_and_timings(filled: Filled) -> None:
    page = _client(filled).get("/studies")
    assert page.status_code == 200
    html = page.text
    for study_id in (filled.done, filled.failed, filled.ignored, filled.receiving):
        assert f'href="/studies/{study_id}"' in html
    for state in ("DONE", "FAILED", "IGNORED", "RECEIVING"):
        assert f">{state}<" in html
    assert "Adenoma</strong> 81.0 %" in html
    assert "early, delayed" in html  # the phases of the analysed study
    assert "pending" in html  # its SR is not delivered: the PACS port is closed
    assert "after the last image" in html and "analysis 1.5 s" in html
    assert "The study holds no delayed image" in html
    assert "modality CT" in html


def test_study_page_shows_instances_result_agreement_focus_and_deliveries(filled: Filled) -> None:
    page = _client(filled).get(f"/studies/{filled.done}")
    assert page.status_code == 200
    html = page.text
    assert filled.done_uid in html
    for uid in filled.instance_uids:
        assert uid in html
    assert "Nuclear Medicine Image Storage" in html
    # The bar chart: one bar per class, as wide as its probability.
    assert len(re.findall(r'<div class="bar"><div', html)) == 5
    assert 'class="top" style="width: 81.0%"' in html
    assert 'style="width: 8.0%"' in html
    assert "Member agreement: <strong>50.0 %</strong>" in html
    assert "<td>lite</td><td>Hyperplasia</td>" in html
    assert f'src="/studies/{filled.done}/focus.png"' in html
    assert f"patient's {filled.focus.side} {filled.focus.pole}" in html
    assert filled.delivery_message.startswith("connection refused by 127.0.0.1:")
    assert filled.delivery_message in html
    assert f'action="/studies/{filled.done}/requeue"' in html
    assert f'action="/studies/{filled.done}/resend"' in html
    assert "result done" not in html and "<td>result</td><td>done</td>" in html  # audit rows


def test_failed_study_page_shows_the_error(filled: Filled) -> None:
    html = _client(filled).get(f"/studies/{filled.failed}").text
    assert "The study holds no delayed image (checked by the test)." in html
    assert "No result yet." in html
    assert _client(filled).get("/studies/99999").status_code == 404


def test_focus_png_marks_the_focus_where_the_result_put_it(filled: Filled) -> None:
    response = _client(filled).get(f"/studies/{filled.done}/focus.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(int)
    red = np.all(np.abs(image - np.array(FOCUS_COLOUR)) < 40, axis=2)
    assert red.sum() > 100
    rows, cols = np.nonzero(red)
    side = 128  # the phantom's matrix: the picture is 384 px wide, 3 px per pixel
    scale = 384 / side
    assert rows.mean() == pytest.approx((filled.focus.row + 0.5) * scale, abs=4)
    assert cols.mean() == pytest.approx((filled.focus.col + 0.5) * scale, abs=4)
    # A study the reader cannot use answers 404 with the reader's sentence.
    missing = _client(filled).get(f"/studies/{filled.ignored}/focus.png")
    assert missing.status_code == 404 and "no NM or Secondary Capture images" in missing.text


def test_workers_page_marks_the_stale_worker(filled: Filled) -> None:
    html = _client(filled).get("/workers").text
    assert "worker-a" in html and "worker-gone" in html and "cuda:1" in html
    assert html.count("stale (gone?)") == 1
    gone = html[html.index("worker-gone") :]
    assert "stale (gone?)" in gone[: gone.index("</tr>")]


def test_deliveries_config_and_audit_pages(filled: Filled) -> None:
    client = _client(filled)
    deliveries = client.get("/deliveries").text
    assert "PACS@127.0.0.1" in deliveries and filled.delivery_message in deliveries
    assert f'href="/studies/{filled.done}"' in deliveries
    secret = _config(filled.config.node.data_dir, token=TOKEN, host="127.0.0.1")
    config_page = (
        _client(filled, secret).get("/config", headers={"Authorization": f"Bearer {TOKEN}"}).text
    )
    assert "[web]" in config_page and "********" in config_page and TOKEN not in config_page
    audit = client.get("/audit").text
    assert "worker-a" in audit and "<td>delivery</td>" in audit and "<td>result</td>" in audit


def test_api_returns_the_same_data_as_json(filled: Filled) -> None:
    client = _client(filled)
    studies = {s["id"]: s for s in client.get("/api/studies").json()}
    done = studies[filled.done]
    assert done["state"] == "DONE" and done["predicted"] == "adenoma"
    assert done["probability"] == pytest.approx(0.81)
    assert done["sr"] == "pending" and done["phases"] == ["early", "delayed"]
    assert studies[filled.failed]["state"] == "FAILED"
    detail = client.get(f"/api/studies/{filled.done}").json()
    assert detail["result"]["agreement"] == 0.5
    assert sorted(i["sop_instance_uid"] for i in detail["instances"]) == sorted(
        filled.instance_uids
    )
    assert detail["deliveries"][0]["last_message"] == filled.delivery_message
    assert client.get("/api/studies/99999").status_code == 404
    workers = {w["name"]: w for w in client.get("/api/workers").json()}
    assert workers["worker-gone"]["stale"] is True and workers["worker-a"]["stale"] is False
    assert client.get("/api/deliveries").json()["open"][0]["state"] == "PENDING"
    assert client.get("/api/config").json()["node"]["ae_title"] == "MIBI_NODE"
    kinds = {row["kind"] for row in client.get("/api/audit").json()}
    assert {"result", "delivery"} <= kinds


# -- buttons ----------------------------------------------------------------------------------


def test_requeue_and_resend_buttons_act_and_write_the_audit_trail(filled: Filled) -> None:
    client = _client(filled)
    origin = {"Origin": "http://127.0.0.1:8080"}
    before = len(_audit(filled.database))
    resent = client.post(f"/studies/{filled.done}/resend", headers=origin)
    assert resent.status_code == 303
    assert resent.headers["location"] == f"/studies/{filled.done}?notice=resent&count=1"
    assert "1 delivery(ies) due now" in client.get(resent.headers["location"]).text
    requeued = client.post(f"/studies/{filled.failed}/requeue", headers=origin)
    assert requeued.status_code == 303
    assert "Queued again as job #" in client.get(requeued.headers["location"]).text
    trail = _audit(filled.database)[before:]
    assert ("operator", "resend", "web", filled.done) in trail
    assert ("operator", "requeue", "web", filled.failed) in trail
    # Refusals show the queue's own sentence, and change nothing.
    refused = client.post(f"/studies/{filled.receiving}/requeue", headers=origin)
    assert refused.status_code == 409
    assert "Not queued again: the study is receiving" in refused.text
    nothing = client.post(f"/studies/{filled.receiving}/resend", headers=origin)
    assert nothing.status_code == 409 and "has no result yet" in nothing.text
    assert len(_audit(filled.database)) == before + 2
    api = client.post(f"/api/studies/{filled.ignored}/resend")
    assert api.status_code == 409 and "no result" in api.json()["error"]
    assert client.post("/studies/99999/requeue", headers=origin).status_code == 404


def test_a_form_sent_from_another_site_is_refused(filled: Filled) -> None:
    client = _client(filled)
    before = len(_audit(filled.database))
    evil = client.post(f"/studies/{filled.done}/resend", headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403
    assert len(_audit(filled.database)) == before
    # Without a token the node answers only to loopback names (no DNS rebinding).
    rebound = client.get("/studies", headers={"Host": "evil.example:8080"})
    assert rebound.status_code == 403
    assert client.get("/healthz", headers={"Host": "evil.example:8080"}).status_code == 200


# -- the token --------------------------------------------------------------------------------


def test_token_is_required_on_every_page_and_api_but_health(filled: Filled) -> None:
    config = _config(filled.config.node.data_dir, token=TOKEN, host="0.0.0.0")
    client = _client(filled, config)
    paths = [
        "/studies",
        f"/studies/{filled.done}",
        f"/studies/{filled.done}/focus.png",
        "/workers",
        "/deliveries",
        "/config",
        "/audit",
    ]
    api = [
        "/api/studies",
        f"/api/studies/{filled.done}",
        "/api/workers",
        "/api/deliveries",
        "/api/config",
        "/api/audit",
    ]
    for path in paths + api:
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, (
            path
        )
    assert client.get("/api/studies").headers["www-authenticate"] == "Bearer"
    assert 'name="token"' in client.get("/studies").text  # the sign-in form
    wrong = client.get("/studies?token=guess&x=1")
    assert (
        wrong.status_code == 401
        and "guess" not in wrong.text
        and 'value="/studies?x=1"' in wrong.text
    )
    assert client.post(f"/studies/{filled.done}/resend").status_code == 401
    # Health and metrics stay open (no 401) for monitoring.
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code in (200, 503)
    assert client.get("/metrics").status_code != 401
    # With a token, any Host is fine (a reverse proxy may pass its own name).
    assert (
        client.get(
            "/studies",
            headers={"Host": "node.hospital.example", "Authorization": f"Bearer {TOKEN}"},
        ).status_code
        == 200
    )


def test_token_in_the_query_becomes_a_cookie_and_leaves_the_address(filled: Filled) -> None:
    config = _config(filled.config.node.data_dir, token=TOKEN, host="0.0.0.0")
    client = _client(filled, config)
    first = client.get(f"/studies?token={TOKEN}")
    assert first.status_code == 303 and first.headers["location"] == "/studies"
    cookie = first.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert TOKEN not in cookie  # the cookie holds an HMAC of the token
    assert client.get("/studies").status_code == 200  # the client kept the cookie
    client.cookies.clear()
    assert client.get("/studies").status_code == 401
    client.cookies.set("mibi_node_token", "forged")
    assert client.get("/studies").status_code == 401
    client.cookies.clear()
    # The sign-in form.
    wrong = client.post(
        "/login",
        content="token=nope&target=%2Fworkers",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert wrong.status_code == 401 and "not the node" in wrong.text
    right = client.post(
        "/login",
        content=f"token={TOKEN}&target=%2Fworkers",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert right.status_code == 303 and right.headers["location"] == "/workers"
    assert client.get("/workers").status_code == 200
    away = client.post(
        "/login",
        content=f"token={TOKEN}&target=https://evil.example/",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert away.headers["location"] == "/studies"
    # The API takes the query token too, without a redirect.
    client.cookies.clear()
    assert client.get(f"/api/workers?token={TOKEN}").status_code == 200


# -- health -----------------------------------------------------------------------------------


def test_healthz_and_readyz_when_everything_works(filled: Filled) -> None:
    client = _client(filled)
    assert client.get("/healthz").json()["status"] == "alive"
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.json()
    body = ready.json()
    assert body["ready"] is True and body["failed"] == []
    assert set(body["checks"]) == {"database", "listener", "workers", "disk"}
    assert "worker-a" in body["checks"]["workers"]["detail"]


def test_readyz_says_which_check_failed_and_why(tmp_path: Path) -> None:
    config = Config.model_validate(
        {"node": {"data_dir": str(tmp_path / "var")}, "storage": {"min_free_mb": 10**9}}
    )
    database = open_database(config.database_url)
    try:
        client = TestClient(create_app(config, database, lambda: False))
        body = client.get("/readyz").json()
        assert client.get("/readyz").status_code == 503
        assert sorted(body["failed"]) == ["disk", "listener", "workers"]
        assert (
            body["checks"]["workers"]["detail"] == "no worker has reported yet (workers.count = 1)"
        )
        assert "does not accept associations" in body["checks"]["listener"]["detail"]
        assert "storage.min_free_mb = 1000000000" in body["checks"]["disk"]["detail"]
        assert body["checks"]["database"]["ok"] is True
        # A worker that stopped reporting ...
        with database.session() as session, session.begin():
            session.add(
                WorkerStatus(
                    name="w1", pid=1, state="ready", heartbeat_at=utcnow() - timedelta(seconds=300)
                )
            )
        detail = client.get("/readyz").json()["checks"]["workers"]["detail"]
        assert detail.startswith("no worker heartbeat in the last 60 s (latest: w1, ready, 30")
        # ... one that has no bundle ...
        with database.session() as session, session.begin():
            worker = session.get_one(WorkerStatus, "w1")
            worker.heartbeat_at, worker.state, worker.message = (
                utcnow(),
                "waiting for a bundle",
                "no model bundle at /x",
            )
        detail = client.get("/readyz").json()["checks"]["workers"]["detail"]
        assert detail == "w1 is waiting for a bundle: no model bundle at /x"
        # ... and one that works.
        with database.session() as session, session.begin():
            session.get_one(WorkerStatus, "w1").state = "busy"
        assert client.get("/readyz").json()["checks"]["workers"]["ok"] is True
    finally:
        database.dispose()


def test_readyz_fails_while_the_database_cannot_be_written(tmp_path: Path) -> None:
    config = Config.model_validate(
        {
            "node": {"data_dir": str(tmp_path / "var")},
            "storage": {"min_free_mb": 0},
            "workers": {"count": 0},
        }
    )
    database = open_database(config.database_url)
    app = create_app(config, database, lambda: True)
    app.state.readiness.database_timeout = 0.5
    client = TestClient(app)
    assert client.get("/readyz").status_code == 200
    holder = sqlite3.connect(str(config.node.data_dir / "mibi-node.sqlite3"), timeout=1)
    holder.isolation_level = None
    holder.execute("BEGIN EXCLUSIVE")  # another writer holds the database
    try:
        answer = client.get("/readyz")
        assert answer.status_code == 503
        assert answer.json()["failed"] == ["database"]
        assert "no write within 0.5 s" in answer.json()["checks"]["database"]["detail"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    deadline = time.monotonic() + 30
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the database check did not recover"
        time.sleep(0.2)
    app.state.readiness.close()
    database.dispose()


def test_metrics_route_is_mounted(filled: Filled) -> None:
    answer = _client(filled).get("/metrics")
    try:
        import mibi_node.metrics  # noqa: F401
    except ImportError:
        assert answer.status_code == 501
    else:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")


# -- no patient name in any URL -----------------------------------------------------------------


def crawl(get: Callable[[str], Any], start: str = "/studies") -> dict[str, str]:
    """Every address reachable from ``start`` by links, images and forms: URL -> page.

    Links and images are fetched (GET, each must answer 200); form actions are only
    collected (their page is ``""``), as they would act when posted.
    """
    pages: dict[str, str] = {}
    queue = [start]
    while queue:
        url = queue.pop()
        if url in pages:
            continue
        answer = get(url)
        assert answer.status_code == 200, url
        html = answer.text if answer.headers["content-type"].startswith("text/html") else ""
        pages[url] = html
        for kind, link in re.findall(r'(href|src|action)="([^"]*)"', html):
            target = urlsplit(urljoin("http://node" + url, link))
            if target.netloc != "node":
                continue
            address = target.path + (f"?{target.query}" if target.query else "")
            if kind == "action":
                pages.setdefault(address, "")
            else:
                queue.append(address)
    return pages


def check_no_patient_name(pages: dict[str, str], patient_names: list[str]) -> None:
    """No page and no address holds a patient's name (whole, or any of its parts)."""
    parts = [part for name in patient_names for part in name.split("^") if part]
    assert parts
    for url, html in pages.items():
        for name in patient_names:
            assert name not in html and name.replace("^", " ") not in html, url
        for part in parts:
            assert part.upper() not in url.upper(), url


def test_no_patient_name_in_any_url_or_page(filled: Filled) -> None:
    pages = crawl(_client(filled).get)
    assert any(url.endswith("/requeue") for url in pages)  # the buttons' addresses too
    assert any(url.endswith("/focus.png") for url in pages)
    assert len(pages) >= 10, sorted(pages)  # every page and every study was visited
    check_no_patient_name(pages, filled.patient_names)
    with pytest.raises(AssertionError):  # the check itself can fail
        check_no_patient_name({"/studies?name=Doe": ""}, ["DOE^JANE"])


# -- the server and the browser ---------------------------------------------------------------


def test_web_server_listens_on_a_free_port_and_stops(filled: Filled) -> None:
    import httpx

    server = WebServer(filled.config, filled.database, lambda: True)
    server.start()
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/"
        assert httpx.get(f"{server.url}healthz", timeout=5).json()["status"] == "alive"
        busy = WebServer(
            _config(filled.config.node.data_dir, port=server.port), filled.database, lambda: True
        )
        with pytest.raises(MibiNodeError, match=f"cannot listen on 127.0.0.1:{server.port}"):
            busy.start()
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=2)


def test_the_web_package_does_not_import_torch() -> None:
    code = "import sys, mibi_node.web, mibi_node.web.server; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def chromium_path() -> str:
    """The Chromium binary, or skip the test with the reason."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium is not installed: run scripts/install-peers.sh (needs root)")


def screenshot(url: str, out: Path, size: tuple[int, int] = (1280, 1000)) -> np.ndarray:
    """Render ``url`` in headless Chromium to ``out`` (PNG); returns its RGB pixels."""
    browser = chromium_path()
    profile = out.parent / f"{out.stem}-profile"
    run = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",  # tests run as root in CI
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
            f"--screenshot={out}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.is_file(), (
        f"chromium wrote no screenshot (exit {run.returncode}): {run.stderr[-2000:]}"
    )
    shutil.rmtree(profile, ignore_errors=True)
    image = Image.open(out)
    assert image.format == "PNG" and image.size == size
    return np.asarray(image.convert("RGB")).astype(int)


def has_colour(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 12) -> int:
    """How many pixels are within ``tolerance`` of ``colour`` in every channel."""
    return int(np.all(np.abs(pixels - np.array(colour)) <= tolerance, axis=2).sum())


def check_not_blank(pixels: np.ndarray) -> None:
    """A rendered page: many colours (text, tables), the header's blue bar, not one colour."""
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    assert has_colour(pixels, (0x1F, 0x3A, 0x5F)) > 20000  # the header bar


@pytest.mark.slow
def test_every_page_renders_in_chromium(filled: Filled, tmp_path: Path) -> None:
    chromium_path()
    config = _config(filled.config.node.data_dir, token=TOKEN)
    server = WebServer(config, filled.database, lambda: True)
    server.start()
    try:
        pages = {
            "studies": "studies",
            "study": f"studies/{filled.done}",
            "failed": f"studies/{filled.failed}",
            "workers": "workers",
            "deliveries": "deliveries",
            "config": "config",
            "audit": "audit",
        }
        shots = {}
        for name, path in pages.items():
            # The query token signs the browser in: a cookie, then the page itself.
            shots[name] = screenshot(f"{server.url}{path}?token={TOKEN}", tmp_path / f"{name}.png")
            check_not_blank(shots[name])
        # The study page shows the focus picture (its red circle) and the probability bars.
        assert has_colour(shots["study"], FOCUS_COLOUR, 30) > 50
        assert has_colour(shots["study"], (0xDD, 0x6B, 0x20)) > 500  # the predicted class's bar
        assert has_colour(shots["failed"], FOCUS_COLOUR, 30) == 0
        # Without the token the browser gets the sign-in page, not the data.
        login = screenshot(f"{server.url}studies", tmp_path / "login.png")
        check_not_blank(login)
        assert has_colour(login, (0xC6, 0xF6, 0xD5)) == 0  # no green DONE badge
    finally:
        server.stop()
