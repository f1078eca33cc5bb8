"""Verdicts on the study page and the performance page (issue 19), against a fresh SQLite
database filled as ``tests/test_validation.py`` fills it: real NM files in the instance
store (their headers carry the camera), DONE jobs whose results each analysis' own result
class made, served by a real :class:`~mibi_node.web.WebServer`.

Chromium is driven as ``tests/test_web.py`` drives it, from its command line (``--dump-dom``,
``--screenshot``), which cannot press a button. So a form is sent as the browser sends it:
its fields and the pressed button's name and value are read from the form Chromium rendered,
urlencoded, with the page's Origin, to the running server; Chromium then renders the page
with the recorded verdict.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from mibi_node.analyses.registry import get_analysis
from mibi_node.analyses.spine.levels import LEVELS
from mibi_node.config import Config
from mibi_node.storage.database import Database, open_database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import InstanceStore
from mibi_node.storage.models import AuditEvent, Job, JobState, Study, Truth, Verdict
from mibi_node.validation.performance import performance
from mibi_node.validation.truth import import_truth
from mibi_node.validation.verdicts import record_verdict
from mibi_node.web import WebServer, create_app
from test_validation import CASES, _parathyroid, _spine, _store_study, _truth_csv
from test_web import check_not_blank, chromium_path, has_colour, screenshot

#: The reliability plot's line and the predicted class's bar on the pages (#dd6b20).
ORANGE = (0xDD, 0x6B, 0x20)


@dataclass
class Node:
    """A node's database with assessed and unassessed studies, and the study ids."""

    config: Config
    database: Database
    files: FileStore
    #: Per entry of ``CASES``: uid, accession, job (version 1), study id, truth.
    studies: list[dict[str, Any]]
    spine_study: int
    spine_job: int
    #: The first study's second version (same result) and a shadow job of the second study.
    second_version: int
    shadow_job: int


def _add_job(
    database: Database, uid: str, analysis: str, result: dict[str, Any], **columns: Any
) -> tuple[int, int]:
    """A DONE job of the study ``uid``; returns (study id, job id)."""
    with database.session() as session, session.begin():
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        job = Job(
            study_id=study.id, analysis=analysis, state=JobState.DONE, result=result, **columns
        )
        session.add(job)
        session.flush()
        return study.id, job.id


@pytest.fixture
def node(data_dir: Path, tmp_path: Path) -> Iterator[Node]:
    config = Config.model_validate(
        {
            "node": {"data_dir": str(data_dir), "host": "127.0.0.1"},
            "storage": {"min_free_mb": 0},
            "web": {"port": 0},
        }
    )
    database = open_database(config.database_url)
    files = FileStore(config.store_dir)
    store = InstanceStore(database, files)
    studies = []
    for probabilities, truth, station in CASES:
        uid, accession = _store_study(store, tmp_path / "in", station, "GAMMA1")
        result = _parathyroid(uid, probabilities).to_dict()
        study_id, job = _add_job(database, uid, "parathyroid", result)
        studies.append({"uid": uid, "accession": accession, "job": job, "study": study_id,
                        "truth": truth, "result": result})  # fmt: skip
    spine_uid, _ = _store_study(store, tmp_path / "in", "MR1", "MRI")
    spine_study, spine_job = _add_job(database, spine_uid, "spine", _spine().to_dict())
    first, second = studies[0], studies[1]
    _, second_version = _add_job(database, first["uid"], "parathyroid", first["result"], version=2)
    _, shadow = _add_job(database, second["uid"], "parathyroid", second["result"], shadow=True)
    yield Node(config, database, files, studies, spine_study, spine_job, second_version, shadow)
    database.dispose()


@pytest.fixture
def server(node: Node) -> Iterator[WebServer]:
    running = WebServer(node.config, node.database, lambda: True)
    running.start()
    yield running
    running.stop()


def _client(node: Node) -> TestClient:
    app = create_app(node.config, node.database, lambda: True)
    return TestClient(app, base_url="http://127.0.0.1:8080", follow_redirects=False)


def _verdicts(database: Database) -> list[tuple[int, str, str, str | None, str, str | None]]:
    with database.session() as session:
        return [
            (r.job_id, r.finding, r.decision.value, r.value, r.reader, r.comment)
            for r in session.scalars(select(Verdict).order_by(Verdict.id))
        ]


def _verdict_audit(database: Database) -> list[tuple[str, str, dict[str, Any]]]:
    with database.session() as session:
        return [
            (e.outcome, e.actor, dict(e.detail or {}))
            for e in session.scalars(
                select(AuditEvent).where(AuditEvent.kind == "verdict").order_by(AuditEvent.id)
            )
        ]


# -- the browser -------------------------------------------------------------------------------


def dump_dom(url: str, folder: Path) -> str:
    """The DOM headless Chromium builds for ``url`` (as ``test_web.screenshot`` runs it)."""
    profile = folder / "dom-profile"
    run = subprocess.run(
        [
            chromium_path(),
            "--headless",
            "--no-sandbox",  # tests run as root in CI
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    shutil.rmtree(profile, ignore_errors=True)
    assert run.returncode == 0 and "<html" in run.stdout, run.stderr[-2000:]
    return run.stdout


@dataclass
class Form:
    """One rendered form: where it posts, its fields with their values, its buttons."""

    action: str
    method: str
    fields: dict[str, str] = field(default_factory=dict)
    #: select name -> option values.
    options: dict[str, list[str]] = field(default_factory=dict)
    #: (name, value, text) of each submit button.
    buttons: list[tuple[str, str, str]] = field(default_factory=list)


class _Forms(HTMLParser):
    """Every form of a page, as a browser would submit it."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []
        self._select: str | None = None
        self._button: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append(Form(a.get("action", ""), a.get("method", "get").lower()))
        elif not self.forms:
            return
        elif tag == "input" and a.get("name") and a.get("type") != "file":
            self.forms[-1].fields[a["name"]] = a.get("value", "")
        elif tag == "select":
            self._select = a.get("name", "")
            self.forms[-1].options[self._select] = []
        elif tag == "option" and self._select is not None:
            self.forms[-1].options[self._select].append(a.get("value", ""))
        elif tag == "button":
            self._button = [a.get("name", ""), a.get("value", ""), ""]

    def handle_data(self, data: str) -> None:
        if self._button is not None:
            self._button[2] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "select" and self._select is not None:
            values = self.forms[-1].options[self._select]
            self.forms[-1].fields[self._select] = values[0] if values else ""
            self._select = None
        elif tag == "button" and self._button is not None:
            self.forms[-1].buttons.append((self._button[0], self._button[1], self._button[2]))
            self._button = None


def forms_of(html: str, action: str) -> list[Form]:
    parser = _Forms()
    parser.feed(html)
    return [f for f in parser.forms if f.action == action]


def press(
    client: httpx.Client, page_url: str, form: Form, button: str, **typed: str
) -> httpx.Response:
    """Submit ``form`` as a browser does when ``button`` (its text) is pressed after the user
    typed ``typed`` into its fields: urlencoded, with the page's Origin and Referer."""
    [(name, value, _)] = [b for b in form.buttons if b[2].strip() == button]
    unknown = set(typed) - set(form.fields)
    assert not unknown, f"the form has no field {unknown}"
    for menu, choices in form.options.items():
        assert typed.get(menu, "") in choices, f"{typed.get(menu)!r} is not offered"
    body = {**form.fields, **typed, name: value}
    origin = re.match(r"https?://[^/]+", page_url)
    assert origin is not None
    return client.post(
        urljoin(page_url, form.action),
        data=body,
        headers={"Origin": origin.group(0), "Referer": page_url},
    )


# -- verdicts from the study page ----------------------------------------------------------------


def test_verdicts_from_the_study_page_forms_land_in_the_database_and_audit(
    node: Node, server: WebServer, tmp_path: Path
) -> None:
    page_url = f"{server.url}studies/{node.spine_study}"
    html = dump_dom(page_url, tmp_path)
    findings = get_analysis("spine").findings(_spine().to_dict())
    forms = forms_of(html, f"/studies/{node.spine_study}/verdicts")
    assert [f.fields["finding"] for f in forms] == [f.key for f in findings], html[:3000]
    for form in forms:
        assert form.method == "post" and form.fields["job"] == str(node.spine_job)
        assert [b[2].strip() for b in form.buttons] == ["Accept", "Reject", "Correct"]
    # The correction offers the finding's other classes, not the model's own.
    judged = findings[1]
    assert forms[1].options["value"] == ["", *(c for c in judged.choices if c != judged.value)]
    assert "none yet" in html and "Findings" in html

    with httpx.Client(timeout=30) as browser:
        accepted = press(browser, page_url, forms[0], "Accept", reader="Dr Rossi")
        assert accepted.status_code == 303, accepted.text
        target = f"/studies/{node.spine_study}?notice=verdict&job={node.spine_job}"
        assert accepted.headers["location"] == f"{target}#job-{node.spine_job}"
        back = browser.get(urljoin(page_url, accepted.headers["location"]))
        assert back.status_code == 200
        assert f"Verdict on job #{node.spine_job} recorded." in back.text
        # The next form is prefilled with the reader's name (a cookie of this browser).
        [prefilled] = [
            f for f in forms_of(back.text, forms[1].action) if f.fields["finding"] == judged.key
        ]
        assert prefilled.fields["reader"] == "Dr Rossi"
        corrected = press(browser, page_url, prefilled, "Correct", value="normal",
                          comment="endplate only")  # fmt: skip
        assert corrected.status_code == 303, corrected.text
        # A refusal is shown on the page, in words, and records nothing.
        refused = press(browser, page_url, prefilled, "Correct")
        assert refused.status_code == 422 and "Traceback" not in refused.text
        reason = (
            "Verdict not recorded: Argument &#34;value&#34; should give the right value (one of "
        )
        assert f'class="error" role="alert">{reason}' in refused.text, refused.text
        # A form naming another study's job (crafted) is refused.
        other = {**prefilled.fields, "job": str(node.studies[0]["job"])}
        crafted = Form(prefilled.action, "post", other, prefilled.options, prefilled.buttons)
        elsewhere = press(browser, page_url, crafted, "Accept")
        assert elsewhere.status_code == 422
        assert (
            f"job #{node.studies[0]['job']} is not an analysis of study #{node.spine_study}"
            in elsewhere.text
        )
        # A page of another site cannot post the form.
        sent = {**forms[2].fields, "reader": "x", "decision": "rejected"}
        evil = browser.post(
            urljoin(page_url, forms[2].action),
            data=sent,
            headers={"Origin": "https://evil.example"},
        )
        assert evil.status_code == 403

    assert _verdicts(node.database) == [
        (node.spine_job, findings[0].key, "accepted", None, "Dr Rossi", None),
        (node.spine_job, judged.key, "corrected", "normal", "Dr Rossi", "endplate only"),
    ]
    assert _verdict_audit(node.database) == [
        ("accepted", "Dr Rossi (web)", {"job": node.spine_job, "analysis": "spine",
                                        "finding": findings[0].key, "kind": findings[0].type,
                                        "ai": findings[0].value}),
        ("corrected", "Dr Rossi (web)", {"job": node.spine_job, "analysis": "spine",
                                         "finding": judged.key, "kind": judged.type,
                                         "ai": judged.value, "value": "normal"}),
    ]  # fmt: skip

    # Chromium shows both verdicts, who gave them, and still the buttons.
    html = dump_dom(page_url, tmp_path)
    rows = {
        key: html[html.index(f'data-finding="{key}"') :] for key in (findings[0].key, judged.key)
    }
    first, second = (row[: row.index("</tr>")] for row in rows.values())
    assert "verdict-accepted" in first and "by Dr Rossi" in first
    assert "verdict-corrected" in second and "to <strong>Normal</strong>" in second
    assert "endplate only" in second
    assert len(forms_of(html, forms[0].action)) == len(findings)
    pixels = screenshot(page_url, tmp_path / "study.png", size=(1280, 1400))
    check_not_blank(pixels)


def test_rest_verdicts_show_on_the_page_and_carry_to_the_next_version(node: Node) -> None:
    client = _client(node)
    first = node.studies[0]
    body = {"finding": "diagnosis", "decision": "accepted", "reader": "Dr Weber"}
    answer = client.post(f"/api/jobs/{first['job']}/verdicts", json=body)
    assert answer.status_code == 201, answer.text
    assert answer.json()["job"] == first["job"] and answer.json()["decision"] == "accepted"
    # Bad ones: 4xx with the reason, nothing recorded.
    for bad, status, reason in (
        (
            {**body, "decision": "corrected", "value": "tumour"},
            422,
            "should be one of normal, adenoma",
        ),
        ({**body, "finding": "L4"}, 422, "has no finding 'L4'; its findings: diagnosis"),
        ({**body, "reader": " "}, 422, 'Argument "reader" should name who judged'),
    ):
        refused = client.post(f"/api/jobs/{first['job']}/verdicts", json=bad)
        assert refused.status_code == status and reason in refused.json()["error"], refused.text
    assert client.post("/api/jobs/99999/verdicts", json=body).status_code == 404
    assert client.post(f"/api/jobs/{first['job']}/verdicts", content=b"[1]").status_code == 400
    assert [v[:5] for v in _verdicts(node.database)] == [
        (first["job"], "diagnosis", "accepted", None, "Dr Weber")
    ]
    # The study page: version 2 (the same AI value) shows the verdict given on version 1.
    html = client.get(f"/studies/{first['study']}").text
    newest = html[html.index(f'id="job-{node.second_version}"') :]
    newest = newest[: newest.index("</section>")]
    assert "verdict-accepted" in newest and "by Dr Weber" in newest and "from version 1" in newest
    older = html[html.index(f'id="job-{first["job"]}"') :]
    assert "older version 1" in older[: older.index("</section>")]
    findings = client.get(f"/api/studies/{first['study']}/findings").json()
    assert [(j["job_id"], j["version"], j["latest"]) for j in findings] == [
        (node.second_version, 2, True), (first["job"], 1, False)
    ]  # fmt: skip
    assert findings[0]["findings"][0]["verdict"]["from_version"] == 1
    assert findings[1]["findings"][0]["verdict"]["from_version"] is None
    assert client.get("/api/studies/99999/findings").status_code == 404
    # A shadow job offers no verdict form.
    second = client.get(f"/studies/{node.studies[1]['study']}").text
    assert (
        f'value="{node.shadow_job}"' not in second and f'value="{node.studies[1]["job"]}"' in second
    )


# -- the performance page ------------------------------------------------------------------------


def _cells(html: str) -> dict[str, dict[str, float | None]]:
    """The figure cells of the first table of figures in ``html``: name -> value, low, high."""
    found: dict[str, dict[str, float | None]] = {}
    for name, attributes in re.findall(r'<td class="num" data-figure="(\w+)"([^>]*)>', html):
        values = dict(re.findall(r'data-(value|low|high)="([^"]*)"', attributes))
        found.setdefault(name, {k: float(v) if v else None for k, v in values.items()})
    return found


def _section(html: str, analysis: str) -> str:
    start = html.index(f'<section class="analysis" id="analysis-{analysis}"')
    return html[start : html.index("</section>", start)]


def test_truth_upload_form_names_bad_lines_then_imports(node: Node) -> None:
    client = _client(node)
    origin = {"Origin": "http://127.0.0.1:8080"}
    before = client.get("/performance")
    assert before.status_code == 200
    assert "No assessed studies yet" in _section(before.text, "parathyroid")
    good = _truth_csv(node.studies)
    bad = good + "1.2.3.999,,parathyroid,adenoma,2026-11-20,histology\n"
    pasted = client.post("/performance/truth", data={"csv": bad}, headers=origin)
    assert pasted.status_code == 422 and "Traceback" not in pasted.text
    problem = (
        f"<li>line {len(good.splitlines()) + 1}: no study with Study Instance UID 1.2.3.999</li>"
    )
    assert "Nothing imported: 1 problem(s)." in pasted.text and problem in pasted.text
    assert "1.2.3.999,,parathyroid" in pasted.text  # the pasted lines stay in the box
    empty = client.post("/performance/truth", data={"csv": " "}, headers=origin)
    assert empty.status_code == 422 and "choose a CSV file or paste its lines" in empty.text
    latin = client.post("/performance/truth", files={"file": ("t.csv", "é".encode("latin-1"))},
                        data={"csv": ""}, headers=origin)  # fmt: skip
    assert latin.status_code == 422 and "the file is not UTF-8 text" in latin.text
    with node.database.session() as session:
        assert session.scalars(select(Truth)).all() == []
    uploaded = client.post("/performance/truth", files={"file": ("truth.csv", good.encode())},
                           data={"csv": ""}, headers=origin)  # fmt: skip
    assert uploaded.status_code == 303, uploaded.text
    assert uploaded.headers["location"] == "/performance?notice=imported&count=8"
    assert "8 final diagnosis(es) imported." in client.get(uploaded.headers["location"]).text
    with node.database.session() as session:
        assert len(session.scalars(select(Truth)).all()) == 8
    assert client.post("/performance/truth", data={"csv": good},
                       headers={"Origin": "https://evil.example"}).status_code == 403  # fmt: skip


def test_performance_page_shows_performance_figures_and_the_reliability_plot(
    node: Node, server: WebServer, tmp_path: Path
) -> None:
    database, files, studies = node.database, node.files, node.studies
    import_truth(database, files, _truth_csv(studies), imported_by="test")
    record_verdict(database, studies[-1]["job"], "diagnosis", "corrected", value="adenoma",
                   reader="Dr A")  # fmt: skip
    record_verdict(database, studies[0]["job"], "diagnosis", "accepted", reader="Dr A")
    record_verdict(database, studies[1]["job"], "diagnosis", "rejected", reader="Dr A")
    record_verdict(database, node.spine_job, LEVELS[0], "accepted", reader="Dr A")
    client = _client(node)
    html = client.get("/performance", params={"resamples": 40}).text
    groups = performance(database, files, resamples=40)
    overall = groups[0]
    c = overall.classification
    assert overall.analysis == "parathyroid" and c is not None and c.n == len(CASES)
    section = _section(html, "parathyroid")
    cells = _cells(section)
    for name in ("accuracy", "macro_auc", "macro_f1", "kappa", "ece"):
        value, interval = getattr(c, name), c.intervals[name]
        assert cells[name]["value"] == pytest.approx(value, rel=1e-12), name
        assert interval is not None
        assert (cells[name]["low"], cells[name]["high"]) == pytest.approx(interval, rel=1e-12)
        assert f"{value:.3f} <span" in section
    confusion = re.search(r'<table class="confusion".*?</table>', section, re.S)
    assert confusion is not None
    shown = [[int(n) for n in re.findall(r'<td class="num">(\d+)</td>', row)]
             for row in re.findall(r"<tr><th>[^<]*</th>(.*?)</tr>", confusion.group(0), re.S)]  # fmt: skip
    assert shown[1:] == c.confusion  # after the header row
    bins = re.search(r'<table class="reliability".*?</table>', section, re.S)
    assert bins is not None
    counts = [int(n) for n in re.findall(r'</td><td class="num">(\d+)</td>', bins.group(0))]
    assert counts == [int(b["count"]) for b in c.reliability]
    assert 'data-decision="corrected">1 <span class="muted">(33.3 %)' in section
    assert overall.agreement == {"compared": 2, "agreeing": 1, "share": 0.5}
    assert 'data-agreement="0.5">50.0 % of 2</strong>' in section
    stations = re.findall(r'<tr data-group="([^"]*)">', section)
    assert stations == [f"{g.bundle_version}|{g.station}|{g.calling_ae_title}" for g in groups[1:3]]
    assert stations == ["1.0|CAM1 / Symbia / 42|GAMMA1", "1.0|CAM2 / Symbia / 42|GAMMA1"]
    spine = _section(html, "spine")
    assert "No figures" in spine and 'data-decision="accepted">1' in spine
    assert client.get("/performance", params={"analysis": "liver"}).status_code == 404

    png = client.get("/performance/reliability.png", params={"analysis": "parathyroid"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.format == "PNG" and image.size == (560, 600)
    plot = np.asarray(image.convert("RGB")).astype(int)
    assert len(np.unique(plot.reshape(-1, 3), axis=0)) > 50
    assert has_colour(plot, ORANGE, 30) > 200  # the bins' confidence against accuracy
    assert (
        client.get("/performance/reliability.png", params={"analysis": "liver"}).status_code == 404
    )

    # Chromium renders the page with the plot; the screenshot stays in the test's folder.
    out = tmp_path / "performance.png"
    pixels = screenshot(f"{server.url}performance", out, size=(1280, 1100))
    check_not_blank(pixels)
    assert has_colour(pixels, ORANGE, 30) > 200
    assert out.stat().st_size > 20_000


def test_performance_page_without_cases(tmp_path: Path) -> None:
    config = Config.model_validate({"node": {"data_dir": str(tmp_path / "var")}})
    database = open_database(config.database_url)
    try:
        client = TestClient(create_app(config, database, lambda: True), base_url="http://127.0.0.1")
        page = client.get("/performance")
        assert page.status_code == 200
        assert "No assessed studies yet</strong>: no study has a finished analysis" in page.text
        assert 'href="/performance" class="on"' in page.text
        plot = client.get("/performance/reliability.png", params={"analysis": "parathyroid"})
        assert plot.status_code == 200 and Image.open(io.BytesIO(plot.content)).format == "PNG"
    finally:
        database.dispose()
