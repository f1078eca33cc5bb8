"""The whole loop on tiny data: train -> fuse -> bundle -> evaluate (-> predict), and --resume.

Phantom studies make the data: as PNG class folders (the patent's layout, one channel) and,
when the NM reader is installed, as DICOM with ``labels.csv`` (two channels, localisation).
Members are tiny (32 px, narrow heads) and train for 1-2 epochs: these tests prove that the
pieces fit together and that what is written is right, not that the model is good.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from mibi_node.inference.bundle import load_bundle
from mibi_node.phantom.generator import assign_labels, make_study
from training.command import evaluate, train
from training.data import CLASS_KEYS, discover
from training.pipeline import TrainingError, train_bundle

ROOT = Path(__file__).resolve().parents[1]


def _recipe(path: Path, channels: list[str], epochs: int = 2, **training: object) -> Path:
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in training.items())
    path.write_text(
        textwrap.dedent(
            f"""\
            name = "tiny"
            version = "0.0.1"
            intended_use = "demonstration"

            [input]
            channels = {json.dumps(channels)}
            size = 32

            [tta]
            views = ["identity", "hflip"]

            [[members]]
            arch = "resnet10t"
            heads = 2
            embed_dim = 16

            [[members]]
            name = "second"
            arch = "resnet10t"
            heads = 2
            embed_dim = 16

            [training]
            epochs = {epochs}
            batch_size = 8
            lr = 0.002
            bootstrap = 20
            threads = 2
            """
        )
        + extra,
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def png_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 phantom studies (8 per class), delayed image only, as one PNG per study."""
    root = tmp_path_factory.mktemp("png-data")
    for index, label in enumerate(assign_labels(40, CLASS_KEYS, None, seed=11)):
        folder = root / label
        folder.mkdir(exist_ok=True)
        image = make_study(label, seed=11, index=index).images["delayed"]
        Image.fromarray(image.astype(np.uint16)).save(folder / f"study-{index:02d}.png")
    return root


def test_train_fuse_bundle_evaluate_on_class_folders(png_data: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path / "tiny.toml", ["delayed"])
    out = tmp_path / "bundle"
    events: list[str] = []
    result = train_bundle(
        recipe,
        png_data,
        out,
        device="cpu",
        cache_dir=tmp_path / "cache",
        progress=lambda event, *args: events.append(event),
    )

    # a complete, loadable bundle whose fusion is the fitted one
    bundle = load_bundle(out)
    assert bundle.member_names == ("resnet10t", "second")
    assert bundle.channels == ("delayed",)
    assert bundle.fusion.weights == pytest.approx(result.fusion.fusion.weights)
    assert sum(bundle.fusion.weights) == pytest.approx(1.0)
    assert bundle.fusion.temperature == pytest.approx(result.fusion.fusion.temperature)
    provenance = bundle.manifest.provenance
    assert provenance.data_fingerprint == discover(png_data).fingerprint
    assert "fitted k = [" in provenance.notes and "equal nll" in provenance.notes
    assert bundle.intended_use == "demonstration"

    # split: 20 % per class held out, saved for the test module
    split = json.loads((out / "training" / "split.json").read_text())
    assert len(split["test"]) == 10 and len(split["val"]) == 5 and len(split["train"]) == 25
    assert not set(split["test"]) & set(split["train"] + split["val"])

    # per-member logs; checkpoints removed after success
    for name in bundle.member_names:
        member_dir = out / "training" / "members" / name
        history = (member_dir / "history.csv").read_text().splitlines()
        assert history[0].startswith("epoch,lr,train_loss,val_loss")
        assert len(history) == 3
        assert (member_dir / "learning-curve.png").stat().st_size > 1000
        assert not (member_dir / "last.pt").exists()
    assert {"stage", "read", "member", "step", "epoch"} <= set(events)

    # reports: training record, test evaluation, plots
    reports = out / "reports"
    record = json.loads((reports / "training.json").read_text())
    assert record["fusion"]["choice"] == "fitted"
    assert set(record["fusion"]["scores"]) == {"fitted", "equal", "vote", "chosen"}
    assert record["members"]["resnet10t"]["epochs"] == 2
    evaluation = json.loads((reports / "evaluation-test.json").read_text())
    assert evaluation["n_studies"] == 10
    assert list(evaluation["rows"]) == [
        "resnet10t",
        "second",
        "ensemble",
        "resnet10t (no TTA)",
        "second (no TTA)",
        "ensemble (no TTA)",
    ]
    ensemble = evaluation["rows"]["ensemble"]
    assert 0.0 <= ensemble["accuracy"]["value"] <= 1.0
    assert (
        ensemble["accuracy"]["low"] <= ensemble["accuracy"]["value"] <= ensemble["accuracy"]["high"]
    )
    assert set(ensemble["sensitivity"]) == set(CLASS_KEYS)
    assert np.asarray(evaluation["confusion"]["matrix"]).sum() == 10
    assert evaluation["localisation"] is None  # class folders carry no lesion centres
    assert result.evaluation is not None
    assert result.evaluation.rows["ensemble"]["accuracy"].value == ensemble["accuracy"]["value"]
    markdown = (reports / "evaluation-test.md").read_text()
    assert "| ensemble (no TTA) |" in markdown and "Macro AUC" in markdown
    for png in ("confusion-test.png", "roc-test.png", "learning-curve-second.png"):
        assert (reports / png).stat().st_size > 1000

    # the CLI's evaluate command reproduces the table on the saved test split
    app = typer.Typer()
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    again = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--bundle",
            str(out),
            "--data",
            str(png_data),
            "--bootstrap",
            "0",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "again"),
        ],
    )
    assert again.exit_code == 0, again.output
    assert "ensemble" in again.output
    repeated = json.loads((tmp_path / "again" / "evaluation-test.json").read_text())
    assert repeated["rows"]["ensemble"]["accuracy"]["value"] == ensemble["accuracy"]["value"]

    # a second train into the same folder is refused without --overwrite; the CLI says so
    with pytest.raises(TrainingError, match="--overwrite"):
        train_bundle(recipe, png_data, out, device="cpu", cache_dir=tmp_path / "cache")
    refused = CliRunner().invoke(
        app, ["train", "--recipe", str(recipe), "--data", str(png_data), "--out", str(out)]
    )
    assert refused.exit_code == 2
    assert "already holds a model bundle" in refused.output


def test_a_recipe_with_two_channels_refuses_png_studies(png_data: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path / "tiny.toml", ["early", "delayed"])
    with pytest.raises(Exception, match="one channel"):
        train_bundle(recipe, png_data, tmp_path / "out", device="cpu", cache_dir=tmp_path / "cache")


_KILLED_RUN = """
import sys
from training.pipeline import train_bundle
train_bundle(sys.argv[1], sys.argv[2], sys.argv[3], device="cpu", cache_dir=sys.argv[4], evaluate=False)
"""


def test_resume_after_a_killed_run_continues_from_the_checkpoint(
    png_data: Path, tmp_path: Path
) -> None:
    import torch

    recipe = _recipe(tmp_path / "tiny.toml", ["delayed"], epochs=4, patience=10)
    cache = tmp_path / "cache"
    # reference: the same training without interruption
    reference = train_bundle(
        recipe, png_data, tmp_path / "reference", device="cpu", cache_dir=cache, evaluate=False
    )

    out = tmp_path / "killed"
    checkpoint = out / "training" / "members" / "resnet10t" / "last.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUN, str(recipe), str(png_data), str(out), str(cache)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_after = torch.load(checkpoint, weights_only=False)["epoch"]
    assert 1 <= killed_after < 4
    assert not (out / "bundle.json").exists()

    # without --resume the unfinished run is not silently thrown away
    with pytest.raises(TrainingError, match="--resume"):
        train_bundle(recipe, png_data, out, device="cpu", cache_dir=cache, evaluate=False)

    resumed = train_bundle(
        recipe, png_data, out, device="cpu", cache_dir=cache, resume=True, evaluate=False
    )
    assert resumed.members["resnet10t"]["resumed_from"] == killed_after
    assert resumed.members["resnet10t"]["epochs"] == 4
    assert resumed.members["second"]["resumed_from"] == 0
    history = (out / "training" / "members" / "resnet10t" / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2", "3", "4"]
    # same batches, same augmentation, same optimiser state: the same weights as without a kill
    assert resumed.fusion.fusion.weights == pytest.approx(reference.fusion.fusion.weights, abs=1e-4)
    a = load_bundle(out).build_member("resnet10t").state_dict()
    b = load_bundle(tmp_path / "reference").build_member("resnet10t").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def dicom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mibi_node.imaging.nm", reason="the NM reader is not installed yet")
    from mibi_node.phantom.generator import generate_studies

    root = tmp_path_factory.mktemp("dicom-data")
    generate_studies(root, 40, seed=5)
    return root


def test_phantom_dicom_loop_with_localisation_and_predict(dicom_data: Path, tmp_path: Path) -> None:
    from mibi_node.inference.command import predict

    recipe = _recipe(tmp_path / "tiny.toml", ["early", "delayed"], epochs=1, fusion="vote")
    out = tmp_path / "bundle"
    result = train_bundle(recipe, dicom_data, out, device="cpu", cache_dir=tmp_path / "cache")
    bundle = load_bundle(out)
    assert bundle.fusion.method == "majority"
    assert bundle.channels == ("early", "delayed")
    assert result.evaluation is not None
    evaluation = json.loads((out / "reports" / "evaluation-test.json").read_text())
    localisation = evaluation["localisation"]
    assert localisation is not None and localisation["studies"] >= 4  # 2+ per focal class
    assert 0 <= localisation["hits"] <= localisation["localised"] <= localisation["studies"]

    # the trained bundle serves: predict one held-out study through the CLI command
    uid = json.loads((out / "training" / "split.json").read_text())["test"][0]
    rows = [line.split(",") for line in (dicom_data / "labels.csv").read_text().splitlines()[1:]]
    folder = dicom_data / next(row[2] for row in rows if row[0] == uid)
    app = typer.Typer()
    app.command("predict")(predict)
    app.command("other")(evaluate)
    output = CliRunner().invoke(
        app, ["predict", str(folder), "--bundle", str(out), "--json", "--device", "cpu"]
    )
    assert output.exit_code == 0, output.output
    document = json.loads(output.stdout)
    assert document["bundle"]["name"] == "tiny"
    assert sum(document["studies"][0]["probabilities"].values()) == pytest.approx(1.0)
