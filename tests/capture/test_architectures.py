"""Every architecture people fine-tune: the language model's blocks and the LM head's input, checked.

The zoo builds every causal-LM and image-text-to-text class of the installed transformers on the meta
device; a representative set is built tiny and run for real, its captured points compared with the
model's own ``output_hidden_states``; trainer runs show the default rules live, passive capture and
LoRA on a VLM; a rule on a layer that is not captured is an error before the first step.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest
import torch

from tests.capture import conftest
from tests.capture.tiny_zoo import REPRESENTATIVE, tiny_model
from tests.capture.tiny_zoo import text_settings as tiny_zoo_text
from topomon.alert_setup import rules_on_layers
from topomon.alerts import default_rules
from topomon.capture.layers import FINAL_NORM, model_layout
from topomon.capture.probe import ProbeCapture, plan_tokens
from topomon.config import ConfigError, MonitorConfig
from topomon.stage import capture_modules
from topomon.testing import sample_texts, tiny_tokenizer

# where the language model's blocks are; the LM head's input is the output of the blocks' owner
BLOCKS = {
    "llama": "model.layers",
    "qwen3_moe": "model.layers",
    "gemma3": "model.language_model.layers",
    "paligemma": "model.language_model.layers",
    "qwen2_5_vl": "model.language_model.layers",
    "mistral3": "model.language_model.layers",
    "phi": "model.layers",
    "phi3": "model.layers",
    "falcon_h1": "model.layers",
    "mamba": "backbone.layers",
    "jamba": "model.layers",
    "gpt_neox": "gpt_neox.layers",
    "olmo2": "model.layers",
    "gpt_oss": "model.layers",
}


# where block i's output is in output_hidden_states: at i + 1 after the embeddings, but Mamba's tuple
# starts with block 0's output (modeling_mamba.py: appended after each block, then the final norm's)
FIRST_BLOCK = {"mamba": 0}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.slow
def test_zoo_every_decoder_lm_and_vlm_resolves():
    from topomon.capture.zoo import counts, run_zoo

    entries = run_zoo()
    by_type = {(e.kind, e.model_type): e for e in entries}
    per_kind = counts(entries)
    for kind, per in per_kind.items():
        conftest.SUMMARY.append(
            f"architecture zoo, {kind}: {sum(per.values())} classes: "
            + ", ".join(f"{v} {k}" for k, v in per.items())
        )
    failing = [e for e in entries if e.status == "failing"]
    assert not failing, "\n".join(f"{e.model_type} {e.class_name}: {e.detail}" for e in failing)
    # the models of the issue: no final norm found before, or the wrong blocks
    for t in ("gemma3", "gemma4", "phi", "persimmon", "mpt", "mamba", "mamba2", "falcon_mamba", "falcon_h1"):
        assert by_type["causal-lm", t].status == "resolved", by_type["causal-lm", t]
    for t in ("jamba", "zamba2", "nemotron_h", "lfm2", "recurrent_gemma", "xglm", "qwen3_moe", "gpt_oss"):
        assert by_type["causal-lm", t].status == "resolved", by_type["causal-lm", t]
    vlm = {
        "paligemma": "model.language_model.layers",
        "mllama": "model.language_model.layers",
        "qwen3_vl_moe": "model.language_model.layers",
        "qwen2_5_omni_thinker": "model.language_model.layers",
        "instructblip": "language_model.model.decoder.layers",
        "llama4": "language_model.model.layers",
        "smolvlm": "model.text_model.layers",
    }
    for t, path in vlm.items():
        e = by_type["image-text-to-text", t]
        assert e.status == "resolved" and e.detail.startswith(f"{path} ("), e
    for t in ("qwen2_5_vl", "qwen3_vl", "gemma3", "mistral3", "idefics3", "llava", "internvl"):
        assert by_type["image-text-to-text", t].status == "resolved", by_type["image-text-to-text", t]
    # counts of this transformers (5.25): most classes resolve; skipped ones cannot be built here
    assert per_kind["causal-lm"]["resolved"] >= 140 and per_kind["image-text-to-text"]["resolved"] >= 75


def _reference(model, plan, n, first):
    """Per layer, the points of ``output_hidden_states`` at the plan's positions, and the LM head's input."""
    layout = model_layout(model)
    seen = []
    handle = layout.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    ref: dict[str, list[np.ndarray]] = {}
    try:
        with torch.no_grad():
            for (ids, att), sel in zip(plan.batches, plan.select, strict=True):
                hs = model(
                    input_ids=ids, attention_mask=att, output_hidden_states=True, use_cache=False
                ).hidden_states
                assert len(hs) == n + 1
                r, p = sel[:, 0], sel[:, 1]
                # hidden_states[i + 1]: block i's output; the last one: the final norm's (the LM head's input)
                for i in range(n - 1):
                    ref.setdefault(f"layer_{i}", []).append(hs[i + first][r, p].numpy())
                ref.setdefault(FINAL_NORM, []).append(hs[-1][r, p].numpy())
                ref.setdefault("head_input", []).append(seen[-1][r, p].numpy())
    finally:
        handle.remove()
    return {k: np.concatenate(v) for k, v in ref.items()}


@pytest.mark.parametrize("model_type", list(REPRESENTATIVE))
def test_captured_points_equal_the_models_own_hidden_states(model_type, tok):
    model = tiny_model(model_type)
    layout = model_layout(model)
    n = layout.n_layers
    assert layout.block_path == BLOCKS[model_type] and n == 3
    plan = plan_tokens(
        tok,
        sample_texts(8),
        max_length=24,
        batch_size=4,
        pooling="all",
        max_points=64,
        exclude_first=True,
        seed=0,
    )
    snap = ProbeCapture(plan, list(range(n)), include_final_norm=True, logits=True).capture(model, 0, "s")
    ref = _reference(model, plan, n, FIRST_BLOCK.get(model_type, 1))
    diffs = {
        k: float(np.max(np.abs(snap.layers[k] - ref[k])))
        for k in (*(f"layer_{i}" for i in range(n - 1)), FINAL_NORM)
    }
    diffs["final_norm vs LM head input"] = float(np.max(np.abs(snap.layers[FINAL_NORM] - ref["head_input"])))
    conftest.SUMMARY.append(
        f"{model_type}: max |captured - output_hidden_states| "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
    )
    assert max(diffs.values()) < 1e-5, diffs
    assert snap.layers[FINAL_NORM].shape == (64, model.config.get_text_config().hidden_size)
    assert 0 < len(snap.extras["logits/nll"]) <= 64  # the LM head ran on counted positions with a next token
    # the default rules watch final_norm, which is captured: they are live
    _, modules = capture_modules(MonitorConfig(), model)
    assert modules[FINAL_NORM] is layout.decoder and list(modules)[-1] == FINAL_NORM
    watched = [
        ly for r in rules_on_layers(default_rules(), list(modules), default=True) for ly, _ in r.series
    ]
    assert [ly for ly in watched if ly not in ("*", "mean", "model", "trainer")] == [FINAL_NORM] * 2


@pytest.mark.parametrize("model_type,lora", [("gemma3", True), ("phi", False), ("falcon_h1", False)])
def test_passive_points_equal_the_training_forwards_hidden_states(model_type, lora, tok):
    """Passive capture hooks the training forward itself: same equality, through PEFT too."""
    from topomon.capture.passive import PassiveCapture

    model = tiny_model(model_type).train()
    layout = model_layout(model)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=layout.lora_target_modules()))
    modules = model_layout(model).capture_modules([0, 1, 2], True)
    cap = PassiveCapture(modules, max_points=10_000, exclude_first=True, seed=0)  # every counted token
    cap.attach(model)
    batch = tok(sample_texts(4, seed=5), padding=True, truncation=True, max_length=24, return_tensors="pt")
    torch.manual_seed(0)
    try:
        cap.arm(2)
        out = model(**batch, labels=batch["input_ids"], output_hidden_states=True)
        out.loss.backward()
        snap = cap.collect("s")
    finally:
        cap.detach()
    assert snap is not None
    mask = batch["attention_mask"].bool().clone()
    mask[:, 0] = False  # right padding: the first counted position is 0
    rows, cols = mask.nonzero(as_tuple=True)
    hs = [h.detach() for h in out.hidden_states]
    ref = {"layer_0": hs[1], "layer_1": hs[2], FINAL_NORM: hs[-1]}
    diffs = {k: float((torch.from_numpy(snap.layers[k]) - v[rows, cols]).abs().max()) for k, v in ref.items()}
    conftest.SUMMARY.append(
        f"{model_type} passive{' + LoRA' if lora else ''}: max |captured - output_hidden_states| "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
    )
    assert max(diffs.values()) < 1e-5 and len(snap.layers[FINAL_NORM]) == len(rows), diffs


def test_blocks_that_cannot_be_identified_are_a_clear_error():
    model = tiny_model("phi")
    model.config.num_hidden_layers = 5  # no list of 5 blocks anywhere
    with pytest.raises(ValueError, match=r"cannot find the blocks of PhiForCausalLM: no list of 5 modules"):
        model_layout(model)
    with pytest.raises(ConfigError, match="topomon cannot monitor this model"):
        capture_modules(MonitorConfig(), model)
    with pytest.raises(ValueError, match="it has no transformers `config` and none of model.layers"):
        model_layout(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_a_rule_on_a_layer_not_captured_names_the_captured_layers():
    layers = ["layer_0", "layer_3", FINAL_NORM]
    rules = default_rules()
    bad = [{"type": "threshold", "metric": "rankme", "layer": "layer_7", "above": 0.0}]
    from topomon.alerts import rules_from_config

    with pytest.raises(
        ConfigError, match=r"'layer_7', which is not captured; the captured layers are \['layer_0'"
    ):
        rules_on_layers(rules_from_config(bad), layers, default=False)
    # '*', 'mean' and 'model' are always valid
    ok = [dict(bad[0], layer=x) for x in ("*", "mean", "model", "layer_3")]
    assert len(rules_on_layers(rules_from_config(ok), layers, default=False)) == 4
    assert rules_on_layers(rules, layers, default=True) == rules


def test_default_rules_fall_back_to_the_deepest_captured_layer_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="topomon"):
        rules = rules_on_layers(default_rules("v1"), ["layer_1", "layer_3"], default=True)
    assert [r.layer for r in rules] == ["layer_3", "layer_3", "*"]
    assert [r.name for r in rules][:2] == ["drop:rankme@layer_3", "drop:rankme_pca@layer_3"]
    assert "final_norm is not captured; the default alert rules watch layer_3 instead" in caplog.text
    # an explicit rule on final_norm is not moved: it is an error
    with pytest.raises(ConfigError, match="not captured"):
        rules_on_layers(default_rules("v1"), ["layer_1", "layer_3"], default=False)
    # a named detector's any-of parts move too; its other parts and their names stay
    (v2, _) = rules_on_layers(default_rules("v2"), ["layer_1", "layer_3"], default=True)
    parts = v2.config()["parts"]
    assert [(p["name"], p["layer"]) for p in parts] == [
        ("rankme", "layer_3"),
        ("rankme_pca", "layer_3"),
        ("probe_nll", "model"),
        ("training_loss", "trainer"),
    ]


def test_lora_targets_are_the_language_models_linear_layers_only():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("gemma3")
    target = model_layout(model).lora_target_modules(["q_proj", "v_proj"])
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=target))
    adapted = [
        n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and n.endswith(("q_proj", "v_proj"))
    ]
    assert len(adapted) == 6 and all(".language_model.layers." in n for n in adapted)
    assert any("vision_tower" in n and n.endswith("q_proj") for n, _ in model.named_modules())
    with pytest.raises(ValueError, match="not linear layers of the blocks"):
        model_layout(model).lora_target_modules(["patch_embedding"])


ALWAYS = {"type": "threshold", "metric": "rankme", "layer": FINAL_NORM, "above": 0.0, "name": "always"}


class _Steps:
    """Counts the training steps that ran (to show that an error came before the first one)."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class Cb(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                outer.n += 1

        self.n = 0
        self.callback = Cb()


def _train(model, tok, out, monitor, steps=4, callbacks=()):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    data = Dataset.from_dict(dict(tok(sample_texts(32, seed=3), truncation=True, max_length=32)))
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=7,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
        callbacks=[*callbacks, monitor],
    )
    trainer.train()
    return trainer


def _lines(path, kind):
    import json

    with open(path) as fh:
        return [r for r in map(json.loads, fh) if r.get("kind") == kind]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["phi", "gemma3"])
def test_rules_on_final_norm_fire_in_a_trainer_run(model_type, tok, tmp_path):
    """Phi had no final norm found and Gemma 3 had its vision tower monitored: a rule on final_norm fires."""
    from topomon import TopoMonitor

    mon = TopoMonitor(
        stage="sft", schedule="every", every_n_steps=2, max_points=96, topology=False, alerts=[ALWAYS]
    )
    _train(tiny_model(model_type).train(), tok, tmp_path, mon)
    recs = _lines(tmp_path / "topomon" / "metrics.jsonl", "metrics")
    assert {r["layer"] for r in recs if r["stage"] == "sft"} == {
        "layer_0",
        "layer_1",
        "layer_2",
        FINAL_NORM,
        "model",
    }
    alerts = _lines(tmp_path / "topomon" / "alerts.jsonl", "alert")
    assert [(a["rule"], a["layer"]) for a in alerts][:1] == [("always", FINAL_NORM)]


@pytest.mark.slow
def test_passive_capture_of_a_lora_vlm_watches_its_language_model(tok, tmp_path):
    """Qwen2.5-VL with LoRA on its language model's attention, passive capture, the default rules."""
    from peft import LoraConfig, get_peft_model

    from topomon import TopoMonitor

    model = tiny_model("qwen2_5_vl").train()
    target = model_layout(model).lora_target_modules(["q_proj", "v_proj"])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target))
    mon = TopoMonitor(
        stage="sft", mode="passive", schedule="every", every_n_steps=2, max_points=96, topology=False
    )
    assert mon.config.alerts == "default"
    _train(peft_model, tok, tmp_path, mon)
    recs = [r for r in _lines(tmp_path / "topomon" / "metrics.jsonl", "metrics") if r["stage"] == "sft"]
    # passive: no baseline at step 0; captures at steps 2 and 4, on the language model's blocks
    assert sorted({r["step"] for r in recs}) == [2, 4]
    norm = [r for r in recs if r["layer"] == FINAL_NORM]
    assert len(norm) == 2 and all(r["metrics"]["rankme"] > 1 and r["metrics"]["n_points"] == 96 for r in norm)
    modules = model_layout(peft_model).capture_modules([0, 1, 2], True)
    assert modules[FINAL_NORM] is peft_model.get_base_model().model.language_model


@pytest.mark.slow
def test_a_rule_on_a_layer_not_captured_raises_before_step_1(tok, tmp_path):
    from topomon import TopoMonitor
    from topomon.testing import tiny_causal_lm

    steps = _Steps()
    rule = dict(ALWAYS, layer="layer_2", name="missing")  # layers=[0, 3] captured only
    mon = TopoMonitor(stage="sft", layers=[0, 3], alerts=[rule], topology=False)
    with pytest.raises(ConfigError, match=r"'layer_2', which is not captured; the captured layers are"):
        _train(tiny_causal_lm(num_layers=4), tok, tmp_path, mon, callbacks=[steps.callback])
    assert steps.n == 0


def test_the_diversity_regulariser_acts_on_a_vlms_language_model(tok):
    from topomon.interventions.diversity import DiversityRegularizer

    model = tiny_model("gemma3").train()
    reg = DiversityRegularizer(model, layers=[-1], weight=0.5, max_tokens=16)
    try:
        batch = tok(
            sample_texts(4, seed=6), padding=True, truncation=True, max_length=24, return_tensors="pt"
        )
        model(**batch, labels=batch["input_ids"]).loss.backward()
        assert reg.layers == [2] and math.isfinite(reg.last_value) and reg.n_applied >= 1
        # its hooks sit on the language model's last block, never on the vision tower
        hooked = [n for n, m in model.named_modules() if m._forward_hooks]
        assert hooked == ["model.language_model.layers.2"], hooked
    finally:
        reg.remove()


@pytest.mark.parametrize(
    "model_type,body",
    [
        ("gemma3", "model"),  # the outer body builds masks and position ids, without the LM head
        ("llama4", "language_model.model"),  # no base model: the language model's body
        ("instructblip", "language_model.model.decoder"),  # its outer forward needs pixel_values
    ],
)
def test_the_probe_forward_runs_a_body_without_the_lm_head(model_type, body):
    import transformers

    cls = getattr(
        transformers,
        transformers.models.auto.modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type],
    )
    with torch.device("meta"):
        model = cls(cls.config_class())
    layout = model_layout(model)
    assert layout.body is model.get_submodule(body) and layout.head is not None
    assert not any(m is layout.head for m in layout.body.modules())


def transforming_lm(name: str) -> Any:
    """A tiny causal LM that transforms around its LM head: MiniCPM3 divides the head's input; Gemma 2
    soft-caps its output; Granite and Cohere scale it."""
    import transformers

    text = {
        k: v for k, v in tiny_zoo_text().items() if k in ("hidden_size", "intermediate_size", "vocab_size")
    }
    heads = {"num_attention_heads": 4, "num_key_value_heads": 4, "pad_token_id": 3, "num_hidden_layers": 2}
    extra: dict[str, Any] = {
        "MiniCPM3": {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8},
        "Gemma2": {"head_dim": 8, "final_logit_softcapping": 2.0},  # a low cap: it bends most logits
        "Granite": {"logits_scaling": 8.0},
        "Cohere": {"logit_scale": 0.0625},
    }[name]
    if name == "MiniCPM3":
        extra["v_head_dim"] = 8
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{name}Config")(**text, **heads, **extra)
    return getattr(transformers, f"{name}ForCausalLM")(cfg).eval()


@pytest.mark.parametrize("name", ["MiniCPM3", "Gemma2", "Granite", "Cohere"])
def test_probe_next_token_metrics_are_the_models_own_when_it_transforms_around_its_head(name, tok, caplog):
    """Such a model's logits are not its head on ``final_norm``: the probe runs the whole model instead."""
    from topomon.capture.logit_stats import reduce_logits
    from topomon.capture.probe import logits_are_head_of_body

    model = transforming_lm(name)
    assert not logits_are_head_of_body(model_layout(model), torch.tensor([[5, 6]]))
    assert logits_are_head_of_body(model_layout(tiny_model("llama")), torch.tensor([[5, 6]]))
    plan = plan_tokens(
        tok,
        sample_texts(6),
        max_length=24,
        batch_size=3,
        pooling="all",
        max_points=48,
        exclude_first=True,
        seed=0,
    )
    with caplog.at_level(logging.WARNING, logger="topomon"):
        snap = ProbeCapture(plan, [0, 1], logits=True).capture(model, 0, "s")
    assert f"{name}ForCausalLM transforms the input or the output of its LM head" in caplog.text
    with torch.no_grad():
        ref = [
            reduce_logits(model(input_ids=i, attention_mask=a).logits, i, a, at=(s[:, 0], s[:, 1]))
            for (i, a), s in zip(plan.batches, plan.select, strict=True)
        ]
    for k in ("nll", "entropy"):
        want = np.concatenate([r[k] for r in ref])
        np.testing.assert_allclose(snap.extras[f"logits/{k}"], want, rtol=1e-5, atol=1e-6)


def _passive_logits(model: Any, batch: dict[str, Any], **forward: Any) -> dict[str, np.ndarray]:
    """The logit statistics passive capture takes from one training forward of ``model`` (every token)."""
    from topomon.capture.passive import PassiveCapture

    modules = model_layout(model).capture_modules([0], True)
    cap = PassiveCapture(modules, max_points=10_000, exclude_first=True, seed=0, needs=frozenset({"logits"}))
    cap.attach(model.train())
    try:
        cap.arm(1)
        if forward:  # e.g. the logits of the last position only (no loss of the model's own then)
            model(**batch, **forward).logits.sum().backward()
        else:
            model(**batch, labels=batch["input_ids"]).loss.backward()
        snap = cap.collect("s")
    finally:
        cap.detach()
    assert snap is not None
    return {k.removeprefix("logits/"): v for k, v in snap.extras.items()}


@pytest.mark.parametrize("name", ["MiniCPM3", "Gemma2", "Granite", "Cohere", "llama"])
def test_passive_next_token_metrics_are_the_training_forwards_own_logits(name, tok, caplog):
    """Passive capture reduces the logits the training forward returned, whatever the model does around
    its head. When the forward keeps the logits of the last positions only, it runs the head on the
    body's output where that is the model's logits (a model that transforms nothing around its head),
    else it takes the model's own logits at the captured positions it kept."""
    from topomon.capture.logit_stats import reduce_logits

    model = tiny_model("llama") if name == "llama" else transforming_lm(name)
    batch = tok(sample_texts(4, seed=5), padding=True, truncation=True, max_length=24, return_tensors="pt")
    got = _passive_logits(model, batch)
    mask = batch["attention_mask"].bool().clone()
    mask[:, 0] = False  # right padding: the first counted position is 0
    rows, cols = mask.nonzero(as_tuple=True)
    with torch.no_grad():
        ids, att = batch["input_ids"], batch["attention_mask"]
        want = reduce_logits(model(**batch).logits, ids, att, labels=ids, at=(rows, cols))
    for k in ("nll", "entropy"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5)
    if name == "llama":
        kept = _passive_logits(model, batch, logits_to_keep=1)
        for k in ("nll", "entropy"):
            np.testing.assert_allclose(kept[k], want[k], rtol=1e-4, atol=1e-5)
    else:  # GRPO's logits_to_keep: the model's own logits at the captured positions it kept
        keep = 6
        off = ids.shape[1] - keep
        with caplog.at_level(logging.WARNING, logger="topomon"):
            kept = _passive_logits(model, batch, logits_to_keep=keep)
        assert f"returns logits for the last {keep} of {ids.shape[1]} positions" in caplog.text
        inside = cols >= off
        with torch.no_grad():
            full = model(**batch).logits
        mine = reduce_logits(full, ids, att, labels=ids, at=(rows[inside], cols[inside]))
        assert 0 < len(kept["nll"]) < len(want["nll"])
        for k in ("nll", "entropy"):
            np.testing.assert_allclose(kept[k], mine[k], rtol=1e-4, atol=1e-5)
