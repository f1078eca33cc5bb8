"""`make demo`: the whole loop on one machine, from a gamma camera to an SR in PACS.

1. builds the five demonstration model bundles once and reuses them afterwards: the
   parathyroid (MIBI) ensemble from 600 phantom studies on one core, the thyroid
   scintigraphy ensemble from 1200 thyroid phantoms on the other; then, on the first core,
   the lumbar spine keypoint bundle from spine MR phantoms (scripts/demo_spine.py) and, on
   the second, the knee cartilage bundle from 60 knee MR phantoms (scripts/demo_knee.py);
   then, on the first core again, the lung lesion detector from 80 chest CT phantoms
   (scripts/demo_lung.py);
2. starts DCMTK storescp as the PACS that receives the SRs (AE DEMO_PACS);
3. starts the node with five analyses (parathyroid, thyroid, spine, knee, lung) and one CPU
   worker that hosts the five bundles and sends its SRs (and the key images and the SEGs
   SEGs) to that PACS;
4. sends 10 MIBI studies, 6 thyroid scans, one bone scan (which no analysis takes), 4
   lumbar spine MR studies, 2 knee MR studies and 2 chest CT studies (one of 300 slices)
   with DCMTK storescu, one association per
   study, as a camera or scanner would;
5. waits for the 24 results, then shows a table per analysis (truth, prediction, the time
   from each study's last instance to its SR in PACS; for the knees the Dice of each plate,
   for the chests each lesion found against the phantom's, with its Dice,
   the SEG read back against the phantom's labels), why the bone scan was IGNORED, and one SR
   as DCMTK's dsrdump prints it.

Everything it starts it stops again, also on Ctrl-C; the node's data stays in ./var/demo
for a look with `mibi-node status --data-dir var/demo`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import demo_knee
import demo_lung
import demo_spine
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
VAR = ROOT / "var"
DATA = VAR / "demo"
SINK = DATA / "sink"
STUDIES = VAR / "demo-studies"
TRAIN_DATA = VAR / "demo-train"
BUNDLE = VAR / "bundles" / "demo"
CACHE = VAR / "cache" / "training"
RECIPE = ROOT / "config" / "ensemble-demo.toml"
THYROID_STUDIES = VAR / "demo-thyroid-studies"
THYROID_TRAIN_DATA = VAR / "demo-thyroid-train"
THYROID_BUNDLE = VAR / "bundles" / "thyroid-demo"
THYROID_RECIPE = ROOT / "config" / "thyroid-demo.toml"
THYROID_TRAIN_STUDIES = 1200  # 400 missed the cold-nodule goal (docs/thyroid.md)
THYROID_COUNT = 6
BONE_SCAN = VAR / "demo-bone-scan"
BIN = Path(sys.executable).parent
NODE = [str(BIN / "mibi-node")]
STUDY_COUNT = 10
QUIET_SECONDS = 2
SR_TIMEOUT = 600.0
# The bundles train side by side, one core each: one thread per process for every library
# that would start its own (torch sets its own from the recipes).
ONE_THREAD_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}
# Without TCP_NODELAY every DCMTK C-STORE stalls on Nagle's algorithm (about 40 ms twice).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
SR_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1.88."

# Piped output (logs, CI) has no terminal width: give the table room instead of 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 110)


class DemoError(Exception):
    """A step went wrong; the message says which and what to look at."""


@dataclass
class Study:
    """One phantom study as the demo tracks it."""

    number: int
    study_instance_uid: str
    truth: str  # the class; for a thyroid scan its findings joined by ";"
    folder: Path
    analysis: str = "parathyroid"
    sent_at: float = 0.0  # time.time() when its last instance was acknowledged
    sr_path: Path | None = None
    sr_arrived_at: float = 0.0
    probabilities: dict[str, float] | None = None
    reported: tuple[str, ...] = ()  # thyroid: the findings the SR reports
    lobe_uptake: dict[str, float] | None = None  # thyroid: right/left share
    spine: demo_spine.SpineTruth | None = None  # spine: the phantom's points, the SR's
    knee: demo_knee.KneeTruth | None = None  # knee: the phantom's labels, the SEG's Dice
    lung: demo_lung.LungTruth | None = None  # lung: the phantom's lesions, the SEG's and SR's


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _free_port(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])


def _wait_for(
    port: int, process: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DemoError(f"{what} stopped during start-up; see {_rel(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.2)
    raise DemoError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def _ensure_storescu() -> None:
    """DCMTK's storescu, storescp and dsrdump, installed from Debian packages if missing."""
    tools = ("storescu", "storescp", "dsrdump")
    if all(shutil.which(tool) for tool in tools):
        return
    console.print("DCMTK is missing; installing the DICOM peers (scripts/install-peers.sh)")
    script = ROOT / "scripts" / "install-peers.sh"
    if subprocess.run(["bash", str(script)], check=False).returncode or not all(
        shutil.which(tool) for tool in tools
    ):
        sys.exit("could not install DCMTK: run scripts/install-peers.sh as root, then make demo")


# -- 1. the model bundles --------------------------------------------------------------------


class BackgroundBuild:
    """Builds one analysis' demo bundle in a background thread (phantoms, then training).

    Its commands run as child processes with one thread each, so the MIBI training beside
    it keeps the other core; what they print goes to a log, read when something fails.
    """

    def __init__(
        self, what: str, bundle: Path, data: Path, steps: list[tuple[str, list[str]]]
    ) -> None:
        self.what = what
        self.bundle = bundle
        self.data = data  # the training phantoms, made afresh by the first step
        self.steps = steps
        self.log = VAR / f"demo-{what}-build.log"
        self.error: str | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name=f"{what}-build", daemon=True)

    @property
    def needed(self) -> bool:
        return not (self.bundle / "bundle.json").is_file()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.data, ignore_errors=True)
        with self.log.open("wb") as out:
            for what, command in self.steps:
                code = subprocess.run(
                    command,
                    cwd=ROOT,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=ONE_THREAD_ENV,
                    check=False,
                ).returncode
                if code:
                    self.error = f"{what} failed (exit status {code}); see {_rel(self.log)}"
                    return
        self.seconds = time.monotonic() - started

    def wait(self) -> float:
        """Wait for the build; returns its seconds, raises DemoError when it failed."""
        if self._thread.is_alive():
            console.print(f"   waiting for the {self.what} bundle that trains beside it ...")
        self._thread.join()
        if self.error is not None or not (self.bundle / "bundle.json").is_file():
            raise DemoError(
                self.error or f"no {self.what} bundle was written; see {_rel(self.log)}"
            )
        console.print(f"   {self.what} bundle ready in {self.seconds / 60:.1f} min")
        return self.seconds


def _thyroid_build() -> BackgroundBuild:
    python = str(BIN / "python")
    return BackgroundBuild(
        "thyroid",
        THYROID_BUNDLE,
        THYROID_TRAIN_DATA,
        [
            ("generating the thyroid training phantoms",
             [python, "-m", "training.thyroid", "synth", str(THYROID_TRAIN_DATA), "--studies",
              str(THYROID_TRAIN_STUDIES), "--seed", "0"]),
            ("training the thyroid bundle",
             [python, "-m", "training.thyroid", "train", str(THYROID_RECIPE),
              str(THYROID_TRAIN_DATA), "--out", str(THYROID_BUNDLE)]),
        ],
    )  # fmt: skip


def _ensure_bundles() -> float:
    """The five demo bundles, built where missing; returns the seconds spent building them.

    The thyroid bundle trains on one core beside the MIBI bundle on the other; the spine
    bundle trains on the MIBI core once the MIBI bundle is done, the knee bundle on the
    thyroid core once the thyroid bundle is done.
    """
    started = time.monotonic()
    thyroid = _thyroid_build()
    if thyroid.needed:
        console.print(
            f"1. building the thyroid demonstration bundle in {_rel(THYROID_BUNDLE)}: "
            f"{THYROID_TRAIN_STUDIES} thyroid phantoms, then two members trained first on "
            "single-finding scans and then on the cross-training set (one core, about 7 minutes, "
            f"log: {_rel(thyroid.log)})"
        )
        thyroid.start()
    else:
        _reusing(THYROID_BUNDLE, "thyroid")
    mibi = _ensure_bundle()
    spine = demo_spine.build(BackgroundBuild)
    if spine.needed:
        console.print(
            f"   building the spine demonstration bundle in {_rel(spine.bundle)}: "
            f"{demo_spine.TRAIN_STUDIES} lumbar MR phantoms (T2 sagittal), then the keypoint "
            f"model and the level classifier (one core, log: {_rel(spine.log)})"
        )
        spine.start()
    else:
        _reusing(spine.bundle, "spine")
    if thyroid.needed:
        thyroid.wait()
    knee = demo_knee.build(BackgroundBuild)
    if knee.needed:
        console.print(
            f"   building the knee demonstration bundle in {_rel(knee.bundle)}: "
            f"{demo_knee.TRAIN_CASES} knee MR phantoms with cartilage labels, then the coarse "
            f"and the fine segmentation stage (one core, log: {_rel(knee.log)})"
        )
        knee.start()
    else:
        _reusing(knee.bundle, "knee")
    if spine.needed:
        spine.wait()
    lung = demo_lung.build(BackgroundBuild)
    if lung.needed:
        console.print(
            f"   building the lung demonstration bundle in {_rel(lung.bundle)}: "
            f"{demo_lung.TRAIN_CASES} chest CT phantoms with lesion masks, then the Mask R-CNN "
            f"lesion detector (one core, log: {_rel(lung.log)})"
        )
        lung.start()
    else:
        _reusing(lung.bundle, "lung")
    for build in (knee, lung):
        if build.needed:
            build.wait()
    built = mibi or thyroid.seconds or spine.seconds or knee.seconds or lung.seconds
    return time.monotonic() - started if built else 0.0


def _reusing(bundle: Path, what: str) -> str:
    provenance = json.loads((bundle / "bundle.json").read_text()).get("provenance", {})
    console.print(
        f"1. reusing the {what} model bundle in {_rel(bundle)} "
        f"(built {provenance.get('created', '?')}; delete the folder to build it again)"
    )
    return str(provenance.get("training_command", ""))


def _summarise_training_inputs() -> None:
    """Give a reused bundle built before input drift its training input summary
    (inputs.json; the trainings write it themselves), from its training phantoms."""
    for bundle, data in (
        (BUNDLE, TRAIN_DATA),
        (THYROID_BUNDLE, THYROID_TRAIN_DATA),
        (demo_spine.BUNDLE, demo_spine.TRAIN_DATA),
        (demo_knee.BUNDLE, demo_knee.TRAIN_DATA),
        (demo_lung.BUNDLE, demo_lung.TRAIN_DATA),
    ):
        if (bundle / "inputs.json").is_file() or not data.is_dir():
            continue
        console.print(f"   summarising the training inputs of {_rel(bundle)} (input drift)")
        command = [*NODE, "bundle", "summarise", str(bundle), str(data)]
        if subprocess.run(command, cwd=ROOT, env=ONE_THREAD_ENV, check=False).returncode:
            console.print(f"   [bold yellow]note:[/] no training input summary in {_rel(bundle)}")


def _ensure_bundle() -> float:
    """Train the MIBI demo bundle unless it is there; returns the seconds spent building it."""
    manifest = BUNDLE / "bundle.json"
    if manifest.is_file():
        command = _reusing(BUNDLE, "parathyroid (MIBI)")
        if "init-bundle" in command:
            console.print(
                "   [bold yellow]note:[/] this bundle has random weights (mibi-node init-bundle): "
                "its predictions mean nothing"
            )
        return 0.0
    started = time.monotonic()
    console.print(
        f"1. building the parathyroid (MIBI) demonstration bundle in {_rel(BUNDLE)}: 600 "
        "phantom studies, then training three members and fitting their fusion.\n"
        "   This takes about 5 minutes on 2 idle CPU cores (longer on a busy machine) and happens "
        "once; later runs reuse it."
    )
    shutil.rmtree(TRAIN_DATA, ignore_errors=True)
    synth = [*NODE, "synth", "--out", str(TRAIN_DATA), "--studies", "600", "--seed", "1"]
    if subprocess.run(synth, cwd=ROOT, env=ONE_THREAD_ENV, check=False).returncode:
        raise DemoError("generating the 600 training phantoms failed (see the message above)")
    train = [
        *NODE,
        "train",
        "--recipe",
        str(RECIPE),
        "--data",
        str(TRAIN_DATA),
        "--out",
        str(BUNDLE),
        "--overwrite",
        "--cache",
        str(CACHE),
        # One thread: the thyroid bundle trains on the other core. Two torch threads beside
        # it made every epoch 5-9 times slower (OpenMP threads waiting on a busy core).
        "--threads",
        "1",
    ]
    code = subprocess.run(train, cwd=ROOT, env=ONE_THREAD_ENV, check=False).returncode
    if code or not manifest.is_file():
        raise DemoError(
            f"training the demo bundle failed (exit status {code}); the reason is printed "
            f"above. Nothing was sent. `make demo` tries again from the start."
        )
    seconds = time.monotonic() - started
    console.print(f"   parathyroid bundle ready in {seconds / 60:.1f} min")
    return seconds


# -- 2.-3. the PACS and the node -------------------------------------------------------------


def _start(
    command: list[str], log: IO[bytes], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    # A session of its own: Ctrl-C reaches only this script, which then stops the child in
    # order (SIGTERM lets the node finish what it is doing).
    return subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen[bytes] | None, what: str, timeout: float) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        console.print(f"{what} did not stop within {timeout:.0f} s; killing it")
        process.kill()
        process.wait(10)


def _query(sql: str, *args: object) -> list[tuple[object, ...]]:
    """Read the node's database (read-only); no rows while it does not exist yet."""
    database = DATA / "mibi-node.sqlite3"
    if not database.is_file():
        return []
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
            return list(connection.execute(sql, args).fetchall())
    except sqlite3.Error:  # the schema may not be there yet
        return []


def _wait_for_worker(node: subprocess.Popen[bytes], timeout: float = 180) -> None:
    """Wait until the worker has loaded the bundle, so that the timings are the node's."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise DemoError(f"the node stopped (exit status {node.returncode})")
        rows = _query("SELECT state, message, bundle, device FROM worker")
        for state, message, bundle, device in rows:
            if state in ("ready", "busy"):
                console.print(f"   worker ready: {bundle} on {device}")
                return
            if state == "waiting for a bundle" and message and message != last:
                console.print(f"   worker: {message}")
                last = str(message)
        time.sleep(0.3)
    raise DemoError(f"the worker was not ready after {timeout:.0f} s")


# -- 4.-5. the studies and their SRs ---------------------------------------------------------


def _make_studies() -> list[Study]:
    shutil.rmtree(STUDIES, ignore_errors=True)
    command = [*NODE, "synth", "--out", str(STUDIES), "--studies", str(STUDY_COUNT)]
    done = subprocess.run([*command, "--seed", "7"], cwd=ROOT, capture_output=True, check=False)
    if done.returncode:
        raise DemoError(f"generating the studies failed:\n{done.stderr.decode()}")
    with (STUDIES / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    studies = [
        Study(n, row["study_instance_uid"], row["label"], STUDIES / row["path"])
        for n, row in enumerate(rows, start=1)
    ]
    from mibi_node.analyses.thyroid.phantom import generate_thyroid_studies

    shutil.rmtree(THYROID_STUDIES, ignore_errors=True)
    thyroid_rows = generate_thyroid_studies(THYROID_STUDIES, THYROID_COUNT, 11, mixed_fraction=0.5)
    studies += [
        Study(len(studies) + n, row["study_instance_uid"], row["findings"],
              THYROID_STUDIES / row["folder"], analysis="thyroid")
        for n, row in enumerate(thyroid_rows, start=1)
    ]  # fmt: skip
    studies += [
        Study(len(studies) + n, uid, "", folder, analysis="spine", spine=truth)
        for n, (uid, folder, truth) in enumerate(demo_spine.make_studies(), start=1)
    ]
    studies += [
        Study(len(studies) + n, uid, "", folder, analysis="knee", knee=truth)
        for n, (uid, folder, truth) in enumerate(demo_knee.make_studies(), start=1)
    ]
    studies += [
        Study(len(studies) + n, uid, "", folder, analysis="lung", lung=truth)
        for n, (uid, folder, truth) in enumerate(demo_lung.make_studies(), start=1)
    ]
    return studies


def _make_bone_scan() -> Study:
    """A study no analysis takes: a thyroid phantom relabelled as a Tc-99m MDP bone scan."""
    import pydicom
    from pydicom.uid import generate_uid

    from mibi_node.analyses.thyroid.phantom import generate_thyroid_studies

    shutil.rmtree(BONE_SCAN, ignore_errors=True)
    [row] = generate_thyroid_studies(BONE_SCAN / "source", 1, 12)
    study_uid, series_uid = generate_uid(), generate_uid()
    for path in sorted((BONE_SCAN / "source" / row["folder"]).glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyDescription, ds.SeriesDescription = "NM WHOLE BODY BONE", "WB ANT"
        for item in ds.get("RadiopharmaceuticalInformationSequence", []):
            item.Radiopharmaceutical = "Tc99m medronate"
            for code in item.get("RadiopharmaceuticalCodeSequence", []):
                code.CodeValue, code.CodingSchemeDesignator = "96390006", "SCT"
                code.CodeMeaning = "Technetium Tc^99m^ medronate"
        ds.save_as(BONE_SCAN / path.name, enforce_file_format=True)
    shutil.rmtree(BONE_SCAN / "source")
    return Study(0, study_uid, "bone scan", BONE_SCAN, analysis="none")


def _send(study: Study, port: int) -> None:
    files = sorted(study.folder.glob("*.dcm"))
    calling = {"spine": "MR_SCANNER", "knee": "MR_SCANNER", "lung": "CT_SCANNER"}.get(
        study.analysis, "GAMMA_CAM1"
    )
    command = ["storescu", "-aet", calling, "-aec", "MIBI_NODE", "127.0.0.1", str(port)]
    done = subprocess.run(
        [*command, *map(str, files)], env=DCMTK_ENV, capture_output=True, check=False
    )
    study.sent_at = time.time()
    if done.returncode:
        raise DemoError(f"storescu could not send study #{study.number}:\n{done.stderr.decode()}")


def _collect_srs(studies: list[Study], seen: set[Path]) -> None:
    """Read SRs that have arrived at the sink and match them to their studies."""
    import pydicom

    from mibi_node.analyses.thyroid.report import read_thyroid_report
    from mibi_node.report import read_probabilities

    by_uid = {s.study_instance_uid: s for s in studies}
    # storescp writes a file in place: one written to in the last half second may be
    # incomplete (a truncated SR still parses, with groups missing), so it waits a look.
    settled = time.time() - 0.5
    for path in sorted(SINK.glob("*")):
        if path in seen or not path.is_file():
            continue
        try:
            arrived = path.stat().st_mtime
            if arrived > settled:
                continue
            dataset = pydicom.dcmread(path)
            study = by_uid.get(str(dataset.get("StudyInstanceUID", "")))
            is_sr = str(dataset.get("SOPClassUID", "")).startswith(SR_STORAGE_PREFIX)
            is_seg = str(dataset.get("SOPClassUID", "")) == demo_knee.SEGMENTATION_STORAGE
            if study is not None and study.knee is not None and (is_sr or is_seg):
                # A knee study is complete when both its SR and its SEG are in.
                demo_knee.read_document(dataset, study.knee)
                if study.knee.complete:
                    study.sr_path, study.sr_arrived_at = path, arrived
            elif study is not None and study.lung is not None and (is_sr or is_seg):
                demo_lung.read_document(dataset, study.lung)
                if study.lung.complete:
                    study.sr_path, study.sr_arrived_at = path, arrived
            elif study is not None and is_sr:
                if study.analysis == "spine" and study.spine is not None:
                    demo_spine.read_sr(dataset, study.spine)
                elif study.analysis == "thyroid":
                    report = read_thyroid_report(dataset)
                    study.probabilities, study.reported = report.probabilities, report.reported
                    study.lobe_uptake = report.lobe_uptake
                else:
                    study.probabilities = read_probabilities(dataset)
                study.sr_path, study.sr_arrived_at = path, arrived
        except Exception:  # still being written: try again on the next look
            continue
        seen.add(path)


def _check_failures(studies: list[Study]) -> None:
    uids = {s.study_instance_uid: s.number for s in studies if s.analysis != "none"}
    rows = _query(
        "SELECT study_instance_uid, state, state_reason FROM study "
        "WHERE state IN ('FAILED', 'IGNORED')"
    )
    for uid, state, reason in rows:
        if uid in uids:
            raise DemoError(f"study #{uids[str(uid)]} is {state}: {reason}")


def _wait_for_srs(studies: list[Study], node: subprocess.Popen[bytes]) -> None:
    seen: set[Path] = set()
    deadline = time.monotonic() + SR_TIMEOUT
    columns = (
        TextColumn("   SRs at the PACS"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("srs", total=len(studies))
        while True:
            _collect_srs(studies, seen)
            done = sum(s.sr_path is not None for s in studies)
            progress.update(task, completed=done)
            if done == len(studies):
                return
            if node.poll() is not None:
                raise DemoError(f"the node stopped (exit status {node.returncode})")
            _check_failures(studies)
            if time.monotonic() > deadline:
                raise DemoError(
                    f"only {done} of {len(studies)} SRs arrived within {SR_TIMEOUT / 60:.0f} min"
                )
            time.sleep(0.25)


# -- 6.-7. what came back -----------------------------------------------------------------------


def _agreements() -> dict[str, str]:
    """Study Instance UID -> "agreeing members/members" from the node's latest MIBI result."""
    rows = _query(
        "SELECT s.study_instance_uid, j.result FROM job j JOIN study s ON s.id = j.study_id "
        "WHERE j.state = 'DONE' AND j.analysis = 'parathyroid' ORDER BY j.version"
    )
    agreements = {}
    for uid, text in rows:
        result = json.loads(str(text))
        members = len(result.get("member_probabilities") or {}) or 1
        agreeing = round(float(result["agreement"]) * members)
        agreements[str(uid)] = f"{agreeing}/{members}"
    return agreements


def _show_results(studies: list[Study], ignored: Study) -> None:
    _show_mibi([s for s in studies if s.analysis == "parathyroid"])
    _show_thyroid([s for s in studies if s.analysis == "thyroid"])
    demo_spine.show(
        console,
        [
            (s.number, s.spine, s.sr_arrived_at - s.sent_at)
            for s in studies
            if s.analysis == "spine" and s.spine is not None
        ],
    )
    demo_knee.show(
        console,
        [
            (s.number, s.knee, s.sr_arrived_at - s.sent_at)
            for s in studies
            if s.analysis == "knee" and s.knee is not None
        ],
    )
    demo_lung.show(
        console,
        [
            (s.number, s.lung, s.sr_arrived_at - s.sent_at)
            for s in studies
            if s.analysis == "lung" and s.lung is not None
        ],
    )
    _show_ignored(ignored)
    console.print(
        "Last image -> SR: from the study's last instance acknowledged to its SR in the PACS, "
        f"including the {QUIET_SECONDS} s quiet period that tells the node a study is complete "
        "and the wait behind the studies sent before it (one worker hosts every analysis)."
    )
    console.print(
        "[bold]These are demonstration models trained on synthetic phantoms, not on patients: "
        "NOT FOR DIAGNOSIS.[/] Every SR they write says so."
    )


def _show_mibi(studies: list[Study]) -> None:
    agreements = _agreements()
    table = Table(
        title=f"parathyroid analysis: {len(studies)} MIBI phantom studies, "
        "gamma camera -> mibi-node -> PACS"
    )
    table.add_column("study", justify="right")
    table.add_column("truth")
    table.add_column("prediction (SR)")
    table.add_column("probability", justify="right")
    table.add_column("agreement", justify="right")
    table.add_column("last image -> SR", justify="right")
    correct = 0
    for study in studies:
        probabilities = study.probabilities or {}
        predicted = max(probabilities, key=probabilities.__getitem__)
        right = predicted == study.truth
        correct += right
        mark = "[green]✓[/]" if right else "[red]✗[/]"
        table.add_row(
            f"#{study.number}",
            study.truth,
            f"{mark} {predicted}",
            f"{probabilities[predicted]:.2f}",
            agreements.get(study.study_instance_uid, "?"),
            f"{study.sr_arrived_at - study.sent_at:.1f} s",
        )
    console.print(table)
    console.print(
        f"parathyroid accuracy: {correct}/{len(studies)} ({correct / len(studies):.0%}). "
        "Agreement: members whose own top class is the prediction."
    )


def _show_thyroid(studies: list[Study]) -> None:
    table = Table(
        title=f"thyroid analysis: {len(studies)} thyroid phantom scans (multi-label findings)"
    )
    table.add_column("study", justify="right")
    table.add_column("truth")
    table.add_column("findings reported (SR)")
    table.add_column("probabilities", justify="right")
    table.add_column("lobes R/L", justify="right")
    table.add_column("last image -> SR", justify="right")
    exact = 0
    for study in studies:
        truth = tuple(study.truth.split(";"))
        probabilities = study.probabilities or {}
        right = set(truth) == set(study.reported)
        exact += right
        mark = "[green]✓[/]" if right else "[red]✗[/]"
        lobes = study.lobe_uptake or {}
        table.add_row(
            f"#{study.number}",
            ", ".join(truth),
            f"{mark} {', '.join(study.reported) or '-'}",
            " ".join(f"{probabilities[k]:.2f}" for k in study.reported),
            f"{lobes.get('right', 0):.0%}/{lobes.get('left', 0):.0%}",
            f"{study.sr_arrived_at - study.sent_at:.1f} s",
        )
    console.print(table)
    console.print(
        f"thyroid exact match (every finding right, none extra): {exact}/{len(studies)} "
        f"({exact / len(studies):.0%}). Lobes: each lobe's share of the gland's counts."
    )


def _show_ignored(study: Study) -> None:
    rows = _query(
        "SELECT state, state_reason FROM study WHERE study_instance_uid = ?",
        study.study_instance_uid,
    )
    if not rows or rows[0][0] != "IGNORED":
        raise DemoError(f"the bone scan is {rows[0][0] if rows else 'not in the database'}, "
                        "not IGNORED")  # fmt: skip
    console.print(f"the bone scan (Tc-99m medronate) was IGNORED, no SR: {rows[0][1]}")


def _show_sr(study: Study) -> None:
    if study.sr_path is None:
        return
    console.rule(f"the SR of study #{study.number} as DCMTK dsrdump shows it")
    done = subprocess.run(
        ["dsrdump", "+Pl", str(study.sr_path)], capture_output=True, text=True, check=False
    )
    sys.stdout.write((done.stdout or done.stderr).rstrip() + "\n")  # as dsrdump wrote it
    sys.stdout.flush()
    console.rule()


def _show_status_page(web_port: int) -> None:
    """What the node's status page and metrics say about the demo's studies."""
    base = f"http://127.0.0.1:{web_port}"
    try:
        with urllib.request.urlopen(f"{base}/api/studies", timeout=10) as response:
            rows = json.load(response)
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
            metrics = response.read().decode()
    except OSError as exc:
        raise DemoError(f"the status page at {base} did not answer: {exc}") from None
    states = Counter(str(row["state"]) for row in rows)
    delivered = sum(1 for row in rows if row.get("sr") == "delivered")
    done = Counter(
        {
            sample.labels["analysis"]: sample.value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == "mibi_node_analysis_results_total"
            and sample.labels["outcome"] == "done"
        }
    )
    console.print(
        f"6. status page {base}/ lists {len(rows)} studies ("
        + ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
        + f"), {delivered} with the SR delivered; /metrics counts analyses done: "
        + ", ".join(f"{name} {count:.0f}" for name, count in sorted(done.items()))
        + ". Run `make demo DEMO_ARGS=--keep` to keep the node up and browse it."
    )


def _diagnose(log: Path) -> None:
    console.rule(f"last lines of {_rel(log)}")
    if log.is_file():
        lines = log.read_text(errors="replace").splitlines()[-40:]
        console.print("\n".join(lines), markup=False)
    console.rule("mibi-node status")
    subprocess.run([*NODE, "status", "--data-dir", str(DATA)], cwd=ROOT, check=False)


def main() -> None:
    started = time.monotonic()
    _ensure_storescu()
    node: subprocess.Popen[bytes] | None = None
    sink: subprocess.Popen[bytes] | None = None
    node_log = DATA / "node.log"
    build_seconds = 0.0
    code = 0
    try:
        build_seconds = _ensure_bundles()
        _summarise_training_inputs()
        shutil.rmtree(DATA, ignore_errors=True)
        SINK.mkdir(parents=True)
        with (DATA / "sink.log").open("wb") as sink_out, node_log.open("wb") as node_out:
            sink_port = _free_port(11113)
            console.print(
                f"2. starting the PACS: DCMTK storescp as DEMO_PACS on 127.0.0.1:{sink_port}, "
                f"SRs into {_rel(SINK)}"
            )
            sink = _start(
                ["storescp", "-aet", "DEMO_PACS", "+xa", "-od", str(SINK), str(sink_port)],
                sink_out,
                DCMTK_ENV,
            )
            _wait_for(sink_port, sink, "storescp", DATA / "sink.log")
            port = _free_port(11112)
            web_port = _free_port(8080)
            config = DATA / "demo.toml"
            config.write_text(
                f"[web]\nport = {web_port}\n\n"
                f"[analyses.thyroid]\nenabled = true\nbundle = {json.dumps(str(THYROID_BUNDLE))}\n"
                f"[analyses.spine]\nenabled = true\nbundle = {json.dumps(str(demo_spine.BUNDLE))}\n"
                f"[analyses.knee]\nenabled = true\nbundle = {json.dumps(str(demo_knee.BUNDLE))}\n"
                f"[analyses.lung]\nenabled = true\nbundle = {json.dumps(str(demo_lung.BUNDLE))}\n"
            )
            console.print(
                f"3. starting the node: AE MIBI_NODE on 127.0.0.1:{port}, data in {_rel(DATA)}, "
                "analyses parathyroid, thyroid, spine, knee and lung, one CPU worker hosting the "
                f"five bundles, results to DEMO_PACS (log: {_rel(node_log)})"
            )
            node = _start(
                [
                    *NODE,
                    "serve",
                    "--config",
                    str(config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--data-dir",
                    str(DATA),
                    "--quiet-seconds",
                    str(QUIET_SECONDS),
                    "--bundle",
                    str(BUNDLE),
                    "--destination",
                    f"DEMO_PACS@127.0.0.1:{sink_port}",
                    "--workers",
                    "1",
                    "--device",
                    "cpu",
                ],
                node_out,
            )
            _wait_for(port, node, "the node", node_log)
            _wait_for_worker(node)
            studies = _make_studies()
            bone_scan = _make_bone_scan()
            bone_scan.number = len(studies) + 1
            count = Counter(s.analysis for s in studies)
            console.print(
                f"4. sending {count['parathyroid']} synthetic dual-phase MIBI studies, "
                f"{count['thyroid']} thyroid scans and one bone scan as GAMMA_CAM1, and "
                f"{count['spine']} lumbar spine MR studies (T1/T2 sagittal, T2 axial) and "
                f"{count['knee']} knee MR studies (3-D sagittal DESS, coronal PD) as "
                f"MR_SCANNER, and {count['lung']} chest CT studies (64 slices of 2.5 mm, 300 "
                "slices of 1 mm) as CT_SCANNER (phantoms, not patients) with DCMTK storescu, "
                "one association per study"
            )
            for study in [*studies, bone_scan]:
                _send(study, port)
            console.print(
                f"5. waiting for the SRs (each study is complete after {QUIET_SECONDS} s "
                "without a new instance; then a worker analyses it and the node sends the SR)"
            )
            _wait_for_srs(studies, node)
            _show_results(studies, bone_scan)
            _show_sr(next(s for s in studies if s.analysis == "thyroid"))
            _show_status_page(web_port)
            if "--keep" in sys.argv[1:]:
                console.print(
                    f"the node keeps running: open http://127.0.0.1:{web_port}/ (Ctrl-C stops it)"
                )
                while node.poll() is None:
                    time.sleep(1)
    except DemoError as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        if node is not None:
            _diagnose(node_log)
        code = 1
    except KeyboardInterrupt:
        console.print(
            "interrupted; stopping what the demo started (the node first finishes the studies "
            "its worker is analysing)"
        )
        code = 130
    finally:
        _stop(node, "the node", 60)
        _stop(sink, "storescp", 10)
    if code:
        sys.exit(code)
    total = time.monotonic() - started
    console.print(
        f"done in {total:.0f} s"
        + (f" ({build_seconds:.0f} s of it building the bundle)" if build_seconds else "")
        + f"; node and PACS stopped. Look again with: .venv/bin/mibi-node status --data-dir "
        f"{_rel(DATA)}"
    )


if __name__ == "__main__":
    main()
