"""The patent's nine members at 224 px start training and checkpoint on the CPU (1 step each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mibi_node.inference.members import PATENT_ARCHS
from mibi_node.inference.recipe import load_recipe
from training.config import training_config
from training.data import CLASS_KEYS, TrainingArrays
from training.trainer import train_member

pytestmark = pytest.mark.slow


def test_full_recipe_members_take_one_step_and_checkpoint(tmp_path: Path) -> None:
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "config" / "ensemble-full.toml")
    assert tuple(m.arch for m in recipe.members) == PATENT_ARCHS
    assert recipe.input.size == 224
    config = training_config(recipe, epochs=1, batch_size=2, threads=2)
    size, channels = recipe.input.size, len(recipe.input.channels)
    rng = np.random.default_rng(0)
    arrays = TrainingArrays(
        inputs=rng.uniform(0, 1, (4, channels, size, size)).astype(np.float32),
        labels=np.array([0, 1, 2, 3]),
        keys=("a", "b", "c", "d"),
        count_scale=np.full((4, channels), 100.0, np.float32),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        for index, spec in enumerate(recipe.members):
            work = tmp_path / spec.name
            run = train_member(
                spec,
                recipe,
                config.for_member(spec.name),
                arrays,
                np.array([0, 1]),
                np.array([2, 3]),
                work,
                seed_offset=index,
                max_steps=1,
            )
            assert len(run.history) == 1 and np.isfinite(run.history[0]["train_loss"])
            state = torch.load(work / "last.pt", weights_only=False)
            assert state["epoch"] == 1
            assert state["optimiser"]["state"], f"{spec.name}: no optimiser step recorded"
            assert state["scheduler"]["last_epoch"] == 1
            logits = run.module(torch.as_tensor(arrays.inputs[:1]))
            assert logits.shape == (1, len(CLASS_KEYS))
            del run, state
    finally:
        torch.set_num_threads(threads)
