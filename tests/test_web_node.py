"""The status page of a real node: a phantom study analysed end to end, then its pages.

``mibi-node serve`` runs with a worker and a small random-weight bundle, DCMTK storescp is the
PACS and storescu the gamma camera. Once the SR is in the PACS, the pages and the API must show
it, headless Chromium must render every page, no address may carry the patient's name, and
the requeue and resend buttons must act (a second version reaches the PACS) and be audited.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pydicom
import pytest

from bundles import random_bundle
from mibi_node.phantom.generator import generate_studies
from mibi_node.web.focus import FOCUS_COLOUR
from node import NodeProcess, storescu
from test_pipeline import StoreSCP
from test_web import check_no_patient_name, check_not_blank, crawl, has_colour, screenshot

pytestmark = [pytest.mark.peers, pytest.mark.slow]

TOKEN = "status-page-token-for-the-test"


def _wait(condition: Callable[[], object], timeout: float, what: str, node: NodeProcess) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n--- node log ---\n{node.log()[-6000:]}")


def test_status_page_of_a_node_that_analysed_a_study(
    node_factory, require_tool, tmp_path: Path
) -> None:
    require_tool("storescu")
    require_tool("storescp")
    bundle = random_bundle(tmp_path)
    [study] = generate_studies(tmp_path / "phantoms", 1, seed=23, classes=("adenoma",))
    header = pydicom.dcmread(study.paths[0], stop_before_pixels=True)
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        node = node_factory(
            {
                "workers": {
                    "count": 1,
                    "device": "cpu",
                    "bundle": str(bundle),
                    "poll_seconds": 0.1,
                },
                "dispatch": {
                    "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
                    "initial_backoff_seconds": 0.5,
                    "max_backoff_seconds": 1.0,
                },
                "jobs": {"lease_seconds": 3},
                "web": {"port": 0, "token": TOKEN},
            }
        )
        found = _wait(
            lambda: re.search(r"status page on (http://\S+/) \(token required\)", node.log()),
            30,
            "the status page",
            node,
        )
        url = found.group(1)  # type: ignore[attr-defined]
        assert storescu(node.port, list(study.paths), calling="GAMMA_CAM1").returncode == 0
        _wait(
            lambda: node.query("SELECT state FROM delivery") == [("DONE",)],
            120,
            "the SR in the PACS",
            node,
        )
        client = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        )

        # The node is ready: database, listener, a live worker, disk.
        ready = _wait(lambda: client.get("/readyz").status_code == 200, 30, "/readyz", node)
        assert ready
        assert client.get("/studies", headers={"Authorization": "Bearer wrong"}).status_code == 401

        # The API and the pages show the analysed study.
        [row] = client.get("/api/studies").json()
        assert row["state"] == "DONE" and row["sr"] == "delivered"
        assert row["study_instance_uid"] == str(header.StudyInstanceUID)
        assert row["phases"] == ["early", "delayed"] and row["phases_from"] == "analysis"
        detail = client.get(f"/api/studies/{row['id']}").json()
        result = detail["result"]
        assert result["predicted"] == row["predicted"]
        assert row["probability"] == pytest.approx(max(result["probabilities"].values()))
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert {m[0] for m in result["members"]} == {"resnet10t", "lite"}
        [delivery] = detail["deliveries"]
        assert delivery["state"] == "DONE" and delivery["last_message"] == "stored (status 0x0000)"
        html = client.get(f"/studies/{row['id']}").text
        assert f"{100 * row['probability']:.1f} %" in html
        assert result["predicted"].capitalize() in html
        assert f"PACS@127.0.0.1:{pacs.port}" in html and "stored (status 0x0000)" in html
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in study.paths):
            assert str(ds.SOPInstanceUID) in html
        focus = client.get(f"/studies/{row['id']}/focus.png")
        assert focus.status_code == 200 and focus.content.startswith(b"\x89PNG")
        [worker] = client.get("/api/workers").json()
        assert worker["device"] == "cpu" and worker["bundle"] == "pipeline-test 0.0.1"
        assert not worker["stale"]
        assert worker["name"] in client.get("/workers").text
        assert "<td>result</td><td>done</td>" in client.get("/audit").text
        config = client.get("/config").text
        assert "********" in config and TOKEN not in config

        # No address and no page carries the patient's name.
        pages = crawl(client.get)
        assert f"/studies/{row['id']}/resend" in pages
        check_no_patient_name(pages, [str(header.PatientName)])

        # Every page renders in a real browser (the query token signs it in).
        for name in ("studies", f"studies/{row['id']}", "workers", "deliveries", "config", "audit"):
            shot = screenshot(
                f"{url}{name}?token={TOKEN}", tmp_path / f"{name.replace('/', '-')}.png"
            )
            check_not_blank(shot)
            if name.startswith("studies/") and detail["result"]["focus"]:
                assert has_colour(shot, FOCUS_COLOUR, 30) > 50

        # The buttons act, and the audit trail says who pressed them.
        pressed = client.post(f"/studies/{row['id']}/requeue")
        assert pressed.status_code == 303
        _wait(
            lambda: (
                node.query(
                    "SELECT job.version, delivery.state FROM delivery JOIN job ON job.id = delivery.job_id ORDER BY job.version"
                )
                == [(1, "DONE"), (2, "DONE")]
            ),
            120,
            "version 2 in the PACS",
            node,
        )
        assert pacs.modalities() == ["OT", "OT", "SR", "SR"]  # each version's SR and key image
        sent_at = "SELECT delivery.state, delivery.delivered_at FROM delivery JOIN job ON job.id = delivery.job_id WHERE job.version = 2"
        [(_, first_sent)] = node.query(sent_at)
        assert client.post(f"/studies/{row['id']}/resend").status_code == 303
        assert node.query(
            "SELECT kind, outcome, actor FROM audit_event WHERE kind = 'operator' ORDER BY id"
        ) == [
            ("operator", "requeue", "web"),
            ("operator", "resend", "web"),
        ]
        _wait(
            lambda: (lambda rows: rows[0][0] == "DONE" and rows[0][1] != first_sent)(
                node.query(sent_at)
            ),
            60,
            "the resent SR acknowledged",
            node,
        )
        client.close()
    finally:
        pacs.stop()
    port = int(url.rsplit(":", 1)[1].strip("/"))
    node.stop()
    with pytest.raises(OSError):  # the status page stopped with the node
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
