"""`topomon probe`: offline metrics of saved checkpoints equal the live captures at those steps."""

import math

import pytest

from tests.integrations.conftest import read_jsonl
from tests.integrations.test_monitor import run_sft
from topomon import TopoMonitor
from topomon.config import ConfigError, MonitorConfig
from topomon.offline import probe_checkpoints
from topomon.testing import tiny_causal_lm

pytestmark = pytest.mark.slow


def test_probe_over_checkpoints_reproduces_the_live_numbers(tok, sft_data, tmp_path):
    run_dir = tmp_path / "run"
    mon = TopoMonitor(
        run_dir=str(run_dir),
        stage="sft",
        schedule="every",
        every_n_steps=2,
        worker="sync",
        layers=[0, -1],
        topology_points=64,
    )
    run_sft(
        tiny_causal_lm("llama"),
        tok,
        sft_data,
        tmp_path / "out",
        mon,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        learning_rate=1e-3,
    )
    ckpts = [str(tmp_path / "out" / f"checkpoint-{s}") for s in (2, 4, 6)]
    records = probe_checkpoints(ckpts, str(run_dir), stage="replay", like="sft", progress=False)
    assert [(r.step, r.layer) for r in records] == [
        (s, ly) for s in (2, 4, 6) for ly in ("layer_0", "layer_3", "final_norm", "model")
    ]
    live = {
        (r["step"], r["layer"]): r["metrics"]
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if r["kind"] == "metrics" and r["stage"] == "sft"
    }
    for r in records:
        want = live[(r.step, r.layer)]
        assert set(r.metrics) == set(want), (r.step, r.layer)  # the same families, logits included
        for name, value in r.metrics.items():
            if name.startswith("topo_activity") or name == "topo_drift":
                continue  # relative to the previous capture, which differs (step 0 is not probed offline)
            w = want[name]
            assert (w is None and math.isnan(value)) or value == pytest.approx(w, rel=1e-5, abs=1e-6), (
                r.step,
                r.layer,
                name,
            )
    written = [
        r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "metrics" and r["stage"] == "replay"
    ]
    assert len(written) == 12
    assert (run_dir / "tensorboard" / "replay").is_dir()


def test_probe_of_lora_checkpoints_gives_every_live_key_and_value(tok, sft_data, tmp_path):
    """Offline and live run one session: logit and LoRA metrics too, and with the base model as the
    first checkpoint the same sequence of captures, so even topological activity is equal."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    def base():
        return tiny_causal_lm("llama", num_layers=3, hidden_size=32, seed=0)

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base(), lora)
    model.save_pretrained(tmp_path / "out" / "checkpoint-0")  # the adapter as training starts
    run_dir = tmp_path / "run"
    mon = TopoMonitor(
        run_dir=str(run_dir),
        stage="sft",
        schedule="every",
        every_n_steps=2,
        worker="sync",
        topology_points=64,
    )
    run_sft(
        model,
        tok,
        sft_data,
        tmp_path / "out",
        mon,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        learning_rate=1e-2,
    )

    def load(path):
        return PeftModel.from_pretrained(base(), path).eval(), tok

    ckpts = [str(tmp_path / "out" / f"checkpoint-{s}") for s in (0, 2, 4, 6)]
    records = probe_checkpoints(ckpts, str(run_dir), stage="offline", like="sft", loader=load, progress=False)
    live = {
        (r["step"], r["layer"]): r["metrics"]
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if r["kind"] == "metrics" and r["stage"] == "sft"
    }
    assert sorted({(r.step, r.layer) for r in records}) == sorted(live)
    model_keys = set(live[(2, "model")])
    assert {"logit_entropy", "logit_ece", "lora_effective_rank_mean", "lora_norm_total"} <= model_keys
    assert live[(6, "model")]["lora_norm_total"] > 0  # the update grew: a real LoRA metric, not a NaN
    differ = []
    for r in records:
        want = live[(r.step, r.layer)]
        assert set(r.metrics) == set(want), (r.step, r.layer)
        for name, value in r.metrics.items():
            w = math.nan if want[name] is None else want[name]
            if not (math.isnan(w) and math.isnan(value)) and value != pytest.approx(w, rel=1e-5, abs=1e-6):
                differ.append((r.step, r.layer, name, value, w))
    assert differ == []


def test_probe_errors(tmp_path):
    with pytest.raises(ConfigError, match="at least one checkpoint"):
        probe_checkpoints([], str(tmp_path))
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        probe_checkpoints([str(tmp_path / "nope")], str(tmp_path))


def test_probe_writes_to_the_trackers_its_config_names_or_says_why_not(tok, tmp_path, monkeypatch):
    # the offline path shares the live one's trackers: named in the config given, they receive the
    # records (MLflow, a local store read back with its client) or fail before any capture
    mlflow = pytest.importorskip("mlflow")
    model = tiny_causal_lm("llama", seed=0)
    model.save_pretrained(tmp_path / "checkpoint-3")
    tok.save_pretrained(tmp_path / "checkpoint-3")
    cfg = MonitorConfig(trackers=("mlflow",), topology=False, max_probes=8)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # MLflow keeps a sqlite store's artifacts (the figures) in ./mlruns
    with pytest.raises(ConfigError, match="no mlflow run is active"):
        probe_checkpoints([str(tmp_path / "checkpoint-3")], str(tmp_path / "run"), config=cfg)
    with mlflow.start_run() as active:
        recs = probe_checkpoints([str(tmp_path / "checkpoint-3")], str(tmp_path / "run2"), config=cfg)
    got = mlflow.MlflowClient().get_metric_history(active.info.run_id, "topomon/rankme/final_norm")
    want = next(r.metrics["rankme"] for r in recs if r.layer == "final_norm")
    assert [(m.step, m.value) for m in got] == [(3, pytest.approx(want))]
