"""Metric families are declared once (topomon/metrics/families.py) and everything else reads them."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest

from topomon.config import ConfigError, MonitorConfig
from topomon.metrics import families as fam_mod
from topomon.metrics.families import (
    BASE_KEYS,
    MODEL_LAYER,
    NEEDS,
    FamilyComputer,
    FamilyInput,
    FamilyOutput,
    MetricFamily,
    capture_needs,
    custom_family,
    enabled_families,
    explain_unknown,
    families,
    family,
    family_of,
    metric_names,
    register_family,
    unregister_family,
)
from topomon.pipeline import compute_options, make_router
from topomon.run import RunDir
from topomon.types import Snapshot
from topomon.worker.engine import ComputeOptions, MetricEngine

PACKAGE = pathlib.Path(fam_mod.__file__).resolve().parents[1]


def cloud(n=60, d=10, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def full_snapshot(step: int) -> Snapshot:
    """Several layers (the same tokens), logit statistics and two LoRA modules' Grams and projections."""
    rng = np.random.default_rng(7)
    layers = {name: cloud(seed=i + step) for i, name in enumerate(("layer_0", "layer_1", "final_norm"))}
    extras: dict[str, np.ndarray] = {
        "logits/entropy": rng.uniform(0, 3, 40).astype(np.float32),
        "logits/top1_prob": rng.uniform(0, 1, 40).astype(np.float32),
        "logits/correct": rng.uniform(0, 1, 40) < 0.4,
        "logits/nll": rng.uniform(0, 5, 40).astype(np.float32),
    }
    for m, r in (("q", 3), ("v", 2)):
        a, b = rng.standard_normal((r, 10)), rng.standard_normal((12, r))
        extras[f"lora/{m}/gram_A"], extras[f"lora/{m}/gram_B"] = a @ a.T, b.T @ b
        extras[f"lora/{m}/scaling"] = np.array(2.0)
        u_ref, v_ref = np.eye(12)[:, :2], np.eye(10)[:, :2]  # an earlier stage's subspace
        extras[f"lora/{m}/AV_0"], extras[f"lora/{m}/BtU_0"] = a @ v_ref, b.T @ u_ref
    return Snapshot(step, "sft", layers, extras=extras, meta={"figures": False})


def test_every_produced_key_is_declared_by_exactly_one_family_and_every_declared_key_is_produced():
    opts = ComputeOptions(topology_points=40, pca_dim=None, custom_metrics={"avg": "numpy:mean"})
    on = enabled_families(opts)
    assert {f.name for f in on} == {
        "spectral",
        "topology",
        "logits",
        "trajectory",
        "lora",
        "massive",
        "custom",
    }
    engine = MetricEngine(opts)
    engine.process(full_snapshot(0))
    records = engine.process(full_snapshot(3))  # a second capture: topological activity too
    assert [r.layer for r in records] == ["layer_0", "layer_1", "final_norm", MODEL_LAYER]
    assert all(not r.errors for r in records), [r.errors for r in records]
    for r in records:
        scope = "model" if r.layer == MODEL_LAYER else "layer"
        produced = set(r.metrics) - (set(BASE_KEYS) if scope == "layer" else set())
        for key in produced:
            owners = [f.name for f in on if key in f.keys]
            assert len(owners) == 1, (r.layer, key, owners)
            assert next(f for f in on if key in f.keys).scope == scope, (r.layer, key)
        want = {k for f in on if f.scope == scope for k in f.keys}
        assert produced == want, (r.layer, sorted(want ^ produced))
        if scope == "layer":
            assert set(BASE_KEYS) <= set(r.metrics)
    # no key of one registered family is a key of another, nor a preprocessing count
    keys = [k for f in families() for k in f.keys] + list(BASE_KEYS)
    assert len(keys) == len(set(keys))
    assert capture_needs(opts) == NEEDS


def test_metric_names_and_needs_follow_the_enabled_families_only():
    off = ComputeOptions(logits=False, lora_metrics=False)
    names = metric_names(off)
    assert not [n for n in names if n in family("logits").keys or n in family("lora").keys]
    assert set(family("spectral").keys) <= set(names) and set(BASE_KEYS) <= set(names)
    assert "logits" not in capture_needs(off) and "lora_factors" not in capture_needs(off)
    assert (
        capture_needs(
            ComputeOptions(spectral=False, topology=False, trajectory=False, logits=False, lora_metrics=False)
        )
        == set()
    )
    assert set(metric_names(ComputeOptions())) == set(BASE_KEYS) | {k for f in families() for k in f.keys}
    assert explain_unknown("rankme", off) is None  # on
    assert explain_unknown("no_such_metric", off) is None  # unknown: the alert engine says so
    msg = explain_unknown("lora_overlap_prev", off)
    assert msg is not None and "'lora'" in msg and "lora_metrics=True" in msg


def test_compute_options_takes_the_switches_from_the_config_and_turns_off_what_the_capture_lacks():
    assert compute_options(MonitorConfig(), ["final_norm"], 2).logits
    assert not compute_options(MonitorConfig(logits=False), ["final_norm"], 2).logits
    assert compute_options(MonitorConfig(mode="passive"), ["final_norm"], 2).logits
    assert not compute_options(MonitorConfig(lora_metrics=False), ["final_norm"], 2).lora_metrics
    # a model without LoRA adapters: the family that needs the factors is off, decided there only
    no_lora = compute_options(MonitorConfig(), ["final_norm"], 2, unavailable=("lora_factors",))
    assert not no_lora.lora_metrics and no_lora.logits
    assert "lora_factors" not in capture_needs(no_lora)


def test_an_alert_rule_on_a_metric_of_a_disabled_family_is_a_config_error_naming_the_family(tmp_path):
    rule = {"type": "drop", "metric": "logit_entropy", "layer": "model"}
    c = MonitorConfig(alerts=[rule], tensorboard=False, run_dir=str(tmp_path))
    options = compute_options(c.replace(logits=False), ["final_norm"], 2)
    with pytest.raises(ConfigError, match=r"`alerts`.*family 'logits'.*logits=True"):
        make_router(c, RunDir(str(tmp_path)), logging_dir=None, options=options)
    # the same rule with the family on builds
    router = make_router(
        c, RunDir(str(tmp_path)), logging_dir=None, options=compute_options(c, ["final_norm"], 2)
    )
    router.close()
    # a metric nobody produces is still the alert engine's error
    c2 = MonitorConfig(alerts=[dict(rule, metric="logit_entropyy")], tensorboard=False, run_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="unknown metric"):
        make_router(c2, RunDir(str(tmp_path)), logging_dir=None, options=options)


class _Count(FamilyComputer):
    def __init__(self, options: ComputeOptions):
        self.seen = 0

    def compute(self, inp: FamilyInput) -> FamilyOutput:
        _, points = inp.layer_arrays()
        if len(points) < 10:
            raise ValueError("too few points")
        self.seen += 1
        return FamilyOutput({"count_rows": float(len(points)), "count_seen": float(self.seen)})


def test_a_registered_family_is_computed_under_its_own_guard_and_named_in_metric_names():
    toy = MetricFamily(
        name="count",
        scope="layer",
        keys=("count_rows", "count_seen"),
        needs=frozenset({"points"}),
        switch="always on",
        is_on=lambda o: True,
        start=_Count,
        higher_is_better={"count_rows": True},
    )
    register_family(toy)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_family(toy)
        assert family_of("count_seen") is toy
        opts = ComputeOptions(topology=False, trajectory=False)
        assert {"count_rows", "count_seen"} <= set(metric_names(opts))
        ok, small = MetricEngine(opts).process(Snapshot(0, "s", {"a": cloud(), "b": cloud(n=5)}))
        assert ok.metrics["count_rows"] == 60 and ok.metrics["count_seen"] == 1
        assert np.isnan(small.metrics["count_rows"]) and np.isnan(small.metrics["count_seen"])
        assert small.errors == ["count: ValueError: too few points"]
        assert np.isfinite(small.metrics["rankme"])  # the other families still land
    finally:
        unregister_family("count")
    assert family_of("count_seen") is None


def test_declarations_are_validated():
    base = dict(name="x", scope="layer", keys=("a",), needs=frozenset({"points"}), switch="", is_on=bool)
    with pytest.raises(ValueError, match="scope"):
        MetricFamily(**dict(base, scope="token"), start=_Count)
    with pytest.raises(ValueError, match="needs"):
        MetricFamily(**dict(base, needs=frozenset({"gradients"})), start=_Count)
    with pytest.raises(ValueError, match="relative"):
        MetricFamily(**base, start=_Count, relative=("b",))
    with pytest.raises(ValueError, match="already keys of family 'spectral'"):
        register_family(MetricFamily(**dict(base, keys=("rankme",)), start=_Count))
    assert custom_family({"m": "numpy:mean"}).keys == ("m",)


# -- nothing outside topomon/metrics/ names a family

REMOVED = {
    "SPECTRAL_KEYS",
    "TOPOLOGY_KEYS",
    "ACTIVITY_KEYS",
    "LOGIT_KEYS",
    "TRAJECTORY_KEYS",
    "LORA_KEYS",
    "_add_lora_factors",
}
"""Names of the old per-family constants and of the callback's family-specific gathering."""

EXTRAS_PREFIXES = ("logits/", "lora/")
"""How a capture hands logit statistics and LoRA factors to the metrics: capture/ and metrics/ only."""

SWITCH_CALLS = {"compute_options", "ComputeOptions"}
"""The calls that take family switches (``logits=``) by design."""


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for stmt in body:
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                    ids.add(id(stmt.value))
    return ids


def _call_name(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def family_mentions(path: pathlib.Path, keys: set[str], root: pathlib.Path = PACKAGE.parent) -> list[str]:
    """Where a module names a metric family: a removed constant, a list of several family keys, a
    metric value written under a family key, the capture-to-metrics extras names, a ``logits=`` switch.
    """
    rel = path.relative_to(root).as_posix()
    in_capture = rel.startswith("topomon/capture/")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = _docstrings(tree)
    out = []
    for node in ast.walk(tree):
        line = f"{rel}:{getattr(node, 'lineno', '?')}"
        name = (
            node.id
            if isinstance(node, ast.Name)
            else node.attr
            if isinstance(node, ast.Attribute)
            else node.name
            if isinstance(node, (ast.alias, ast.FunctionDef))
            else None
        )
        if name in REMOVED:
            out.append(f"{line}: names {name}")
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
            elts = node.keys if isinstance(node, ast.Dict) else node.elts
            named = [e.value for e in elts if isinstance(e, ast.Constant) and e.value in keys]
            if len(named) >= 2:
                out.append(f"{line}: lists metric keys {named}")
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
            if isinstance(node.slice, ast.Constant) and node.slice.value in keys:
                out.append(f"{line}: writes metric {node.slice.value!r}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if not in_capture and node.value.startswith(EXTRAS_PREFIXES):
                out.append(f"{line}: builds the capture's extras {node.value!r}")
        elif isinstance(node, ast.Call) and not in_capture and _call_name(node.func) not in SWITCH_CALLS:
            if any(kw.arg == "logits" for kw in node.keywords):
                out.append(f"{line}: passes a family switch logits= to {_call_name(node.func)}")
    return out


def test_no_module_outside_metrics_names_a_metric_family():
    keys = {k for f in families() for k in f.keys}
    files = [
        p
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.relative_to(PACKAGE).parts[0] != "metrics" and p.relative_to(PACKAGE).as_posix() != "testing.py"
    ]
    assert any(p.name == "engine.py" for p in files)
    found = [m for p in files for m in family_mentions(p, keys)]
    assert not found, "modules outside topomon/metrics/ name metric families:\n" + "\n".join(found)


def test_the_static_check_sees_what_the_old_code_did(tmp_path):
    old = tmp_path / "topomon" / "worker" / "old.py"
    old.parent.mkdir(parents=True)
    old.write_text(
        '"""Docstring naming ``logits/<stat>`` and ``lora/<m>/A`` is fine."""\n'
        "from topomon.worker.engine import LORA_KEYS\n"
        'RELATIVE = ("rankme", "h1_total_persistence")\n'
        "def f(metrics, snap, name, plan):\n"
        '    metrics["topo_drift"] = 0.0\n'
        '    snap.extras[f"lora/{name}/A"] = 1\n'
        "    return Capture(plan, logits=True), compute_options(plan, logits=True)\n"
        "def _add_lora_factors(snap):\n"
        '    return DropRule("rankme")\n'
    )
    found = family_mentions(old, {"rankme", "h1_total_persistence", "topo_drift"}, root=tmp_path)
    kinds = sorted(f.split(": ", 1)[1].split(" ")[0] for f in found)
    assert kinds == ["builds", "lists", "names", "names", "passes", "writes"], found


def test_a_family_named_in_families_is_on_only_for_the_options_that_name_it():
    from topomon.metrics.families import load_families

    spec = "tests.metrics.user_family:ROWS"
    try:
        (fam,) = load_families([spec])
        assert load_families([spec]) == (fam,) and family("user_rows") is fam  # registered once
        named = ComputeOptions(topology=False, families=(spec,))
        assert "user_rows" in metric_names(named)
        rec = MetricEngine(named).process(Snapshot(0, "s", {"a": cloud()}))[0]
        assert rec.metrics["user_rows"] == 60
        # a later stage of the same process that does not name it: off, and said so
        other = ComputeOptions(topology=False)
        assert "user_rows" not in metric_names(other)
        assert explain_unknown("user_rows", other) == (
            f"metric 'user_rows' belongs to the family 'user_rows', which is off: name {spec!r} in `families`"
        )
        # named, and switched off by its own option: the message names that option
        off = ComputeOptions(topology=False, families=(spec,), family_options={"user_rows": {"rows": False}})
        assert "user_rows" not in metric_names(off)
        assert explain_unknown("user_rows", off).endswith("set family_options['user_rows']['rows']=True")
    finally:
        unregister_family("user_rows")
    with pytest.raises(ValueError, match="must name a MetricFamily in module 'numpy', found nothing"):
        load_families(["numpy:NO_SUCH_FAMILY"])


# -- a family's switch and options are named once: its declaration (and the config field of that name)


def _switch_mentions(
    path: pathlib.Path, switches: set[str], root: pathlib.Path = PACKAGE.parent
) -> list[str]:
    """Where a module reads or passes a family switch: ``c.logits``, ``lora=...``, ``"lora_metrics"``."""
    rel = path.relative_to(root).as_posix()
    names = {f.name for f in families()}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = _docstrings(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in switches:
            out.append(f"{rel}:{node.lineno}: reads .{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg in switches | names:
            out.append(f"{rel}:{node.value.lineno}: passes {node.arg}=")
        elif isinstance(node, ast.Constant) and node.value in switches and id(node) not in docs:
            if node.value not in names:  # a family's name is its own word
                out.append(f"{rel}:{node.lineno}: spells {node.value!r}")
    return out


def test_a_family_switch_is_named_in_the_family_declaration_only(tmp_path):
    from topomon.config_checks import _family_switches
    from topomon.metrics.builtin_families import BUILTIN

    switches = {f.switch for f in BUILTIN if f.switch in f.options}
    assert switches == {"spectral", "topology", "logits", "trajectory", "lora_metrics"}
    assert set(_family_switches()) == switches  # the config's bool checks come from the declarations
    allowed = {"topomon/metrics/builtin_families.py"}
    # the capture's own flags are named after the need ("logits" in needs), not the switch
    found = [
        m
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.relative_to(PACKAGE.parent).as_posix() not in allowed
        and p.relative_to(PACKAGE).parts[0] != "capture"
        for m in _switch_mentions(p, switches)
    ]
    assert not found, "a family switch named outside its declaration:\n" + "\n".join(found)
    # the old code, seen: stage.py's `lora=c.lora_metrics and ...`, pipeline.py's `logits=c.logits`
    old = tmp_path / "old_stage.py"
    old.write_text("o = compute_options(c, lora=c.lora_metrics and has, logits=c.logits)\n")
    assert len(_switch_mentions(old, switches, root=tmp_path)) == 4


def test_every_config_switch_and_option_reaches_its_family_through_the_registry():
    import dataclasses

    fields = {f.name for f in dataclasses.fields(MonitorConfig)}
    for fam in families():
        for name, default in fam.options.items():
            if name in fields and name != "topology_layers":  # layers are resolved against the capture
                value = not default if isinstance(default, bool) else default
                opts = compute_options(MonitorConfig(**{name: value}), ["final_norm"], 2)
                assert opts.family_options[fam.name][name] == value, (fam.name, name)
                assert getattr(opts, name) == value
        if fam.switch in fam.options:
            off = compute_options(MonitorConfig(**{fam.switch: False}), ["final_norm"], 2)
            assert fam not in enabled_families(off)
            assert fam in enabled_families(compute_options(MonitorConfig(), ["final_norm"], 2))


def test_family_options_are_checked_against_the_declarations():
    with pytest.raises(ConfigError, match="family_options"):
        MonitorConfig(family_options={"x": 1})
    with pytest.raises(ConfigError, match="not registered"):
        compute_options(MonitorConfig(family_options={"nope": {"a": 1}}), ["final_norm"], 2)
    with pytest.raises(ConfigError, match="topomon's own family 'topology'.*topology_points"):
        compute_options(MonitorConfig(family_options={"topology": {"topology_points": 9}}), ["final_norm"], 2)
    spec = "tests.metrics.user_family:ROWS"
    try:
        with pytest.raises(ConfigError, match=r"unknown option\(s\) \['scale'\].*rows_scale"):
            compute_options(
                MonitorConfig(families=(spec,), family_options={"user_rows": {"scale": 2}}), ["final_norm"], 2
            )
        opts = compute_options(
            MonitorConfig(families=(spec,), family_options={"user_rows": {"rows_scale": 2}}),
            ["final_norm"],
            2,
        )
        assert opts.family_options["user_rows"] == {"rows": True, "rows_scale": 2}
        with pytest.raises(TypeError, match="unknown option 'no_such'"):
            ComputeOptions(no_such=1)
        with pytest.raises(ValueError, match=r"options \['topology_points'\], already options of family"):
            register_family(
                MetricFamily(
                    name="clash",
                    scope="layer",
                    keys=("clash_x",),
                    needs=frozenset({"points"}),
                    start=_Count,
                    options={"topology_points": 1},
                )
            )
        with pytest.raises(ValueError, match="`switch` of family 'bad' must name a bool"):
            MetricFamily(name="bad", scope="layer", keys=("b",), needs=frozenset(), start=_Count, switch="on")
    finally:
        unregister_family("user_rows")


def test_figure_names_and_tags_are_spelled_in_topomon_figures_only():
    from topomon.figures import FIGURES

    assert {n for f in families() for n in f.figures} == set(FIGURES)
    found = []
    for p in sorted(PACKAGE.rglob("*.py")):
        rel = p.relative_to(PACKAGE.parent).as_posix()
        if rel == "topomon/figures.py":
            continue
        tree = ast.parse(p.read_text(encoding="utf-8"))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                if node.value in FIGURES or node.value.startswith("topomon_figures"):
                    found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not found, "figure names outside topomon/figures.py:\n" + "\n".join(found)
