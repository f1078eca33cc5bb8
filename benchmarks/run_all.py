"""`make bench`: every benchmark in quick mode (pass --full for the complete runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "bench_ingest.py",
    "bench_denoise.py",
    "bench_inference.py",
    "bench_e2e.py",
    "bench_spine.py",
    "bench_knee.py",
    "bench_lung.py",
    "bench_queue.py",
]


def main() -> None:
    full = "--full" in sys.argv[1:]
    failed = []
    for name in BENCHMARKS:
        script = HERE / name
        if not script.exists():
            continue
        print(f"\n=== {name} ===", flush=True)
        command = [sys.executable, str(script)] + ([] if full else ["--quick"])
        if subprocess.run(command, check=False).returncode:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
