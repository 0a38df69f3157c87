"""Bad input: every configuration field with a wrong type or value, unknown YAML keys, broken probe files.

Each is a clear error naming the field (or the file and line), raised when the monitor is built,
before training starts; hypothesis fuzzes the config and probe loaders so that nothing but the
documented error types (``ConfigError``, ``ProbeError``; both ``ValueError``) escapes.

Already covered elsewhere (not repeated): ``tests/test_config.py`` (a first set of bad values,
unknown keys with a suggestion, YAML syntax errors, ``!!python`` tags), ``tests/capture/test_probes.py``
(empty file, malformed JSON on line N, missing field, non-string, blank text, not UTF-8 on line N),
``tests/integrations/test_monitor.py::test_configuration_errors_stop_before_the_first_step`` (a bad
layer index raised in ``on_train_begin`` before step 1).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topomon import TopoMonitor
from topomon.capture.probes import MAX_TEXT_CHARS, ProbeError, load_probes
from topomon.config import ConfigError, MonitorConfig

FIELDS = {f.name for f in dataclasses.fields(MonitorConfig)}

# field -> wrong values (a wrong type first, then wrong values of the right type)
BAD: dict[str, list] = {
    "stage": [5, "", "a/b", "..", "tab\there"],
    "run_dir": [5, ["a"]],
    "step_offset": ["3", -1, 1.5, True],
    "logging_dir": [3.5],
    "tensorboard": ["yes", 1, None],
    "mode": [1, "active"],
    "probe_field": [3, ""],
    "max_probes": ["64", 0, 1.5],
    "max_length": [None, 1],
    "probe_batch_size": [[4], 0],
    "layers": [3, "last", [], [1, "2"], [True], {"a": 1}],
    "final_norm": [1, "true"],
    "pooling": [None, "max"],
    "max_points": [10.0, 2],
    "exclude_first": ["no"],
    "outlier_factor": ["10", 0.5, math.inf, math.nan],
    "massive_treatment": [None, "mad", 3],
    "trackers": ["wandb", ["tensorboard"], ["wandbb"], [3]],
    "normalize": [None],
    "schedule": [2, "cosine"],
    "every_n_steps": ["5", 0, -3],
    "steps": [5, "1,2", b"xy", {"a": 1}, [None], [-1], [1.5], [True]],
    "spectral": ["true"],
    "topology": [0],
    "logits": ["yes"],
    "trajectory": [1],
    "lora_metrics": [None],
    "topology_layers": [5, "last", b"x", ["x"], [1.5]],
    "topology_points": [None, 2],
    "pca_dim": ["32", 1],
    "n_landmarks": [2.5, 0],
    "topology_engine": [None, "gudhi"],
    "alpha_window": ["ab", [1], (10, 5), (1, 2), (1.0, 9.0)],
    "figures_every": [None, -1],
    "worker": [None, "gpu"],
    "queue_size": ["4", 0],
    "max_snapshot_mb": ["64", 0, -1.0, math.inf],
    "worker_threads": [1.0, 0],
    "task_timeout": ["300", 0, math.nan, math.inf],
    "flush_timeout": [None, -1, math.inf],
    "overhead_budget": [0, -0.1, 1.5, math.nan, "1%", True, "Auto"],
    "worker_priority": [None, "lowest", 19],
    "seed": [1.5, -1, 2**40],
    "custom_metrics": [["a:b"], {"x": "nocolon"}, {"": "a:b"}, {"x": 3}],
    "families": ["a:b", ["nocolon"], [3], {"a": "b:c"}],
    "family_options": ["x", {"fam": 1}, {1: {}}, {"fam": {1: 2}}],
    "alerts": [5, "defualt", [1], [{"type": "drop"}], [{"type": "drop", "metric": "rankme", "colour": 1}]],
    "webhook_url": [5, "ftp://example.com/hook", "file:///etc/passwd", "http://", "example.com/hook"],
    "actions": ["stop", [1], [{"kind": "explode"}], [{"kind": "replay", "value": -1}]],
    "diversity": [[1], {"colour": 1}, {1: 2, "a": 3}],
    "intervention_options": [
        [1],
        {"explode": {}},
        {"diversity": 3},
        {"lora_decorrelation": {"two_sided": 1.0}},
        {"stop": {"now": True}},
        {"diversity": {1: 2}},
    ],
}
CASES = [(name, v) for name, values in BAD.items() for v in values]


def test_every_field_has_wrong_values_in_the_table():
    # a field added later must get its cases here; `probes` is checked when it is loaded (below)
    assert set(BAD) | {"probes"} == FIELDS


@pytest.mark.parametrize(("field", "value"), CASES, ids=[f"{f}={v!r}"[:60] for f, v in CASES])
def test_a_wrong_value_is_a_config_error_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=re.escape(f"`{field}")) as err:
        MonitorConfig(**{field: value})
    assert len(str(err.value)) < 2000
    # the same through every entry point: a mapping, keyword overrides, YAML-like dicts
    with pytest.raises(ConfigError, match=re.escape(f"`{field}")):
        TopoMonitor(**{field: value})
    with pytest.raises(ConfigError, match=re.escape(f"`{field}")):
        MonitorConfig().replace(**{field: value})


def test_steps_schedule_needs_steps_and_passive_mode_refuses_probes():
    with pytest.raises(ConfigError, match="`steps` must list at least one step"):
        MonitorConfig(schedule="steps", steps=())
    with pytest.raises(ConfigError, match="`probes` is only used in mode 'probe'"):
        MonitorConfig(mode="passive", probes=["a b c"])


@pytest.mark.parametrize("value", [42, 3.5, b"bytes", object(), {"text": "x"}])
def test_a_wrong_probes_value_is_a_probe_error_at_construction(value):
    with pytest.raises(ProbeError, match="probes must be None, a list of strings"):
        TopoMonitor(probes=value)


# --------------------------------------------------------------------------- YAML
@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("stage: sft\ncolour: red\n", r"unknown monitor config key 'colour'"),
        ("topomon:\n  stage: sft\n  every_n_step: 3\n", r"'every_n_step' \(did you mean 'every_n_steps'\?\)"),
        ("topomon:\n  topomon: {}\n", r"unknown monitor config key 'topomon'"),
        ("1: 2\n", r"unknown monitor config key 1"),
        ("- stage\n- sft\n", r"a monitor config must be a mapping, got list"),
        ("topomon: 5\n", r"a monitor config must be a mapping, got int"),
        ("stage: sft\nlayers: [0,\n", r"(?s)not valid YAML.*line 3"),
        ("stage: 2020-01-01\n", r"`stage` must be a string, got datetime.date"),
        ("max_points: 1e3\n", r"`max_points` must be an int >= 3, got '1e3'"),
        ("steps: 5\nschedule: steps\n", r"`steps` must be a list of non-negative ints, got 5"),
        ("webhook_url: ftp://u:hunter2@example.com/x\n", r"`webhook_url` must be an http:// or https://"),
        ("[" * 5000 + "]" * 5000 + "\n", r"nested too deeply"),
        ("a: &a [*a, *a]\n", r"unknown monitor config key 'a'"),
        ("stage: !!python/name:os.system\n", r"not valid YAML"),
    ],
)
def test_bad_yaml_is_a_config_error(tmp_path, text, match):
    path = tmp_path / "monitor.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=match) as err:
        TopoMonitor.from_yaml(path)
    assert "hunter2" not in str(err.value)  # a credential in a bad URL is never echoed


def test_a_yaml_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "monitor.yaml"
    path.write_bytes(b"stage: \xff\xfe\n")
    with pytest.raises(ConfigError):
        MonitorConfig.from_yaml(path)


# --------------------------------------------------------------------------- probe files
@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        (
            "p.txt",
            b"first\n\n\n" + b"x" * (MAX_TEXT_CHARS + 1) + b"\n",
            r"p\.txt line 4 is 100001 characters long",
        ),
        (
            "p.jsonl",
            b'{"text": "ok"}\n' + b"[" * 100_000 + b"\n",
            r"p\.jsonl line 2: malformed JSON \(nested too deeply\)",
        ),
        ("p.jsonl", b'{"text": "ok"}\n{"text": "a\\ud800b"}\n', r"line 2 is not valid Unicode"),
        ("p.txt", b"\n  \n\t\n", r"holds no texts"),
        ("p.jsonl", b'{"text": "ok"}\n[1, 2]\n', r"line 2: expected an object or a string, got list"),
        ("p.jsonl", b'{"text": "ok"}\n{"text": null}\n', r"line 2 must be a string, got NoneType"),
    ],
)
def test_more_bad_probe_files_name_the_line(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ProbeError, match=match):
        load_probes(path)
    with pytest.raises(ProbeError, match=match):
        TopoMonitor(probes=str(path))  # at construction, long before the first step


def test_unreadable_probe_and_config_paths_are_clear_errors(tmp_path):
    with pytest.raises(ProbeError, match="is a folder"):
        TopoMonitor(probes=str(tmp_path))
    with pytest.raises(ProbeError, match="not found"):
        TopoMonitor(probes=str(tmp_path / "nope.jsonl"))
    for bad in ("a\x00b.jsonl", "x" * 5000):  # a NUL byte, a name too long for the file system
        with pytest.raises(ProbeError, match="cannot read the probe file"):
            load_probes(bad)
        with pytest.raises(ConfigError, match="cannot read the monitor config file"):
            MonitorConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="cannot read the monitor config file"):
        MonitorConfig.from_yaml(tmp_path)
    with pytest.raises(ConfigError, match="must be a str or os.PathLike"):
        MonitorConfig.from_yaml(3)  # type: ignore[arg-type]  # never a file descriptor


# --------------------------------------------------------------------------- fuzzing
json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(sorted(FIELDS)) | st.text(max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, json_like, max_size=4))
def test_fuzz_config_from_dict_raises_only_config_errors(data):
    try:
        cfg = MonitorConfig.from_dict(data)
    except ConfigError:
        return
    assert isinstance(cfg, MonitorConfig)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_fuzz_config_from_yaml_bytes_raises_only_config_errors(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("y") / "m.yaml"
    path.write_bytes(raw)
    try:
        MonitorConfig.from_yaml(path)
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, json_like, max_size=4), st.booleans())
def test_fuzz_config_from_yaml_documents_raises_only_config_errors(tmp_path_factory, data, nested):
    path = tmp_path_factory.mktemp("y") / "m.yaml"
    path.write_text(yaml.safe_dump({"topomon": data} if nested else data), encoding="utf-8")
    try:
        MonitorConfig.from_yaml(path)
    except ConfigError:
        pass


def _valid_texts(texts, max_probes=None):
    assert isinstance(texts, list) and texts
    assert max_probes is None or len(texts) <= max_probes
    for t in texts:
        assert isinstance(t, str) and t.strip() and len(t) <= MAX_TEXT_CHARS
        t.encode("utf-8")  # usable by a tokenizer


lines = st.one_of(
    st.builds(lambda v: json.dumps({"text": v}), json_like),
    st.builds(lambda d: json.dumps(d), st.dictionaries(st.text(max_size=6), json_like, max_size=3)),
    st.builds(json.dumps, json_like),
    st.text(max_size=40),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.lists(lines, max_size=6).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
    ),
    st.sampled_from([".jsonl", ".txt", ".json"]),
    st.none() | st.integers(1, 5),
)
def test_fuzz_probe_files_raise_only_probe_errors(tmp_path_factory, raw, ext, max_probes):
    path = tmp_path_factory.mktemp("p") / f"probes{ext}"
    path.write_bytes(raw)
    try:
        texts = load_probes(path, max_probes=max_probes)
    except ProbeError:
        return
    _valid_texts(texts, max_probes)


@settings(max_examples=200, deadline=None)
@given(json_like | st.lists(json_like, max_size=5))
def test_fuzz_probe_objects_raise_only_probe_errors(spec):
    """Any object as ``probes`` (a str is a path: random ones hold NUL bytes, are too long, ...)."""
    try:
        texts = load_probes(spec)
    except ProbeError:
        return
    _valid_texts(texts)
