"""`make demo`: the whole loop on one machine, from a gamma camera to an SR in PACS.

1. builds the demonstration model bundle once (600 phantom studies, about 5 minutes of
   training on 2 CPU cores) and reuses it afterwards;
2. starts DCMTK storescp as the PACS that receives the SRs (AE DEMO_PACS);
3. starts the node with one CPU worker that sends its SRs to that PACS;
4. sends 10 phantom studies with DCMTK storescu, one association per study, as a camera would;
5. waits for the 10 SRs, then shows truth, prediction and the time from each study's last
   instance to its SR in PACS, and one SR as DCMTK's dsrdump prints it.

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
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO

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
BIN = Path(sys.executable).parent
NODE = [str(BIN / "mibi-node")]
STUDY_COUNT = 10
QUIET_SECONDS = 2
SR_TIMEOUT = 600.0
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
    truth: str
    folder: Path
    sent_at: float = 0.0  # time.time() when its last instance was acknowledged
    sr_path: Path | None = None
    sr_arrived_at: float = 0.0
    probabilities: dict[str, float] | None = None


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


# -- 1. the model bundle ---------------------------------------------------------------------


def _ensure_bundle() -> float:
    """Train the demo bundle unless it is there; returns the seconds spent building it."""
    manifest = BUNDLE / "bundle.json"
    if manifest.is_file():
        provenance = json.loads(manifest.read_text()).get("provenance", {})
        command = str(provenance.get("training_command", ""))
        console.print(
            f"1. reusing the model bundle in {_rel(BUNDLE)} "
            f"(built {provenance.get('created', '?')}; delete the folder to build it again)"
        )
        if "init-bundle" in command:
            console.print(
                "   [bold yellow]note:[/] this bundle has random weights (mibi-node init-bundle): "
                "its predictions mean nothing"
            )
        return 0.0
    started = time.monotonic()
    console.print(
        f"1. building the demonstration model bundle in {_rel(BUNDLE)}: 600 phantom studies, "
        "then training three members and fitting their fusion.\n"
        "   This takes about 5 minutes on 2 idle CPU cores (longer on a busy machine) and happens "
        "once; later runs reuse it."
    )
    shutil.rmtree(TRAIN_DATA, ignore_errors=True)
    synth = [*NODE, "synth", "--out", str(TRAIN_DATA), "--studies", "600", "--seed", "1"]
    if subprocess.run(synth, cwd=ROOT, check=False).returncode:
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
    ]
    code = subprocess.run(train, cwd=ROOT, check=False).returncode
    if code or not manifest.is_file():
        raise DemoError(
            f"training the demo bundle failed (exit status {code}); the reason is printed "
            f"above. Nothing was sent. `make demo` tries again from the start."
        )
    seconds = time.monotonic() - started
    console.print(f"   bundle ready in {seconds / 60:.1f} min")
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
    return [
        Study(n, row["study_instance_uid"], row["label"], STUDIES / row["path"])
        for n, row in enumerate(rows, start=1)
    ]


def _send(study: Study, port: int) -> None:
    files = sorted(study.folder.glob("*.dcm"))
    command = ["storescu", "-aet", "GAMMA_CAM1", "-aec", "MIBI_NODE", "127.0.0.1", str(port)]
    done = subprocess.run(
        [*command, *map(str, files)], env=DCMTK_ENV, capture_output=True, check=False
    )
    study.sent_at = time.time()
    if done.returncode:
        raise DemoError(f"storescu could not send study #{study.number}:\n{done.stderr.decode()}")


def _collect_srs(studies: list[Study], seen: set[Path]) -> None:
    """Read SRs that have arrived at the sink and match them to their studies."""
    import pydicom

    from mibi_node.report import read_probabilities

    by_uid = {s.study_instance_uid: s for s in studies}
    for path in sorted(SINK.glob("*")):
        if path in seen or not path.is_file():
            continue
        try:
            dataset = pydicom.dcmread(path)
            arrived = path.stat().st_mtime
        except Exception:  # still being written: try again on the next look
            continue
        seen.add(path)
        study = by_uid.get(str(dataset.get("StudyInstanceUID", "")))
        if study is None or not str(dataset.get("SOPClassUID", "")).startswith(SR_STORAGE_PREFIX):
            continue
        study.sr_path, study.sr_arrived_at = path, arrived
        study.probabilities = read_probabilities(dataset)


def _check_failures(studies: list[Study]) -> None:
    uids = {s.study_instance_uid: s.number for s in studies}
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
    """Study Instance UID -> "agreeing members/members" from the node's latest job result."""
    rows = _query(
        "SELECT s.study_instance_uid, j.result FROM job j JOIN study s ON s.id = j.study_id "
        "WHERE j.state = 'DONE' ORDER BY j.version"
    )
    agreements = {}
    for uid, text in rows:
        result = json.loads(str(text))
        members = len(result.get("member_probabilities") or {}) or 1
        agreeing = round(float(result["agreement"]) * members)
        agreements[str(uid)] = f"{agreeing}/{members}"
    return agreements


def _show_results(studies: list[Study]) -> None:
    agreements = _agreements()
    table = Table(title=f"{len(studies)} phantom studies: gamma camera -> mibi-node -> PACS")
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
        f"accuracy: {correct}/{len(studies)} ({correct / len(studies):.0%}). Agreement: members "
        "whose own top class is the prediction. Last image -> SR: from the study's last instance "
        "acknowledged to its SR in the PACS, including the "
        f"{QUIET_SECONDS} s quiet period that tells the node a study is complete and the wait "
        "behind the studies sent before it (one worker)."
    )
    console.print(
        "[bold]This is a demonstration model trained on synthetic phantoms, not on patients: "
        "NOT FOR DIAGNOSIS.[/] Every SR it writes says so."
    )


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
    done = sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "mibi_node_jobs_finished_total" and sample.labels["outcome"] == "done"
    )
    console.print(
        f"6. status page {base}/ lists {len(rows)} studies ("
        + ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
        + f"), {delivered} with the SR delivered; /metrics counts {done:.0f} analyses "
        "done. Run `make demo DEMO_ARGS=--keep` to keep the node up and browse it."
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
        build_seconds = _ensure_bundle()
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
            config.write_text(f"[web]\nport = {web_port}\n")
            console.print(
                f"3. starting the node: AE MIBI_NODE on 127.0.0.1:{port}, data in {_rel(DATA)}, "
                f"one CPU worker, results to DEMO_PACS (log: {_rel(node_log)})"
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
            console.print(
                f"4. sending {len(studies)} synthetic dual-phase MIBI studies (phantoms, not "
                "patients) with DCMTK storescu as GAMMA_CAM1, one association per study"
            )
            for study in studies:
                _send(study, port)
            console.print(
                f"5. waiting for the SRs (each study is complete after {QUIET_SECONDS} s "
                "without a new instance; then a worker analyses it and the node sends the SR)"
            )
            _wait_for_srs(studies, node)
            _show_results(studies)
            _show_sr(studies[0])
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
