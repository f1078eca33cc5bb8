"""The lung analysis on CPU: a 300-slice chest CT series received, analysed and returned as
SR, SEG and key image, against the goal (issue 18: the series' last instance -> SR and SEG
at the PACS <= 60 s on 2 cores) and against DCMTK storescp as the reception baseline
measured in the same run.

* Reception: the 300 CT Image Storage instances (128 x 128, 16-bit, 1 mm slices) sent by
  DCMTK storescu over one association, to ``mibi-node serve`` and to DCMTK storescp (the
  fastest peer of docs/BENCHMARKS.md), interleaved; instances/s and the ratio node/storescp.
  Every instance is counted where it arrived.
* End to end: from the node's acknowledgement of the last instance to the SR file in the
  PACS (storescp; the SEG and the key image travel on the same association), with the quiet
  period (2 s), the worker's steps (read, resample, detect, link, measure, SR + SEG + key
  image) from the job's timings.
* In process: ``read_lung_study`` + ``LungRunner.predict`` + ``build_lung_documents`` of the
  same series, batch 1, device cpu, the runner's split into its steps, and peak RSS.

The lung bundle is the trained demo bundle in var/bundles/lung-demo when it is there, else
the demo recipe's network trained briefly on 12 phantoms (the same compute per slice; a
detector with random weights finds lesions everywhere and would time a different linking).

Usage: python benchmarks/bench_lung.py [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import bench_e2e  # noqa: E402
from common import free_port, machine, stop, summary, wait_for_port, write_result  # noqa: E402

RECIPE = ROOT / "config" / "lung-demo.toml"
TRAINED = ROOT / "var" / "bundles" / "lung-demo"
GOAL_SECONDS = 60.0
SHAPE, SPACING = (300, 128, 128), (1.0, 1.5, 1.5)
QUIET_SECONDS = 2.0


def _lung_bundle(work: Path) -> Path:
    """The trained demo bundle, else the demo recipe trained briefly on 12 phantoms."""
    if (TRAINED / "bundle.json").is_file():
        return TRAINED
    from mibi_node.analyses.lung.phantom import write_lung_dataset
    from training.lung import main as train

    text = re.sub(r"(?m)^steps = \d+", "steps = 60", RECIPE.read_text())
    (work / "brief.toml").write_text(text)
    write_lung_dataset(work / "data", 12, 99)
    print("no trained lung bundle: training the demo recipe briefly (60 steps)", flush=True)
    if train(["train", str(work / "brief.toml"), str(work / "data"), "--out", str(work / "b")]):
        raise SystemExit("the brief lung training failed")
    return work / "b"


def _storescp(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    folder.mkdir(parents=True)
    process = subprocess.Popen(
        ["storescp", "-aet", "PACS", "+xa", "-od", str(folder), str(port)],
        env=bench_e2e.DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return process, port


def _send(port: int, files: list[Path], called: str) -> float:
    """Seconds storescu takes to send ``files`` over one association."""
    started = time.perf_counter()
    done = subprocess.run(
        [
            "storescu",
            "-aet",
            "CT_SCANNER",
            "-aec",
            called,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env=bench_e2e.DCMTK_ENV,
        capture_output=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"storescu failed: {done.stderr.decode()[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: run scripts/install-peers.sh")

    import pydicom
    import torch

    from mibi_node.analyses.base import EncodeContext
    from mibi_node.analyses.lung.phantom import make_lung_case, write_lung_study
    from mibi_node.analyses.lung.reader import read_lung_study
    from mibi_node.analyses.lung.report import build_lung_documents
    from mibi_node.analyses.lung.runner import LungRunner

    total = rounds + args.warmup
    work = Path(tempfile.mkdtemp(prefix="bench-lung-"))
    node = None
    plain = None
    rows: dict[str, list[float]] = {}
    sent_documents: list[int] = []
    try:
        bundle = _lung_bundle(work)
        # Bronchiectasis is what the demo bundle finds best: a SEG and a key image to time.
        kinds = ["bronchiectasis", "bronchiectasis", "ground_glass_opacity"]
        case = make_lung_case(4242, shape=SHAPE, spacing=SPACING, lesions=kinds)
        series = [
            write_lung_study(case, work / "studies" / f"{i:02d}", index=i) for i in range(total)
        ]
        runner = LungRunner(bundle, device="cpu")
        context = EncodeContext(
            device_uid="1.2.826.0.1.3680043.8.498.1", series_number=9941, instance_number=1,
            series_instance_uid="1.2.826.0.1.3680043.8.498.2", key_image=True,
        )  # fmt: skip
        plain, plain_port = _storescp(work / "storescp")
        config = (
            "[analyses.parathyroid]\nenabled = false\n"
            f"[analyses.lung]\nenabled = true\nbundle = {json.dumps(str(bundle))}\n"
        )
        node = bench_e2e.Node(work, config, [], calling="CT_SCANNER", quiet_seconds=QUIET_SECONDS)
        for index, files in enumerate(series):
            measured = index >= args.warmup
            # In process, this very series.
            started = time.perf_counter()
            study = read_lung_study(files)
            read = time.perf_counter() - started
            (result,) = runner.predict([study])
            predicted = time.perf_counter() - started
            headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
            documents = build_lung_documents(result, headers, context)
            spent = time.perf_counter() - started
            # Reception: storescp, then the node (which then analyses it).
            storescp_seconds = _send(plain_port, files, "PACS")
            node_seconds = _send(node.port, files, "MIBI_NODE")
            sent = time.time()
            got = node.wait_for_sr(study.study_instance_uid)
            arrived = sorted(node.pacs_dir.glob("*"))
            sent_documents.append(len(documents))
            if not measured:
                continue
            row = {
                "in-process read": read,
                "in-process predict": predicted - read,
                "in-process sr + seg + key image": spent - predicted,
                "in-process total": spent,
                "reception storescp": storescp_seconds,
                "reception node": node_seconds,
                "last instance -> sr at pacs": got["sr_file_time"] - sent,
                "stable -> delivered": got["delivered"] - got["job_created"],
                **{f"worker {k}": float(v) for k, v in got["timings"].items()},
            }
            for name, value in row.items():
                rows.setdefault(name, []).append(value)
            print(
                f"round {index - args.warmup + 1}: last instance -> SR "
                f"{row['last instance -> sr at pacs']:.1f} s, {len(documents)} documents, "
                f"{len(result.lesions)} lesions, {len(arrived)} files at the PACS",
                flush=True,
            )
        received = len(list((work / "storescp").glob("*")))
        if received != total * SHAPE[0]:
            raise RuntimeError(f"storescp holds {received} of {total * SHAPE[0]} instances")
        [(count,)] = node.query("SELECT count(*) FROM instance")
        if count != total * SHAPE[0]:
            raise RuntimeError(f"the node holds {count} of {total * SHAPE[0]} instances")
    finally:
        if node is not None:
            node.close()
        if plain is not None:
            stop(plain)
        shutil.rmtree(work, ignore_errors=True)

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"lung analysis, a {SHAPE[0]}-slice chest CT phantom ({SHAPE[1]} x {SHAPE[2]}, "
        f"{SPACING[0]:g} mm slices), {rounds} rounds after {args.warmup} warm-up, cpu, torch "
        f"threads {torch.get_num_threads()}, bundle {runner.bundle_name}:"
    )
    for name, values in rows.items():
        print(
            f"  {name:34s} median {statistics.median(values):7.2f} s "
            f"(min {min(values):.2f}, max {max(values):.2f})"
        )
    node_rate = SHAPE[0] / statistics.median(rows["reception node"])
    plain_rate = SHAPE[0] / statistics.median(rows["reception storescp"])
    e2e = statistics.median(rows["last instance -> sr at pacs"])
    print(
        f"  reception: node {node_rate:.0f} instances/s, storescp {plain_rate:.0f}/s, "
        f"ratio {node_rate / plain_rate:.2f}"
    )
    verdict = "PASS" if e2e <= GOAL_SECONDS else "FAIL"
    if min(sent_documents) < 2:
        print("  note: a round reported no lesion, so its SR came without a SEG")
    print(f"  goal: last instance -> SR + SEG <= {GOAL_SECONDS:.0f} s: {e2e:.1f} s {verdict}")
    print(f"  peak RSS of this process {peak_mib:.0f} MiB")
    write_result(
        "lung",
        {
            "machine": machine(torch_info=True),
            "rounds": rounds,
            "series": {"shape": list(SHAPE), "spacing": list(SPACING)},
            "seconds": {name: summary(values) for name, values in rows.items()},
            "reception_instances_per_s": {"node": node_rate, "storescp": plain_rate},
            "goal_seconds": GOAL_SECONDS,
            "verdict": verdict,
            "peak_rss_mib": peak_mib,
        },
    )


if __name__ == "__main__":
    main()
