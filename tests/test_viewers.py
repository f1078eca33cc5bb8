"""The node's results in real viewers: OHIF v3 fed by Orthanc's DICOMweb, and Orthanc's own
explorer, rendered by headless Chromium and checked on their screenshots.

A phantom parathyroid study goes to Orthanc as a gamma camera sends it (DCMTK ``storescu``);
the node's documents for it (the SR and the key image, made by the parathyroid analysis'
``encode`` under the shipped configuration) go as the node sends them (its own C-STORE SCU).
Then OHIF (``scripts/install-viewer.sh``) opens the SR, which draws the focus on the delayed
image, and the key image; Orthanc's explorer lists the result series under the source
study. The screenshots stay in the test's folder and are copied to var/test-artefacts/viewers/.
Skipped with the reason when OHIF, Chromium, Orthanc or its DICOMweb plugin is missing
(``.ci/run`` installs them all).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from factory import write
from mibi_node.analyses.base import EncodeContext
from mibi_node.analyses.registry import get_analysis
from mibi_node.config import Config
from mibi_node.dispatch.destinations import Destination
from mibi_node.dispatch.scu import send_files
from mibi_node.imaging.nm import read_study
from mibi_node.inference.result import Focus, StudyResult
from mibi_node.phantom.generator import make_study
from node import storescu
from orthanc import DICOMWEB_PLUGIN, OrthancServer, find_orthanc
from viewers import Browser, ViewerServer, chromium_binary, keep_artefact, ohif_dist, poll

pytestmark = [pytest.mark.peers, pytest.mark.slow]

CLASSES = ("normal", "adenoma", "hyperplasia", "carcinoma", "cyst")
PROBABILITIES = (0.04, 0.81, 0.09, 0.03, 0.03)
#: The colour OHIF draws the selected SR measurement in (DICOMSRDisplayTool).
OHIF_ACTIVE_COLOUR = (0, 255, 0)
#: The key image's focus circle (mibi_node.report.keyimage).
KEY_IMAGE_FOCUS_COLOUR = (255, 48, 48)


@dataclass
class Published:
    """A phantom study and the node's documents for it, stored in a running Orthanc."""

    pacs: OrthancServer
    study_instance_uid: str
    sr: pydicom.Dataset
    key_image: pydicom.Dataset
    focus: Focus
    source_series: list[str]


def _has(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 12) -> np.ndarray:
    """Mask of the pixels within ``tolerance`` of ``colour`` in every channel."""
    return np.all(np.abs(pixels - np.array(colour)) <= tolerance, axis=2)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, require_tool) -> Iterator[Published]:
    require_tool("storescu")
    if find_orthanc() is None or not DICOMWEB_PLUGIN.is_file():
        pytest.skip("Orthanc or its DICOMweb plugin is not installed: run scripts/install-peers.sh")
    folder = tmp_path_factory.mktemp("viewers")
    study = make_study("adenoma", seed=2, index=0)
    sources = [write(ds, folder / f"source-{n}.dcm") for n, ds in enumerate(study.datasets)]
    lesion = study.parameters.lesions[0]
    row, col = study.pixel(lesion.x_mm, lesion.y_mm)
    focus = Focus(row=float(row), col=float(col), side=lesion.side, pole=lesion.pole)
    probabilities = dict(zip(CLASSES, PROBABILITIES, strict=True))
    result = StudyResult(
        study_instance_uid=study.study_instance_uid,
        probabilities=probabilities,
        predicted="adenoma",
        member_probabilities={"resnet10t": probabilities},
        agreement=1.0,
        normalised_entropy=0.38,
        focus=focus,
        source_images=read_study(sources).images,
        timings={},
        bundle_name="viewer-test",
        bundle_version="0.0.1",
    )
    # The shipped configuration decides whether a key image goes beside the SR.
    config = Config.model_validate({})
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in sources]
    documents = get_analysis("parathyroid").encode(
        result,
        headers,
        EncodeContext(
            device_uid=generate_uid(),
            series_number=config.report.series_number,
            instance_number=1,
            series_instance_uid=generate_uid(),
            key_image=config.key_image_for("parathyroid"),
        ),
    )
    assert [ds.Modality for ds in documents] == ["SR", "OT"], "SR and key image by default"
    results = []
    for number, ds in enumerate(documents):
        path = folder / f"result-{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        results.append(path)
    with OrthancServer(folder / "orthanc", dicomweb=True) as pacs:
        sent = storescu(
            pacs.dicom_port, sources, calling="GAMMA_CAM1", called="ORTHANC", extra=["-R"]
        )
        assert sent.returncode == 0, sent.stderr
        destination = Destination(ae_title="ORTHANC", host="127.0.0.1", port=pacs.dicom_port)
        answers = send_files(results, destination, calling_ae_title="MIBI_NODE")
        assert [answer.status for answer in answers] == [0x0000, 0x0000]
        yield Published(
            pacs=pacs,
            study_instance_uid=study.study_instance_uid,
            sr=documents[0],
            key_image=documents[1],
            focus=focus,
            source_series=[str(ds.SeriesDescription) for ds in study.datasets],
        )


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    chromium_binary()
    with Browser(tmp_path / "chromium") as started:
        yield started


@pytest.fixture
def ohif(published: Published) -> Iterator[ViewerServer]:
    with ViewerServer(ohif_dist(), published.pacs) as server:
        yield server


def _viewport(browser: Browser) -> dict[str, float]:
    """The rectangle (CSS pixels) of the image viewport OHIF renders into."""
    rect = browser.wait_for(
        "(() => { const e = document.querySelector('.cornerstone-viewport-element');"
        " if (!e) return null; const r = e.getBoundingClientRect();"
        " return {left: r.left, top: r.top, width: r.width, height: r.height}; })()",
        "OHIF's image viewport",
    )
    return {key: float(value) for key, value in rect.items()}


def test_ohif_opens_the_sr_and_draws_the_focus(
    published: Published, ohif: ViewerServer, browser: Browser, tmp_path: Path, request
) -> None:
    sr = published.sr
    browser.open(
        ohif.study_url(published.study_instance_uid, initialSeriesInstanceUID=sr.SeriesInstanceUID)
    )
    # OHIF draws the SR's planar ROI group (TID 1410) on the image it refers to: an arrow at
    # the point and a text box with the group's measurements and finding site.
    label = browser.wait_for(
        "Array.from(document.querySelectorAll('.cornerstone-viewport-element svg text'))"
        ".map(t => t.textContent).join(' | ')",
        "the SR's annotation",
    )
    assert "Probability: 0.81" in label and "Parathyroid" in label, label
    # The arrow's tip: the first line of the annotation ends at the SR's point.
    tip_x, tip_y = browser.evaluate(
        "(() => { const l = document.querySelector('.cornerstone-viewport-element svg line');"
        " return [Number(l.getAttribute('x2')), Number(l.getAttribute('y2'))]; })()"
    )
    viewport = _viewport(browser)
    # The image (128 x 128, square pixels) fills the viewport's height or width, centred;
    # OHIF puts image coordinate (0, 0) at the centre of the first pixel, so the SCOORD point
    # (col + 0.5, row + 0.5) lies half a pixel right of and below the focus pixel's centre.
    rows = columns = 128
    scale = min(viewport["width"] / columns, viewport["height"] / rows)
    expected_x = viewport["width"] / 2 + (published.focus.col + 0.5 - (columns - 1) / 2) * scale
    expected_y = viewport["height"] / 2 + (published.focus.row + 0.5 - (rows - 1) / 2) * scale
    assert abs(tip_x - expected_x) < 1.5 * scale, (tip_x, expected_x, scale)
    assert abs(tip_y - expected_y) < 1.5 * scale, (tip_y, expected_y, scale)
    # The study browser lists the result series beside the source series.
    text = browser.text()
    for description in (*published.source_series, "MIBI-NODE AI RESULT", "MIBI-NODE AI KEY IMAGE"):
        assert description in text, description
    # The screenshot: an image with the arrow drawn in OHIF's colour where the focus is.
    out = tmp_path / "ohif-sr.png"
    pixels = browser.screenshot(out)
    keep_artefact(out, request.node.name)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    left, top = viewport["left"] + expected_x, viewport["top"] + expected_y
    box = pixels[
        int(top - 4 * scale) : int(top + 16 * scale), int(left - 4 * scale) : int(left + 16 * scale)
    ]
    assert _has(box, OHIF_ACTIVE_COLOUR, 60).sum() > 30
    inside = pixels[
        int(viewport["top"]) : int(viewport["top"] + viewport["height"]),
        int(viewport["left"]) : int(viewport["left"] + viewport["width"]),
    ]
    assert inside.max() > 100  # the delayed image itself, not a black viewport


def test_ohif_shows_the_key_image_that_covers_the_rest(
    published: Published, ohif: ViewerServer, browser: Browser, tmp_path: Path, request
) -> None:
    key_image = published.key_image
    browser.open(
        ohif.study_url(
            published.study_instance_uid, initialSeriesInstanceUID=key_image.SeriesInstanceUID
        )
    )
    viewport = _viewport(browser)
    out = tmp_path / "ohif-key-image.png"

    def shown() -> np.ndarray | None:
        pixels = browser.screenshot(out)
        inside = pixels[
            int(viewport["top"]) : int(viewport["top"] + viewport["height"]),
            int(viewport["left"]) : int(viewport["left"] + viewport["width"]),
        ]
        return inside if _has(inside, KEY_IMAGE_FOCUS_COLOUR, 40).sum() > 30 else None

    # The key image's red focus circle appears once OHIF has decoded and drawn the image.
    inside = poll(shown, "the key image's focus circle in OHIF", timeout=60)
    keep_artefact(out, request.node.name)
    assert len(np.unique(inside.reshape(-1, 3), axis=0)) > 50
    # Its text panel under the image: the prediction and every probability in white, and the
    # intended use (a demonstration bundle's disclaimer) in amber.
    assert _has(inside, (255, 255, 255), 10).sum() > 200
    assert _has(inside, (255, 200, 0), 40).sum() > 100


def test_orthanc_explorer_lists_the_results_under_the_source_study(
    published: Published, browser: Browser, tmp_path: Path, request
) -> None:
    [study_id] = published.pacs.rest(
        "/tools/find",
        {"Level": "Study", "Query": {"StudyInstanceUID": published.study_instance_uid}},
    )
    url = f"http://127.0.0.1:{published.pacs.http_port}/app/explorer.html#study?uuid={study_id}"
    browser.open(url)
    browser.wait_for(
        "document.body && document.body.innerText.includes('MIBI-NODE AI RESULT')",
        "the SR series in the study's series list",
    )
    text = browser.text()
    for description in (*published.source_series, "MIBI-NODE AI KEY IMAGE"):
        assert description in text, description
    out = tmp_path / "orthanc-explorer.png"
    pixels = browser.screenshot(out)
    keep_artefact(out, request.node.name)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    # The same four series, read back over Orthanc's REST API: one study, the SR in it.
    series = published.pacs.rest(f"/studies/{study_id}/series?expand")
    modalities = sorted(s["MainDicomTags"]["Modality"] for s in series)
    assert modalities == ["NM", "NM", "OT", "SR"]
