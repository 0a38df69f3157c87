"""An intervention's options set in MonitorConfig change what its action does in a real training loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import topomon
from tests.integrations.test_loop import ALWAYS, train
from topomon.config import MonitorConfig
from topomon.testing import tiny_causal_lm

pytestmark = pytest.mark.slow


def run(tok: Any, out: Path, options: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    """Six steps of a plain loop where the baseline's alert switches the diversity regulariser on."""
    config = MonitorConfig(
        schedule="every",
        every_n_steps=100,
        worker="sync",
        topology=False,
        figures_every=0,
        alerts=ALWAYS,
        actions=[{"kind": "diversity", "value": 1.0}],
        intervention_options=options,
    )
    model = tiny_causal_lm("llama", seed=0)
    with topomon.watch(model, tok, output_dir=out, config=config) as mon:
        train(model, tok, mon, steps=6)
    assert [a.kind for a in mon.actions] == ["diversity"]
    return mon.session.interventions.target("diversity"), {
        k: v.detach().clone() for k, v in model.state_dict().items()
    }


def test_diversity_options_from_the_config_change_the_regulariser_and_the_training(tok, tmp_path):
    default, trained = run(tok, tmp_path / "default", {})
    chosen, trained_chosen = run(tok, tmp_path / "chosen", {"diversity": {"layers": [0], "kind": "entropy"}})
    n_blocks = 4  # tiny_causal_lm
    assert (default.layers, default.kind) == ([n_blocks - 1], "logdet")
    assert (chosen.layers, chosen.kind) == ([0], "entropy")
    # both acted from the first step on, each on its own block
    assert default.n_applied > 0 and chosen.n_applied > 0
    assert set(default.last_values) == {n_blocks - 1} and set(chosen.last_values) == {0}
    # the penalty took another gradient: the same seed and data end in another model
    assert any(not torch.equal(trained[k], trained_chosen[k]) for k in trained)
