"""A real Orthanc as the PACS of a test: on loopback ports, in a temporary folder.

    with OrthancServer(tmp_path) as pacs:
        send_files(files, Destination(ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.dicom_port), ...)
        assert pacs.instances_of_study(study_uid)[0]["SOPInstanceUID"] == ...

or take the ``orthanc_server`` fixture (``from orthanc import orthanc_server  # noqa: F401``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ports import free_port

__all__ = ["OrthancServer", "find_orthanc", "orthanc_server"]

_FALLBACK_BINARY = Path("/usr/sbin/Orthanc")
#: Debian's ``orthanc-dicomweb`` (scripts/install-peers.sh installs it).
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def find_orthanc() -> str | None:
    """The Orthanc executable, or ``None`` when it is not installed."""
    found = shutil.which("Orthanc")
    if found is None and _FALLBACK_BINARY.is_file():
        found = str(_FALLBACK_BINARY)
    return found


class OrthancServer:
    """An Orthanc subprocess with a generated configuration; a context manager.

    Parameters
    ----------
    folder
        Where the configuration, the log, the storage and the index go (one per server).
    ae_title
        Orthanc's own AE title; ``DicomCheckCalledAet`` is on, so a C-STORE addressed to
        another title is rejected.
    modalities
        ``DicomModalities``: name -> ``[AE, host, port]`` (or Orthanc's object form), for
        tests where Orthanc sends to the node.
    dicomweb
        Load the DICOMweb plugin (:data:`DICOMWEB_PLUGIN`): QIDO-RS, WADO-RS and STOW-RS
        under ``/dicom-web/`` on the HTTP port.
    config
        More configuration keys, applied last.
    """

    def __init__(
        self,
        folder: Path,
        *,
        ae_title: str = "ORTHANC",
        modalities: dict[str, Any] | None = None,
        dicomweb: bool = False,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.config_path = folder / "orthanc.json"
        self.log_path = folder / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.config: dict[str, Any] = {
            "Name": "mibi-node-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpThreadsCount": 4,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomThreadsCount": 2,
            "DicomModalities": modalities or {},
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "ExecuteLuaEnabled": False,
        }
        if dicomweb:
            self.config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            self.config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        self.config.update(config or {})

    # -- life cycle ----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> OrthancServer:
        """Start Orthanc; return once its REST API answers (or fail with its log's tail)."""
        binary = find_orthanc()
        if binary is None:
            raise RuntimeError("Orthanc is not installed: run scripts/install-peers.sh")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [binary, "--no-jobs", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with status {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                self.rest("/system")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout:g} s:\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        """Terminate Orthanc: SIGTERM, then SIGKILL after ``grace`` seconds; safe to repeat.

        Orthanc takes about 3 s to stop cleanly (its HTTP and DICOM servers poll).
        """
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of Orthanc's log, for failure messages."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- REST ----------------------------------------------------------------------------

    def rest(self, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        """GET ``path`` (POST ``body`` as JSON when given) and return the decoded JSON."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=data,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def studies(self) -> list[str]:
        """Orthanc's identifiers of its studies."""
        return list(self.rest("/studies"))

    def instances_of_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """The stored instances of a study, each as Orthanc's simplified tags
        (``{"SOPInstanceUID": "...", "PatientName": "...", ...}``)."""
        found = self.rest(
            "/tools/find",
            {"Level": "Instance", "Query": {"StudyInstanceUID": study_instance_uid}},
        )
        return [self.rest(f"/instances/{orthanc_id}/simplified-tags") for orthanc_id in found]

    def delete_instance(self, sop_instance_uid: str) -> None:
        """Remove a stored instance, as a PACS that lost it would have (KeyError if absent)."""
        found = self.rest(
            "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}
        )
        if not found:
            raise KeyError(sop_instance_uid)
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/instances/{found[0]}", method="DELETE"
        )
        with urllib.request.urlopen(request, timeout=10):
            pass

    def instance_file(self, sop_instance_uid: str) -> bytes:
        """The stored DICOM file of an instance, byte for byte."""
        found = self.rest(
            "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}
        )
        if not found:
            raise KeyError(sop_instance_uid)
        url = f"http://127.0.0.1:{self.http_port}/instances/{found[0]}/file"
        with urllib.request.urlopen(url, timeout=10) as response:
            return bytes(response.read())


@pytest.fixture
def orthanc_server(tmp_path: Path) -> Iterator[OrthancServer]:
    """A started Orthanc (AE title ``ORTHANC``) for one test; skips when not installed.

    Killed at the end without waiting for a clean stop: its folder is thrown away.
    """
    if find_orthanc() is None:
        pytest.skip("Orthanc is not installed: run scripts/install-peers.sh")
    server = OrthancServer(tmp_path / "orthanc")
    try:
        server.start()
        yield server
    finally:
        server.stop(grace=0.2)
