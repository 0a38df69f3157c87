"""Monitor presets: shipped once as package data (topomon/presets/), read by one function everywhere."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import topomon
from topomon import TopoMonitor
from topomon.config import ConfigError, MonitorConfig, load_preset, preset_names
from topomon.trl_cli import help_text, monitor_spec, split_topomon_option

ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = ROOT / "topomon" / "presets"
UNKNOWN = r"unknown monitor preset 'heavy': give one of 'full', 'light', 'rl', 'standard'"


def test_the_packaged_presets_are_the_files_and_differ():
    assert preset_names() == ("full", "light", "rl", "standard")
    assert sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) == list(preset_names())
    for name in preset_names():  # the function reads exactly the file
        assert load_preset(name) == (yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text()) or {})
    light, standard, full = (MonitorConfig.from_dict(load_preset(n)) for n in ("light", "standard", "full"))
    assert standard == MonitorConfig()
    assert not light.topology and light.spectral and light.layers == [-4, -1] and light.final_norm
    assert light.make_schedule()(128) and not light.make_schedule()(150)  # sparse: log-spaced, gap 200
    assert full.topology_layers == "all" and full.figures_every == 1 and full.budget() is None
    assert [s for s in range(1, 31) if full.make_schedule()(s)] == [10, 20, 30]
    # a new dict every time: a caller's edit does not change the preset
    load_preset("light")["every_n_steps"] = 1
    assert load_preset("light")["every_n_steps"] == 200


def test_the_rl_preset_is_standard_plus_the_probe_entropy_watched_both_ways():
    from topomon.alert_setup import alert_rules
    from topomon.alerts import default_rules, rules_from_config
    from topomon.metrics.options import ComputeOptions
    from topomon.types import MetricRecord

    rl = MonitorConfig.from_dict(load_preset("rl"))
    assert rl.replace(alerts="default", every_n_steps=50) == MonitorConfig()
    assert rl.logits and rl.every_n_steps == 20
    assert rl.alerts[0] == "default"  # the default rules, whichever ship, then the entropy rules
    rules = rules_from_config(rl.alerts[1:])
    drop, rise, rollout_drop, rollout_rise = rules
    built = alert_rules(rl.alerts, None, ComputeOptions(logits=True))
    assert [r.config() for r in built] == [r.config() for r in default_rules() + rules]
    assert (drop.name, rise.name) == ("logit_entropy_drop", "logit_entropy_rise")
    assert (rollout_drop.layer, rollout_drop.metric, rollout_drop.window) == ("trainer", "entropy", 4)
    assert (rollout_drop.direction, rollout_rise.direction) == ("drop", "rise")

    def fired(rule, values):
        recs = [MetricRecord(i, "grpo", "model", {"logit_entropy": v}, 0.0) for i, v in enumerate(values)]
        return [(a.step, a.reason) for r in recs for a in rule.update([r]) if a.reason != "recovered"]

    collapse, drift = [6.0, 5.8, 4.0, 3.0], [6.0, 6.2, 7.6, 8.0]
    assert fired(drop, collapse) == [(2, "drop")] and fired(rise, collapse) == []
    assert fired(rise, drift) == [(2, "rise")] and fired(drop, drift) == []
    # the rollout entropy TRL logs: the mean of the last 4 against the stage's first 4
    logged = [1.0, 1.1, 0.9, 1.0, 0.8, 0.6, 0.4, 0.3, 0.3]
    logs = [MetricRecord(i, "grpo", "trainer", {"entropy": v}, 0.0) for i, v in enumerate(logged)]
    seen = [a for r in logs for a in rollout_drop.update([r])]
    assert [(a.step, a.reason) for a in seen if a.reason != "recovered"] == [(8, "drop")]


def test_presets_exist_once():
    # no second copy of the preset files in the repository (recipes/monitor/ is gone)
    assert not (ROOT / "recipes" / "monitor").exists()
    folders = ("recipes", "examples", "docs", "bench", "tests", "topomon")
    copies = [
        p
        for folder in folders
        for p in (ROOT / folder).rglob("*.y*ml")
        if "topomon monitor preset" in p.read_text(errors="replace") and p.parent != PRESET_DIR
    ]
    assert copies == []


def test_from_dict_takes_a_preset_and_explicit_fields_win():
    light = load_preset("light")
    c = MonitorConfig.from_dict({"preset": "light", "every_n_steps": 20, "stage": "sft"})
    assert c == MonitorConfig(**{**light, "every_n_steps": 20, "stage": "sft"})
    assert c.every_n_steps == 20 and c.max_probes == 32 and not c.topology  # override + preset fields
    assert MonitorConfig.from_dict({"preset": "full"}).topology_layers == "all"
    assert MonitorConfig.from_dict({"preset": None, "stage": "a"}) == MonitorConfig(stage="a")
    with pytest.raises(ConfigError, match=UNKNOWN):
        MonitorConfig.from_dict({"preset": "heavy"})
    # a bad explicit field next to a preset names the field
    with pytest.raises(ConfigError, match=r"'every_n_step'.*did you mean 'every_n_steps'"):
        MonitorConfig.from_dict({"preset": "light", "every_n_step": 3})


def test_from_yaml_takes_a_preset_by_name_or_by_path_from_the_files_folder(tmp_path):
    (tmp_path / "m.yaml").write_text("topomon:\n  preset: light\n  every_n_steps: 7\n")
    assert MonitorConfig.from_yaml(tmp_path / "m.yaml") == MonitorConfig.from_dict(
        {**load_preset("light"), "every_n_steps": 7}
    )
    # a file naming another file (relative to its own folder), which names a packaged preset
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "base.yaml").write_text("preset: full\nqueue_size: 2\n")
    (sub / "mine.yaml").write_text("preset: base.yaml\nevery_n_steps: 3\n")
    want = MonitorConfig.from_dict({**load_preset("full"), "queue_size": 2, "every_n_steps": 3})
    assert MonitorConfig.from_yaml(sub / "mine.yaml") == want
    assert MonitorConfig.from_dict(load_preset(sub / "mine.yaml")) == want
    (tmp_path / "bad.yaml").write_text("preset: heavy\n")
    with pytest.raises(ConfigError, match=UNKNOWN):
        MonitorConfig.from_yaml(tmp_path / "bad.yaml")


def test_preset_file_errors_name_the_file(tmp_path):
    with pytest.raises(
        ConfigError, match=r"monitor preset file not found: .*nope\.yaml \(the packaged presets"
    ):
        load_preset(str(tmp_path / "nope.yaml"))
    (tmp_path / "a.yaml").write_text("preset: b.yaml\n")
    (tmp_path / "b.yaml").write_text("preset: a.yaml\n")
    with pytest.raises(
        ConfigError, match=r"monitor presets name each other in a loop: .*a\.yaml -> .*b\.yaml"
    ):
        load_preset(str(tmp_path / "a.yaml"))
    (tmp_path / "w.yaml").write_text("preset: light\nworker: gpu\n")
    with pytest.raises(ConfigError, match=r"the preset file .*w\.yaml: `worker` must be one of"):
        load_preset(str(tmp_path / "w.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"must be a YAML mapping of MonitorConfig fields, got list"):
        load_preset(str(tmp_path / "list.yaml"))
    with pytest.raises(ConfigError, match=r"unknown monitor preset 3"):
        load_preset(3)  # type: ignore[arg-type]


def test_topomonitor_takes_a_preset_and_explicit_fields_win(tmp_path):
    want = MonitorConfig.from_dict({**load_preset("light"), "every_n_steps": 20})
    assert TopoMonitor(preset="light", every_n_steps=20).session.config == want
    assert TopoMonitor({"preset": "light", "every_n_steps": 20}).session.config == want
    # the mapping's fields win over a keyword preset, keyword fields over both
    assert TopoMonitor({"every_n_steps": 20}, preset="light").session.config == want
    assert TopoMonitor({"preset": "full", "every_n_steps": 5}, every_n_steps=20).session.config == (
        MonitorConfig.from_dict({**load_preset("full"), "every_n_steps": 20})
    )
    (tmp_path / "m.yaml").write_text("preset: light\nevery_n_steps: 20\n")
    assert TopoMonitor.from_yaml(tmp_path / "m.yaml").session.config == want
    with pytest.raises(ConfigError, match=UNKNOWN):
        TopoMonitor(preset="heavy")
    # a built config has every field: a preset over it would silently lose or win; it is an error
    with pytest.raises(ConfigError, match=r"preset='light' cannot apply over a built MonitorConfig"):
        TopoMonitor(MonitorConfig(), preset="light")
    with pytest.raises(ConfigError, match=r"`preset` is not a field"):
        MonitorConfig().replace(preset="light")


def test_watch_takes_a_preset_and_explicit_fields_win():
    model = object()  # nothing touches the model before begin()
    mon = topomon.watch(model, None, preset="full", every_n_steps=4)
    assert mon.config == MonitorConfig.from_dict({**load_preset("full"), "every_n_steps": 4})
    assert topomon.watch(model, None, config={"preset": "light"}).config == MonitorConfig.from_dict(
        load_preset("light")
    )
    with pytest.raises(ConfigError, match=UNKNOWN):
        topomon.watch(model, None, preset="heavy")


def test_the_trl_command_line_reads_the_same_presets():
    rest, preset = split_topomon_option(["--config", "r.yaml", "--topomon", "light"])
    assert (rest, preset) == (["--config", "r.yaml"], "light")
    spec = monitor_spec({"every_n_steps": 20}, preset=preset, command="sft")
    assert spec.config == MonitorConfig.from_dict({"preset": "light", "stage": "sft", "every_n_steps": 20})
    with pytest.raises(ConfigError, match=UNKNOWN):
        monitor_spec({"preset": "heavy"}, preset=None, command="sft")
    with pytest.raises(ConfigError, match=r"a preset \(full, light, rl, standard\) or a YAML file"):
        split_topomon_option(["--topomon"])
    assert "--topomon PRESET|FILE  the monitor preset: full, light, rl, standard" in help_text("sft")


def test_the_presets_are_in_the_built_wheel(tmp_path):
    # build from a copy: pip writes build/ and *.egg-info next to pyproject.toml
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "topomon", src / "topomon", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheel"
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q"]
    proc = subprocess.run([*cmd, "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("topomon-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for preset in preset_names():
            member = f"topomon/presets/{preset}.yaml"
            assert member in names
            assert z.read(member).decode() == (PRESET_DIR / f"{preset}.yaml").read_text()
