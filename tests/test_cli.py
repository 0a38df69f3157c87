"""The `topomon` command: help, report, alerts, probe and layers errors, layers on a tiny model.

The alerts tests read a real tiny run (tests/report/tiny_run.py) whose alert fires and whose actions act.
"""

import json
import subprocess
import sys

import pytest

from topomon.cli import build_parser, main


def test_help_lists_the_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "report", "alerts", "probe", "layers", "sft", "dpo"):
        assert cmd in out
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0


def test_report_of_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a topomon run directory" in capsys.readouterr().err


def test_probe_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["probe", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "run")]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err


@pytest.mark.slow
def test_layers_on_a_saved_tiny_model(tmp_path):
    from topomon.testing import sample_texts, tiny_causal_lm, tiny_tokenizer

    tiny_causal_lm("llama", num_layers=6).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    probes = tmp_path / "p.txt"
    probes.write_text("\n".join(sample_texts(48)))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "topomon.cli",
            "layers",
            str(tmp_path / "m"),
            "--run-dir",
            str(tmp_path / "out"),
            "--probes",
            str(probes),
            "--k",
            "5",
            "--top-k",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "pruning candidates" in run.stdout
    data = json.loads((tmp_path / "out" / "layers.json").read_text())
    assert len(data["prune_ranking"]) == 6
    assert (tmp_path / "out" / "layer_similarity.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def acted_run(tmp_path_factory):
    """A real tiny run whose second stage raised an alert that switched on two actions."""
    from tests.report.tiny_run import make_tiny_run

    out = tmp_path_factory.mktemp("alerts") / "out"
    return out, make_tiny_run(out)


@pytest.mark.slow
def test_alerts_table_lists_the_alert_and_what_the_actions_did(acted_run, capsys):
    out, run_dir = acted_run
    assert (out / "checkpoint-1").is_dir()  # the checkpoint action acted
    assert main(["alerts", str(run_dir)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == f"1 alert, 2 actions in {run_dir}"
    alert_row = lines[lines.index("alerts") + 2].split()
    assert alert_row[:5] == ["narrow", "6", "always", "warning/above", "rankme@final_norm"]
    assert "final_norm rankme = " in text and "is above 0 [always]" in text
    actions = lines[lines.index("actions") + 1 :]
    assert actions[0].split() == ["stage", "step", "action", "did", "cause", "(rule)"]
    assert [r.split() for r in actions[1:]] == [
        ["narrow", "7", "diversity", "set", "weight=0.1", "always"],
        ["narrow", "7", "checkpoint", "requested", "checkpoint", "always"],
    ]


@pytest.mark.slow
def test_alerts_json_is_one_object_per_line_equal_to_alerts_jsonl(acted_run, capsys):
    _, run_dir = acted_run
    assert main(["alerts", str(run_dir), "--json"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    written = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    assert [g["kind"] for g in got] == ["alert", "action", "action"]
    alert = next(w for w in written if w["kind"] == "alert")
    for key in ("stage", "step", "rule", "severity", "reason", "metric", "layer", "value", "message", "time"):
        assert got[0][key] == alert[key]
    assert [(g["action"], g["params"], g["cause"], g["step"]) for g in got[1:]] == [
        ("diversity", {"weight": 0.1}, "always", 7),
        ("checkpoint", {}, "always", 7),
    ]


def test_alerts_of_a_run_without_alerts_and_of_a_torn_log(tmp_path, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"stages": [{"name": "sft", "step_offset": 0}]}))
    assert main(["alerts", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"0 alerts, 0 actions in {tmp_path}"]
    assert main(["alerts", str(tmp_path), "--json"]) == 0
    assert capsys.readouterr().out == ""
    # an action line without a stage gets it from run.json; a torn last line is skipped and noted
    (tmp_path / "alerts.jsonl").write_text(
        json.dumps({"kind": "action", "action": "stop", "step": 3, "params": {}, "cause": {"rule": "r"}})
        + '\n{"kind": "alert", "step": 4, "sta'
    )
    assert main(["alerts", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    rec = json.loads(captured.out)
    assert (rec["kind"], rec["stage"], rec["action"], rec["cause"]) == ("action", "sft", "stop", "r")
    assert "1 torn or unreadable line(s) in alerts.jsonl" in captured.err


def test_alerts_of_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "topomon").mkdir()
    assert main(["alerts", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a topomon run directory: it has none of run.json, metrics.jsonl, alerts.jsonl" in err
    assert f"did you mean {str(tmp_path / 'topomon')!r}" in err
    assert main(["alerts", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
