"""Safety: YAML is safe-loaded, nothing is unpickled from disk, webhook URLs must be http(s), and no
secret (a password, a token in a URL's path or query) reaches a log, a run file or a checkpoint.

``tests/alerts/test_sinks.py`` checks the webhook sink alone (Basic auth from ``user:pass@``, redacted
``repr`` and failure logs, no redirects followed); here the whole monitor runs in a trainer.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import numpy as np
import pytest

from tests.alerts.test_sinks import closed_port
from tests.integrations.test_monitor import run_sft
from tests.reliability._support import sft_data
from topomon import TopoMonitor
from topomon.config import ConfigError, MonitorConfig
from topomon.metrics.lora import load_lora_subspaces
from topomon.report.load import DiagramFile, load_run
from topomon.report.plots import diagrams_figure
from topomon.testing import tiny_causal_lm, tiny_tokenizer

PACKAGE = Path(__file__).resolve().parents[2] / "topomon"


# --------------------------------------------------------------------------- YAML
@pytest.mark.parametrize(
    "payload",
    [
        "stage: !!python/object/apply:builtins.open ['{marker}', 'w']\n",
        "stage: !!python/object/new:builtins.open ['{marker}', 'w']\n",
        "!!python/object/apply:builtins.open ['{marker}', 'w']\n",
        "topomon:\n  custom_metrics: !!python/object/apply:builtins.open ['{marker}', 'w']\n",
    ],
)
def test_yaml_tags_that_would_run_code_are_refused_and_never_run(tmp_path, payload):
    marker = tmp_path / "PWNED"
    path = tmp_path / "monitor.yaml"
    path.write_text(payload.format(marker=marker), encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TopoMonitor.from_yaml(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- no unpickling
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = (
                f"{f.value.id}.{f.attr}"
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                else f.id
                if isinstance(f, ast.Name)
                else ""
            )
            yield name, {k.arg: k.value for k in node.keywords}, node


def test_the_package_never_deserialises_with_pickle_or_unsafe_yaml():
    """A static guard over every module of the package (it fails when such a call is added)."""
    problems = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for m in mods:
                    if m.split(".")[0] in {
                        "pickle",
                        "cPickle",
                        "dill",
                        "cloudpickle",
                        "joblib",
                        "marshal",
                        "shelve",
                    }:
                        problems.append(f"{where}:{node.lineno} imports {m}")
        for name, kw, node in _calls(tree):
            if name in {
                "yaml.load",
                "yaml.load_all",
                "yaml.unsafe_load",
                "yaml.full_load",
                "yaml.unsafe_load_all",
            }:
                problems.append(f"{where}:{node.lineno} calls {name}")
            if name in {"np.load", "numpy.load"}:
                v = kw.get("allow_pickle")
                if not (isinstance(v, ast.Constant) and v.value is False):
                    problems.append(f"{where}:{node.lineno} calls {name} without allow_pickle=False")
            if name == "torch.load":
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    problems.append(f"{where}:{node.lineno} calls torch.load without weights_only=True")
            if name in {"eval", "exec"}:
                problems.append(f"{where}:{node.lineno} calls {name}")
    assert problems == []


class _Payload:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_arrays_in_run_files_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    evil = np.array([_Payload(marker)], dtype=object)
    # a diagram file of a run directory, as the report reads them
    run_dir = tmp_path / "run"
    (run_dir / "diagrams").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(
        '{"kind": "metrics", "step": 0, "stage": "sft", "layer": "final_norm", "metrics": {"rankme": 3.0}}\n'
    )
    dpath = run_dir / "diagrams" / "sft__0__final_norm.npz"
    np.savez(dpath, h0=evil, h1=evil)
    problems: list[str] = []
    run = load_run(run_dir)
    assert diagrams_figure(run, [DiagramFile("sft", 0, "final_norm", str(dpath))], problems) is None
    assert problems and "Object arrays cannot be loaded" in problems[0]
    # a LoRA subspace file of an earlier stage, as the decorrelation intervention reads them
    lpath = tmp_path / "sft.npz"
    np.savez(lpath, __format__=evil, name_0=evil)
    with pytest.raises(ValueError, match="Object arrays cannot be loaded"):
        load_lora_subspaces(lpath)
    assert not marker.exists()


# --------------------------------------------------------------------------- webhook URLs
@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://user:hunter2@example.com/hook",
        "gopher://example.com/",
        "javascript:alert(1)",
        "data:text/plain,hello",
        "http://",
        "https:///path-only",
        "//example.com/hook",
        "example.com/hook",
        "http://[::1/hook",
        "",
    ],
)
def test_a_webhook_url_must_be_http_or_https_with_a_host(url):
    with pytest.raises(ConfigError, match="`webhook_url` must be an http") as err:
        TopoMonitor(webhook_url=url)
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/x", "https://hooks.example.com/services/T/B/X", "HTTPS://h.io"]
)
def test_http_and_https_webhooks_are_accepted(url):
    assert MonitorConfig(webhook_url=url).webhook_url == url


# --------------------------------------------------------------------------- secrets
SECRETS = ("s3cr3t-pass", "T0K3N-PATH-9f8e7d", "q5ecret-query")


def _leaks(data: bytes | str) -> list[str]:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return [s for s in SECRETS if s in text]


@pytest.mark.slow
def test_no_secret_reaches_logs_run_files_or_checkpoints(tmp_path, caplog, capfd):
    url = f"http://alice:{SECRETS[0]}@127.0.0.1:{closed_port()}/services/{SECRETS[1]}?token={SECRETS[2]}"
    rules = [{"type": "threshold", "metric": "rankme", "layer": "final_norm", "above": 0.0, "name": "always"}]
    mon = TopoMonitor(
        schedule="every",
        every_n_steps=2,
        worker="sync",
        layers=[-1],
        topology=False,
        alerts=rules,
        webhook_url=url,
    )
    assert _leaks(repr(mon.config)) == []
    with caplog.at_level(logging.DEBUG):
        run_sft(
            tiny_causal_lm("llama", seed=0),
            tiny_tokenizer(),
            sft_data(),
            tmp_path,
            mon,
            save_strategy="steps",
            save_steps=2,
        )
    # the alert fired and its delivery to the (closed) endpoint failed and was logged
    assert any("delivery failed" in r.getMessage() for r in caplog.records)
    logs = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    out, err = capfd.readouterr()
    assert _leaks(logs) == [] and _leaks(out) == [] and _leaks(err) == []
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"run.json", "metrics.jsonl", "alerts.jsonl", "topomon_state.json"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    leaked = {str(p.relative_to(tmp_path)): _leaks(p.read_bytes()) for p in files}
    assert {k: v for k, v in leaked.items() if v} == {}
    # where the alerts were sent is still recorded, without its secret parts
    run_json = (tmp_path / "topomon" / "run.json").read_text()
    assert "http://127.0.0.1/***" in run_json


def test_the_offline_path_keeps_webhook_secrets_out_and_never_sends_to_a_redacted_url(tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    from topomon.offline import probe_checkpoints, stage_config
    from topomon.run import RunDir

    url = f"http://alice:{SECRETS[0]}@127.0.0.1:{closed_port()}/services/{SECRETS[1]}?token={SECRETS[2]}"
    mon = TopoMonitor(
        schedule="every", every_n_steps=2, worker="sync", layers=[-1], topology=False, webhook_url=url
    )
    run_sft(
        tiny_causal_lm("llama", seed=0),
        tiny_tokenizer(),
        sft_data(),
        tmp_path,
        mon,
        save_strategy="steps",
        save_steps=2,
    )
    run = RunDir(tmp_path / "topomon")
    # the stored config holds only where the alerts went: never rebuilt into a live webhook
    assert "/***" in run.stages()[0]["config"]["webhook_url"]
    assert stage_config(run, "train").webhook_url is None
    with pytest.raises(ConfigError, match="redacted"):
        MonitorConfig(webhook_url=run.stages()[0]["config"]["webhook_url"])

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path), tiny_tokenizer()

    rules = [{"type": "threshold", "metric": "rankme", "layer": "final_norm", "above": 0.0, "name": "always"}]
    ckpt = str(tmp_path / "checkpoint-2")
    with caplog.at_level(logging.DEBUG):
        # like= the live stage: no webhook at all; an explicit config with the secret URL: it sends
        # (and fails on the closed port) but writes no secret into the run directory
        probe_checkpoints([ckpt], str(run.path), stage="offline", like="train", loader=load, progress=False)
        assert not any("delivery failed" in r.getMessage() for r in caplog.records)
        config = mon.config.replace(alerts=rules)
        probe_checkpoints([ckpt], str(run.path), stage="offline2", config=config, loader=load, progress=False)
    assert any("delivery failed" in r.getMessage() for r in caplog.records)
    assert "offline2" in {s["name"] for s in run.stages()}
    files = [p for p in (tmp_path / "topomon").rglob("*") if p.is_file()]
    leaked = {str(p.relative_to(tmp_path)): _leaks(p.read_bytes()) for p in files}
    assert {k: v for k, v in leaked.items() if v} == {}
    assert _leaks(caplog.text) == []
