"""The monitor in real trainers: transformers/TRL SFT and DPO, with and without LoRA."""

import math

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from tests.integrations.conftest import read_jsonl, scalar_events
from topomon import TopoMonitor
from topomon.config import ConfigError

pytestmark = pytest.mark.slow


def sft_args(out, **kw):
    from trl import SFTConfig

    base = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        max_length=48,
        seed=7,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return SFTConfig(**base)


def run_sft(model, tok, data, out, monitor=None, extra_callbacks=(), **kw):
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=sft_args(out, **kw),
        train_dataset=data,
        processing_class=tok,
        callbacks=[*extra_callbacks, *([monitor] if monitor else [])],
    )
    trainer.train()
    return trainer


def test_sft_writes_tensorboard_and_jsonl(model, tok, sft_data, tmp_path):
    mon = TopoMonitor(
        stage="sft", schedule="every", every_n_steps=2, figures_every=2, max_points=128, topology_points=64
    )
    run_sft(model, tok, sft_data, tmp_path, mon)
    all_recs = [r for r in read_jsonl(tmp_path / "topomon" / "metrics.jsonl") if r["kind"] == "metrics"]
    # the first capture of a new run is the base model's baseline too, stored under stage "base"
    base = [r for r in all_recs if r["stage"] == "base"]
    recs = [r for r in all_recs if r["stage"] == "sft"]
    layers = sorted({r["layer"] for r in recs})
    # four blocks and the final norm; "model" holds the model-level metrics (logits, trajectories)
    assert layers == ["final_norm", "layer_0", "layer_1", "layer_2", "layer_3", "model"]
    model = [r for r in recs if r["layer"] == "model"]
    for r in model:
        m = r["metrics"]
        # a random tiny model predicts poorly: accuracy in [0, 1], entropy up to log(vocab)
        assert 0 <= m["logit_accuracy"] <= 1 and 0 < m["logit_entropy"] <= math.log(512) + 1e-6
        assert 0 <= m["logit_ece"] <= 1 and m["logit_nll"] > 0
        assert 0 < m["traj_straightness_mean"] <= 1 and -1 <= m["traj_cosine_mean"] <= 1
        assert 0 <= m["cka_adjacent_mean"] <= 1 + 1e-9
    recs = [r for r in recs if r["layer"] != "model"]
    layers = layers[:-1]
    step0 = [r for r in all_recs if r["stage"] == "sft" and r["step"] == 0]
    assert sorted((r["layer"], str(r["metrics"])) for r in base) == sorted(
        (r["layer"], str(r["metrics"])) for r in step0
    )
    # one record per capture and layer; captures at the baseline (0) and every 2 steps
    assert sorted((r["step"], r["layer"]) for r in recs) == sorted(
        (s, ly) for s in (0, 2, 4) for ly in layers
    )
    assert all(r["metrics"]["n_points"] == 128 for r in recs)
    assert (
        "topomon/logit_ece/model"
        in scalar_events(tmp_path / "topomon" / "tensorboard" / "sft").Tags()["scalars"]
    )
    health = [r for r in read_jsonl(tmp_path / "topomon" / "metrics.jsonl") if r["kind"] == "health"]
    assert health[-1]["completed"] == 3 and health[-1]["dropped"] == 0 and health[-1]["flushed"] == 1

    acc = scalar_events(tmp_path / "topomon" / "tensorboard" / "sft")
    tags = acc.Tags()
    for layer in layers:
        steps = [e.step for e in acc.Scalars(f"topomon/rankme/{layer}")]
        assert steps == [0, 2, 4]
    vals = {e.step: e.value for e in acc.Scalars("topomon/rankme/final_norm")}
    by_step = {r["step"]: r["metrics"]["rankme"] for r in recs if r["layer"] == "final_norm"}
    assert all(math.isclose(vals[s], by_step[s], rel_tol=1e-6) for s in by_step)
    # topology on the last captured layer only (the default), with activity from the second capture on
    assert "topomon/h1_total_persistence/final_norm" in tags["scalars"]
    assert "topomon/h1_total_persistence/layer_0" not in tags["scalars"]
    assert [e.step for e in acc.Scalars("topomon/topo_activity/final_norm")] == [2, 4]
    # figures at captures 0 and 2 (figures_every=2): persistence diagram and eigenspectrum images
    assert [e.step for e in acc.Images("topomon_figures/persistence/final_norm")] == [0, 4]
    # the eigenspectra of every captured layer in one figure per figure capture
    assert [e.step for e in acc.Images("topomon_figures/eigenspectra")] == [0, 4]
    assert not any(t.startswith("topomon_figures/eigenspectrum") for t in tags["images"])
    # the model-level arrays of a figure capture: linear CKA of every pair of captured layers
    with np.load(tmp_path / "topomon" / "diagrams" / "sft__4__model.npz") as z:
        assert sorted(z["cka_layers"]) == ["final_norm", "layer_0", "layer_1", "layer_2", "layer_3"]
        assert z["cka"].shape == (5, 5) and np.allclose(np.diag(z["cka"]), 1.0)
        assert np.allclose(z["cka"], z["cka"].T) and ((z["cka"] > 0) & (z["cka"] <= 1 + 1e-9)).all()
    assert "custom_scalars__config__" in tags["tensors"]
    assert "topomon/health/dropped" in tags["scalars"]


def test_probe_captures_do_not_change_training(tok, sft_data, tmp_path):
    from topomon.testing import tiny_causal_lm

    class Grads(TrainerCallback):
        def __init__(self):
            self.norms = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            self.norms.append(sum(float(p.grad.norm()) for p in model.parameters() if p.grad is not None))

    runs = []
    for with_monitor in (False, True):
        m = tiny_causal_lm("llama", seed=0)
        g = Grads()
        from trl import SFTTrainer

        cbs = [g] + ([TopoMonitor(schedule="every", every_n_steps=1, worker="sync")] if with_monitor else [])
        tr = SFTTrainer(
            model=m,
            args=sft_args(tmp_path / str(with_monitor)),
            train_dataset=sft_data,
            processing_class=tok,
            callbacks=cbs,
        )
        tr.train()
        losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
        runs.append((losses, g.norms, [p.detach().clone() for p in m.parameters()], m.training))
    (l0, g0, p0, t0), (l1, g1, p1, t1) = runs
    assert len(l0) == 4 and l0 == l1
    assert g0 == g1
    assert all(torch.equal(a, b) for a, b in zip(p0, p1, strict=True))
    assert t0 == t1


def test_an_unchanged_model_gives_identical_metrics(model, tok, sft_data, tmp_path):
    mon = TopoMonitor(schedule="every", every_n_steps=2, worker="thread", max_points=96, topology_points=64)
    run_sft(model, tok, sft_data, tmp_path, mon, learning_rate=0.0)
    recs = [
        r
        for r in read_jsonl(tmp_path / "topomon" / "metrics.jsonl")
        if r["kind"] == "metrics" and r["stage"] == "train"
    ]
    by_layer = {}
    for r in recs:
        by_layer.setdefault(r["layer"], []).append(r)
    assert "model" in by_layer
    for layer, rs in by_layer.items():
        first = {k: v for k, v in rs[0]["metrics"].items() if not k.startswith("topo_activity")}
        for r in rs[1:]:
            again = {k: v for k, v in r["metrics"].items() if not k.startswith("topo_activity")}
            assert again == first, layer
    for r in by_layer["final_norm"][1:]:
        assert r["metrics"]["topo_activity"] == 0.0 and r["metrics"]["topo_drift"] == 0.0


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_with_and_without_lora(tok, dpo_data, tmp_path, lora):
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from topomon.testing import tiny_causal_lm

    args = DPOConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        max_length=64,
        disable_tqdm=True,
        logging_steps=1,
    )
    mon = TopoMonitor(stage="dpo", schedule="every", every_n_steps=1, layers=[-1], topology=False)
    peft_config = (
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if lora else None
    )
    # a model built from a config has no hub id: without LoRA the reference model is passed explicitly
    ref = None if lora else tiny_causal_lm("llama", seed=1)
    trainer = DPOTrainer(
        model=tiny_causal_lm("llama", seed=1),
        ref_model=ref,
        args=args,
        train_dataset=dpo_data,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[mon],
    )
    trainer.train()
    recs = [
        r
        for r in read_jsonl(tmp_path / "topomon" / "metrics.jsonl")
        if r["kind"] == "metrics" and r["stage"] == "dpo"
    ]
    assert sorted({(r["step"], r["layer"]) for r in recs}) == [
        (s, ly) for s in range(4) for ly in ("final_norm", "layer_3", "model")
    ]
    assert len(recs) == 12 and all(r["stage"] == "dpo" for r in recs)
    model = [r["metrics"] for r in recs if r["layer"] == "model"]
    if lora:
        # q_proj and v_proj in 4 blocks; B starts at zero, so the update has no rank at step 0
        assert all(m["lora_modules"] == 8 for m in model)
        assert model[0]["lora_norm_total"] == 0.0 and model[-1]["lora_norm_total"] > 0
        assert 1 <= model[-1]["lora_effective_rank_mean"] <= 4
        # the capture ships the factors' Gram matrices (a first stage: no earlier subspace to project
        # on); the worker's numbers are those of the trained factors themselves
        from topomon.capture.lora_weights import lora_factors
        from topomon.metrics.lora import lora_update_metrics

        assert not mon.session._lora_reference
        final = [lora_update_metrics(a, b, sc) for a, b, sc in lora_factors(trainer.model).values()]
        assert model[-1]["lora_effective_rank_mean"] == pytest.approx(
            np.mean([m["lora_effective_rank"] for m in final]), rel=1e-5
        )
        assert model[-1]["lora_norm_total"] == pytest.approx(
            np.sqrt(sum(m["lora_norm"] ** 2 for m in final)), rel=1e-5
        )
    else:
        assert all("lora_modules" not in m for m in model)
    acc = scalar_events(tmp_path / "topomon" / "tensorboard" / "dpo")
    assert [e.step for e in acc.Scalars("topomon/rankme_pca/layer_3")] == [0, 1, 2, 3]
    # the model-level measurement suite, read back from TensorBoard
    for tag in ("logit_entropy", "logit_ece", "traj_straightness_mean", "cka_adjacent_mean"):
        assert [e.step for e in acc.Scalars(f"topomon/{tag}/model")] == [0, 1, 2, 3], tag
    if lora:
        norms = [e.value for e in acc.Scalars("topomon/lora_norm_total/model")]
        assert norms[0] == 0.0 and norms[-1] > 0
    assert mon.errors == 0


def test_passive_mode_captures_the_training_forward_once(tok, sft_data, tmp_path):
    from topomon.testing import tiny_causal_lm

    results = {}
    for checkpointing in (False, True):
        mon = TopoMonitor(
            mode="passive", schedule="every", every_n_steps=2, worker="sync", max_points=64, topology=False
        )
        out = tmp_path / str(checkpointing)
        run_sft(
            tiny_causal_lm("llama", seed=0), tok, sft_data, out, mon, gradient_checkpointing=checkpointing
        )
        recs = [r for r in read_jsonl(out / "topomon" / "metrics.jsonl") if r["kind"] == "metrics"]
        assert sorted({r["step"] for r in recs}) == [2, 4]
        assert len(recs) == 2 * 6 and mon.errors == 0  # 4 blocks, final norm, model
        assert all(r["metrics"]["n_points"] == 64 for r in recs if r["layer"] != "model")
        results[checkpointing] = {
            (r["step"], r["layer"]): r["metrics"]["rankme"] for r in recs if r["layer"] != "model"
        }
    # the recompute of gradient checkpointing must not replace the forward's activations:
    # the same tokens of the same model give the same numbers either way
    assert results[True].keys() == results[False].keys()
    for k in results[True]:
        assert math.isclose(results[True][k], results[False][k], rel_tol=1e-4), k


def test_passive_mode_takes_its_points_from_every_micro_batch_of_the_step(tok, sft_data, tmp_path):
    """Under gradient accumulation a step runs several forwards: the capture pools them all."""
    from topomon.testing import tiny_causal_lm

    points = {}
    for accumulation in (1, 4):
        mon = TopoMonitor(
            mode="passive", schedule="every", every_n_steps=2, worker="sync", max_points=4096, topology=False
        )
        out = tmp_path / str(accumulation)
        run_sft(
            tiny_causal_lm("llama", seed=0),
            tok,
            sft_data,
            out,
            mon,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=accumulation,
        )
        recs = [r for r in read_jsonl(out / "topomon" / "metrics.jsonl") if r["kind"] == "metrics"]
        points[accumulation] = [r["metrics"]["n_points"] for r in recs if r["layer"] == "final_norm"]
    # 4 micro-batches of 2 texts: about 4x the tokens of one (exactly, were the texts the same length)
    assert all(3 * one < four for one, four in zip(points[1], points[4], strict=True)), points
    # with a cap, the pooled points are subsampled to max_points
    mon = TopoMonitor(mode="passive", schedule="every", every_n_steps=2, worker="sync", max_points=64)
    run_sft(
        tiny_causal_lm("llama", seed=0),
        tok,
        sft_data,
        tmp_path / "cap",
        mon,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
    )
    recs = [r for r in read_jsonl(tmp_path / "cap" / "topomon" / "metrics.jsonl") if r["kind"] == "metrics"]
    assert {r["metrics"]["n_points"] for r in recs if r["layer"] != "model"} == {64}


def test_a_slow_worker_never_blocks_training(model, tok, sft_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TOPOMON_TEST_SLOW", "3")
    mon = TopoMonitor(
        schedule="every",
        every_n_steps=1,
        queue_size=1,
        topology=False,
        layers=[0],
        final_norm=False,
        custom_metrics={"slow": "tests.faults:slow"},
        flush_timeout=30,
    )
    run_sft(model, tok, sft_data, tmp_path, mon, max_steps=6)
    h = mon.health()
    # 7 scheduled (0-6); when the last of them was dropped too, the stage end is captured again, waiting
    assert h["captures"] in (7, 8) and h["submitted"] + h["dropped"] == h["captures"] and h["dropped"] >= 4
    # latency bookkeeping keeps nothing for the dropped captures, one latency per completed one
    router = mon.session._router
    assert router.in_flight() == [] and len(router._latencies) == h["completed"]
    assert h["worker_latency_max_s"] >= h["worker_latency_median_s"] > 0
    recs = [r for r in read_jsonl(tmp_path / "topomon" / "metrics.jsonl") if r["kind"] == "metrics"]
    assert {r["stage"] for r in recs if r["step"] == 0} == {"base", "train"} and recs[0]["step"] == 0
    assert len([r for r in recs if r["stage"] == "train" and r["layer"] == "layer_0"]) == h["completed"] >= 1
    assert max(r["step"] for r in recs) == 6  # never the stage end


def test_a_failing_metric_is_reported_and_training_goes_on(model, tok, sft_data, tmp_path):
    mon = TopoMonitor(
        schedule="every", every_n_steps=2, topology=False, custom_metrics={"boom": "tests.faults:boom"}
    )
    run_sft(model, tok, sft_data, tmp_path, mon)
    recs = [r for r in read_jsonl(tmp_path / "topomon" / "metrics.jsonl") if r["kind"] == "metrics"]
    assert len(recs) == 18 + 6  # 3 captures x (5 layers + model), and the baseline again as stage "base"
    recs = [r for r in recs if r["layer"] != "model"]
    assert all(r["metrics"]["boom"] is None and r["metrics"]["rankme"] > 1 for r in recs)
    assert all(r["errors"] == ["boom: RuntimeError: planted failure"] for r in recs)


def test_configuration_errors_stop_before_the_first_step(model, tok, sft_data, tmp_path):
    steps = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps.append(state.global_step)

    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=sft_args(tmp_path),
        train_dataset=sft_data,
        processing_class=tok,
        callbacks=[Steps(), TopoMonitor(layers=[9])],
    )
    with pytest.raises(ConfigError, match=r"layer index 9 is out of range .* valid indices are -4\.\.3"):
        trainer.train()
    assert steps == []
    with pytest.raises(ConfigError, match="unknown monitor config key 'every_n_step'"):
        TopoMonitor(every_n_step=3)
    with pytest.raises(ValueError, match="cannot import module 'nowhere'"):
        trainer = SFTTrainer(
            model=model,
            args=sft_args(tmp_path),
            train_dataset=sft_data,
            processing_class=tok,
            callbacks=[TopoMonitor(custom_metrics={"x": "nowhere:fn"})],
        )
        trainer.train()


def test_passive_mode_takes_the_logit_metrics_from_the_training_forward_of_trl_sft(tok, sft_data, tmp_path):
    """TRL's SFT forward returns no logits (a fused LM head): the statistics come from its final hidden
    states, and over every token (no subsample, the first one too) they are TRL's own entropy and accuracy."""
    from topomon.testing import tiny_causal_lm

    mon = TopoMonitor(
        mode="passive",
        schedule="every",
        every_n_steps=2,
        worker="sync",
        max_points=4096,
        exclude_first=False,
        topology=False,
    )
    trainer = run_sft(tiny_causal_lm("llama", seed=0), tok, sft_data, tmp_path, mon)
    logged = {h["step"]: h for h in trainer.state.log_history if "entropy" in h}
    recs = [r for r in read_jsonl(tmp_path / "topomon" / "metrics.jsonl") if r["kind"] == "metrics"]
    model = {r["step"]: r["metrics"] for r in recs if r["layer"] == "model"}
    assert sorted(model) == [2, 4] and mon.errors == 0
    for step, m in model.items():
        assert m["logit_entropy"] == pytest.approx(logged[step]["entropy"], rel=1e-4)
        assert m["logit_accuracy"] == pytest.approx(logged[step]["mean_token_accuracy"], abs=1e-6)
        assert 0 < m["logit_nll"] and 0 <= m["logit_ece"] <= 1
