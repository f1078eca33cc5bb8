"""A plain pynetdicom Storage SCP (chunked data set + os.replace): the baseline receiver.

Usage: python benchmarks/plain_scp.py PORT OUT_DIR
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, _config, evt


def main() -> None:
    port, out = int(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(out)
    _config.STORE_RECV_CHUNKED_DATASET = True

    def on_store(event: evt.Event) -> int:
        os.replace(event.dataset_path, out / f"{event.request.AffectedSOPInstanceUID}.dcm")
        return 0x0000

    ae = AE("PLAIN")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.maximum_associations = 16
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main()
