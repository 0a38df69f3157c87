"""TopoMonitorCallback in a real Lightning fit: captures, numbers, actions, resume, loggers, errors."""

import csv

import lightning as L
import pytest
import torch

import topomon
from tests.integrations.conftest import scalar_events
from tests.integrations.test_loop import ALWAYS, batches
from tests.integrations.test_loop import train as loop_train
from topomon import TopoMonitor
from topomon.config import ConfigError
from topomon.integrations.lightning import TopoMonitorCallback, find_language_model
from topomon.sinks.jsonl_read import read_jsonl
from topomon.testing import tiny_causal_lm

pytestmark = pytest.mark.slow

# a small probe set and point cloud: the same for every path compared, quick on 2 shared cores
FAST = {"worker": "sync", "max_probes": 16, "max_points": 128, "topology_points": 64}


class LitLM(L.LightningModule):
    """A causal LM trained on its own loss, as a user writes it (the tokenizer kept on the module)."""

    def __init__(self, model, tokenizer=None, lr=1e-3):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr)


def loader(tok, n=12):
    # the plain-loop test's batches, in order, one dict per step
    data = [dict(b) for b in batches(tok, n)]
    return torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)


def fit(module, tok, root, callbacks, *, max_steps=8, n_batches=12, ckpt_path=None, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(
        default_root_dir=str(root),
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )
    trainer.fit(module, train_dataloaders=loader(tok, n_batches), ckpt_path=ckpt_path)
    return trainer


def metric_lines(run_dir, stage="train"):
    lines, torn = read_jsonl(run_dir / "metrics.jsonl")
    assert torn == 0
    return [r for r in lines if r.get("kind") == "metrics" and r["stage"] == stage]


def by_step_layer(lines):
    return {(r["step"], r["layer"]): r["metrics"] for r in lines}


def test_lightning_captures_on_schedule_with_the_plain_loops_numbers(tok, tmp_path):
    mon = TopoMonitorCallback(schedule="every", every_n_steps=3, **FAST)
    trainer = fit(LitLM(tiny_causal_lm("llama", seed=0), tok), tok, tmp_path / "lit", [mon])
    assert trainer.global_step == 8
    assert mon.captures == [0, 3, 6, 8]  # baseline, every 3 steps, the final model
    lit = metric_lines(tmp_path / "lit" / "topomon")
    assert sorted({r["step"] for r in lit}) == [0, 3, 6, 8]

    # the same model, batches, optimiser and steps in a plain loop: the same numbers at every capture
    model = tiny_causal_lm("llama", seed=0)
    with topomon.watch(
        model, tok, output_dir=tmp_path / "loop", schedule="every", every_n_steps=3, **FAST
    ) as loop:
        assert loop_train(model, tok, loop, steps=8) == 8
    got, want = by_step_layer(lit), by_step_layer(metric_lines(tmp_path / "loop" / "topomon"))
    assert got.keys() == want.keys() and len(got) == 4 * 6  # 4 captures x (4 blocks, final norm, model)
    assert got == want  # the same float32 training on the CPU: equal to the last digit


def test_gradient_accumulation_counts_optimiser_steps(tok, tmp_path):
    mon = TopoMonitorCallback(schedule="every", every_n_steps=2, **FAST)
    trainer = fit(
        LitLM(tiny_causal_lm("llama", seed=0), tok),
        tok,
        tmp_path,
        [mon],
        max_steps=3,
        accumulate_grad_batches=4,
    )
    assert trainer.global_step == 3  # 12 batches
    assert mon.captures == [0, 2, 3]
    assert sorted({r["step"] for r in metric_lines(tmp_path / "topomon")}) == [0, 2, 3]


def test_a_stop_action_ends_the_fit_and_a_checkpoint_action_saves_one(tok, tmp_path):
    actions = [{"kind": "diversity", "value": 0.1}, {"kind": "checkpoint"}, {"kind": "stop"}]
    mon = TopoMonitorCallback(schedule="every", every_n_steps=2, **FAST, alerts=ALWAYS, actions=actions)
    trainer = fit(LitLM(tiny_causal_lm("llama", seed=0), tok), tok, tmp_path, [mon], max_steps=10)
    assert trainer.global_step == 1  # the baseline's alert was acted on at the first step's end
    assert [a.kind for a in mon.actions] == ["diversity", "checkpoint", "stop"]
    assert mon.session.interventions.target("diversity").weight == 0.1
    path = tmp_path / "checkpoints" / "topomon-step=1.ckpt"
    assert mon.checkpoints == [str(path)]
    state = torch.load(path, weights_only=False)["callbacks"]["TopoMonitorCallback"]
    assert state["captures"] == [0] and state["stage"] == "train"
    assert {a["kind"] for a in read_jsonl(tmp_path / "topomon" / "alerts.jsonl")[0]} == {"alert", "action"}


def test_the_diversity_regulariser_acts_in_the_lightning_training_forward(tok, tmp_path):
    mon = TopoMonitorCallback(
        schedule="every",
        every_n_steps=2,
        **FAST,
        alerts=ALWAYS,
        actions=[{"kind": "diversity", "value": 0.1}],
    )
    fit(LitLM(tiny_causal_lm("llama", seed=0), tok), tok, tmp_path, [mon], max_steps=3)
    reg = mon.session.interventions.target("diversity")
    assert reg.weight == 0.1 and reg.n_applied > 0


class Interrupt(L.Callback):
    """Ends the first fit mid-way: a crash (an exception) or a stop, after the step."""

    def __init__(self, at, how):
        self.at, self.how = at, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            if self.how == "crash":
                raise RuntimeError("simulated crash")
            trainer.should_stop = True


@pytest.mark.parametrize(("how", "first_steps"), [("crash", [0, 2, 4, 6]), ("stop", [0, 2, 4, 6, 7])])
def test_resume_from_a_lightning_checkpoint_repeats_and_misses_no_capture(tok, tmp_path, how, first_steps):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def callbacks(extra=()):
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
        return [TopoMonitorCallback(schedule="every", every_n_steps=2, **FAST), *extra, ckpt]

    first = callbacks([Interrupt(7, how)])
    if how == "crash":
        with pytest.raises(RuntimeError, match="simulated crash"):
            fit(LitLM(tiny_causal_lm("llama", seed=0), tok), tok, tmp_path, first, enable_checkpointing=True)
    else:
        fit(LitLM(tiny_causal_lm("llama", seed=0), tok), tok, tmp_path, first, enable_checkpointing=True)
    assert not first[0].session.started  # closed on the exception, ended on the stop
    run = tmp_path / "topomon"
    assert sorted({r["step"] for r in metric_lines(run)}) == first_steps  # 6 is after the checkpoint
    saved = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    assert torch.load(saved, weights_only=False)["callbacks"]["TopoMonitorCallback"]["captures"] == [0, 2, 4]

    second = callbacks()
    trainer = fit(
        LitLM(tiny_causal_lm("llama", seed=1), tok),
        tok,
        tmp_path,
        second,
        ckpt_path=str(saved),
        enable_checkpointing=True,
    )
    assert trainer.global_step == 8
    lines = metric_lines(run)
    steps = [r["step"] for r in lines if r["layer"] == "final_norm"]
    assert sorted(steps) == sorted({*first_steps, 8})  # each capture once: 6 (and 7) not taken again
    assert len(lines) == len(set(by_step_layer(lines)))  # no (step, layer) written twice
    stages = {r["stage"] for r in read_jsonl(run / "metrics.jsonl")[0] if r.get("kind") == "metrics"}
    assert stages == {"base", "train"}  # the stage continued, not a re-run "train-2"


def test_the_lightning_loggers_receive_topomons_metrics_once_per_logdir(tok, tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    csv_logger = CSVLogger(tmp_path / "csv", name="lit")
    shared = TensorBoardLogger(tmp_path / "tb", name="lit", version=0)  # topomon's TensorBoard goes here too
    other = TensorBoardLogger(tmp_path / "tb_other", name="lit", version=0)
    mon = TopoMonitorCallback(
        schedule="every", every_n_steps=2, **FAST, alerts=ALWAYS, logging_dir=shared.log_dir
    )
    fit(
        LitLM(tiny_causal_lm("llama", seed=0), tok),
        tok,
        tmp_path,
        [mon],
        max_steps=4,
        logger=[csv_logger, shared, other],
        log_every_n_steps=1,
    )
    assert mon.captures == [0, 2, 4]
    layers = ("layer_0", "final_norm")
    want = {
        (r["step"], r["layer"]): r["metrics"]["rankme"]
        for r in metric_lines(tmp_path / "topomon")
        if r["layer"] in layers
    }
    with open(f"{csv_logger.log_dir}/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    got = {
        (int(row["step"]), layer): float(row[f"topomon/rankme/{layer}"])
        for row in rows
        for layer in layers
        if row.get(f"topomon/rankme/{layer}")
    }
    assert len(want) == 6 and got == pytest.approx(want, rel=1e-6)  # at the capture steps
    assert any(row.get("train_loss") for row in rows)  # the module's own logging still arrives
    alerts = [float(row["topomon/alerts"]) for row in rows if row.get("topomon/alerts")]
    assert alerts and alerts[0] == 1.0
    # another TensorBoardLogger gets the scalars and the alert as text
    events = scalar_events(other.log_dir)
    assert [e.step for e in events.Scalars("topomon/rankme/final_norm")] == [0, 2, 4]
    assert any(t.startswith("topomon/alerts") for t in events.Tags()["tensors"])
    # the one writing into topomon's own TensorBoard folder is skipped: every scalar once there
    events = scalar_events(shared.log_dir)
    assert [e.step for e in events.Scalars("topomon/rankme/final_norm")] == [0, 2, 4]
    assert "train_loss" in events.Tags()["scalars"]
    assert mon.sink is not None and mon.sink.skipped == [shared] and mon.sink.errors == 0


def test_the_hf_callback_in_a_lightning_trainer_names_the_lightning_class():
    with pytest.raises(
        TypeError,
        match=r"topomon\.TopoMonitor is the Hugging Face Trainer callback; .*"
        r"topomon\.integrations\.lightning\.TopoMonitorCallback",
    ):
        L.Trainer(callbacks=[TopoMonitor()], logger=False)
    assert TopoMonitor().captures == []  # the session's views still work


def test_the_lightning_callback_in_a_hf_trainer_names_the_hf_class(tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    msg = r"TopoMonitorCallback is the PyTorch Lightning callback; for a Hugging Face / TRL Trainer use " + (
        r"topomon\.TopoMonitor"
    )
    with pytest.raises(TypeError, match=msg):
        Trainer(model=tiny_causal_lm("llama"), args=args, callbacks=[TopoMonitorCallback()])
    ids = torch.tensor([1, 5, 6, 7])
    trainer = Trainer(
        model=tiny_causal_lm("llama"), args=args, train_dataset=[{"input_ids": ids, "labels": ids}] * 4
    )
    trainer.add_callback(TopoMonitorCallback())
    with pytest.raises(TypeError, match=msg):
        trainer.train()


def test_what_the_lightning_callback_cannot_use_is_a_clear_error_before_step_1(tok, tmp_path):
    with pytest.raises(ConfigError, match=r"LightningModule owns its data"):
        TopoMonitorCallback(actions=[{"kind": "replay", "value": 0.5}])
    with pytest.raises(ConfigError, match=r"`trackers` names 'mlflow' but no mlflow run is active"):
        fit(LitLM(tiny_causal_lm("llama"), tok), tok, tmp_path, [TopoMonitorCallback(trackers=["mlflow"])])
    with pytest.raises(ConfigError, match=r"pass TopoMonitorCallback\(tokenizer=\.\.\.\)"):
        fit(LitLM(tiny_causal_lm("llama")), tok, tmp_path, [TopoMonitorCallback(**FAST)], max_steps=1)
    # GRPO's entropy bonus: no TRL trainer here (refused at construction: the kind requires one)
    with pytest.raises(ConfigError, match=r"entropy_bonus.*GRPOTrainer.*Lightning has no GRPO entropy bonus"):
        TopoMonitorCallback(actions=[{"kind": "entropy_bonus", "value": 0.1}], **FAST)

    class Holder(LitLM):
        def __init__(self):
            super().__init__(tiny_causal_lm("llama"), tok)
            self.ref = tiny_causal_lm("llama").requires_grad_(True)

    with pytest.raises(ConfigError, match=r"several trainable language models \('model', 'ref'\)"):
        find_language_model(Holder())
    holder = Holder()
    holder.ref.requires_grad_(False)  # a frozen reference model: the trainable policy is the one
    assert find_language_model(holder) is holder.model
    assert find_language_model(holder, "ref") is holder.ref
    with pytest.raises(ConfigError, match=r"no transformers PreTrainedModel inside Linear"):
        find_language_model(torch.nn.Linear(2, 2))
