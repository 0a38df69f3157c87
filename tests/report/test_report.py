"""The offline HTML report, built from a synthetic run directory written with topomon's own code."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import topomon
from topomon.report.html import build_report
from topomon.report.load import layer_sort_key, load_run
from topomon.report.plots import relative_to_base
from topomon.sinks.jsonl import JsonlWriter
from topomon.types import Alert, Snapshot
from topomon.worker.engine import ComputeOptions, MetricEngine

LAYERS = ["layer_0", "layer_1", "layer_2", "layer_3", "final_norm"]
OWN_STEPS = [0, 1, 2, 4, 8]
# name, step offset, compression added per own step (the narrow stage collapses fast)
STAGES = [("sft", 0, 0.005), ("dpo", 8, 0.01), ("narrow", 16, 0.08)]
EVIL = "<script>alert('x')</script> rankme fell & broke"
N, D = 96, 24


def _cloud(
    rng_latent: np.ndarray, rot: np.ndarray, compression: float, depth: float, seed: int
) -> np.ndarray:
    """Fixed probe points whose spectrum decays faster as ``compression * depth`` grows (rank loss)."""
    scales = np.exp(-compression * depth * np.arange(D))
    noise = np.random.default_rng(seed).normal(scale=0.01, size=(N, D))
    return ((rng_latent * scales + noise) @ rot).astype(np.float32)


def _write_run(root: Path) -> None:
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(N, D))
    rots = {ly: np.linalg.qr(rng.normal(size=(D, D)))[0] for ly in LAYERS}
    depth = {ly: (i + 1) / len(LAYERS) for i, ly in enumerate(LAYERS)}
    metrics = JsonlWriter(root / "metrics.jsonl", fsync=False)
    (root / "diagrams").mkdir(parents=True)
    opts = ComputeOptions(topology_points=64, pca_dim=None, trajectory=False)

    def capture(engine: MetricEngine, step: int, stage: str, comp: float, figures: bool) -> None:
        layers = {ly: _cloud(latent, rots[ly], comp, depth[ly], seed=step * 7 + len(stage)) for ly in LAYERS}
        records = engine.process(Snapshot(step, stage, layers, meta={"figures": figures}))
        metrics.write(r.to_json() for r in records)
        for r in records:
            if figures and r.layer == "final_norm":
                np.savez(
                    root / "diagrams" / f"{stage}__{step}__{r.layer}.npz",
                    h0=r.arrays["dgm_h0"], h1=r.arrays["dgm_h1"], eigenspectrum=r.arrays["eigenspectrum"],
                )  # fmt: skip

    capture(MetricEngine(opts), 0, "base", 0.0, True)
    comp = 0.0
    # as a real run writes it: the base model's baseline only in the records, a version per stage
    stages_json: list[dict] = []
    for name, offset, rate in STAGES:
        engine = MetricEngine(opts)
        start = comp
        for own in OWN_STEPS:
            comp = start + rate * own
            capture(engine, offset + own, name, comp, own in (0, OWN_STEPS[-1]))
        stages_json.append(
            {"name": name, "step_offset": offset, "last_step": offset + 8, "topomon_version": "0.1.0"}
        )
        metrics.write([{"kind": "health", "stage": name, "time": 1.0, "captures": 5.0, "dropped": 0.0,
                        "lost": 1.0 if name == "narrow" else 0.0, "monitor_errors": 0.0}])  # fmt: skip
    metrics.close()
    alerts = JsonlWriter(root / "alerts.jsonl", fsync=False)
    alert = Alert(20, "narrow", "drop:rankme@final_norm", "rankme", "final_norm", 10.0, 15.0, "drop", EVIL)
    alerts.write([alert.to_json()])
    alerts.write([
        {"kind": "action", "step": 20, "stage": "narrow", "action": "replay", "params": {"ratio": 0.5},
         "cause": "drop:rankme@final_norm", "message": "replay mix raised", "time": 2.0},
        {"kind": "action", "action": "save_checkpoint", "step": 24, "params": {}, "revert": False,
         "spec": "s", "cause": {"rule": "drop:rankme@final_norm", "stage": "narrow", "message": "saved"}},
    ])  # fmt: skip
    alerts.close()
    info = {
        "stages": stages_json,
        "probe_plan": {"pooling": "last", "n_probes": 96, "n_points": N},
        "config": {"alpha_window": [6, 100]},
    }
    (root / "run.json").write_text(json.dumps(info))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run") / "topomon"
    root.mkdir()
    _write_run(root)
    return root


@pytest.fixture
def run_dir(pristine: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "topomon"
    shutil.copytree(pristine, dst)
    return dst


@pytest.fixture(scope="module")
def built(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    dst = tmp_path_factory.mktemp("built") / "topomon"
    shutil.copytree(pristine, dst)
    path = build_report(dst)
    return dst, Path(path).read_text(encoding="utf-8")


class _Cells(html.parser.HTMLParser):
    """Collects ``<img src>`` and the text of ``<td data-...>`` cells."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.cells: dict[tuple[str, str, str], str] = {}
        self._cur: tuple[str, str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"] or "")
        if tag == "td" and "data-col" in a:
            self._cur = (a.get("data-stage") or "", a.get("data-metric") or "", a["data-col"] or "")
            self.cells[self._cur] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cur = None

    def handle_data(self, data: str) -> None:
        if self._cur is not None:
            self.cells[self._cur] += data


def _parse(page: str) -> _Cells:
    p = _Cells()
    p.feed(page)
    return p


def _records(root: Path) -> list[dict]:
    out = []
    for line in (root / "metrics.jsonl").read_text().splitlines():
        try:
            o = json.loads(line)
        except ValueError:
            continue
        if o.get("kind") == "metrics":
            out.append(o)
    return out


def test_report_is_self_contained_with_decodable_pngs(built: tuple[Path, str]) -> None:
    import matplotlib.image

    root, page = built
    assert (root / "report.html").is_file()
    srcs = _parse(page).imgs
    # trajectories, relative, 7 heatmaps, diagrams, eigenspectra, timeline, more metrics
    assert len(srcs) == 13
    saved = {p.read_bytes() for p in (root / "report").glob("*.png")}
    assert len(saved) == 13
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert data in saved
        img = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert img.shape[0] > 200 and img.shape[1] > 300
        assert float(np.std(img[..., :3])) > 0.01  # not a blank canvas
    assert "<script" not in page.lower()  # no JavaScript, and the alert message is escaped


def test_summary_table_matches_records(built: tuple[Path, str]) -> None:
    root, page = built
    cells = _parse(page).cells
    recs = [r for r in _records(root) if r["layer"] == "final_norm"]
    for metric in ("rankme", "rankme_pca", "participation_ratio", "alpha_req", "h1_total_persistence"):
        base = next(r for r in recs if r["stage"] == "base")["metrics"][metric]
        retained = {}
        for stage in ("base", "sft", "dpo", "narrow"):
            own = sorted((r for r in recs if r["stage"] == stage), key=lambda r: r["step"])
            end, start = own[-1]["metrics"][metric], own[0]["metrics"][metric]
            shown = cells[(stage, metric, "retained")]
            assert shown.endswith("%")
            assert float(shown[:-1]) == pytest.approx(100 * end / base, abs=0.051)
            retained[stage] = 100 * end / base
            chg = cells[(stage, metric, "change")]
            if len(own) > 1:
                assert float(chg[:-1]) == pytest.approx(100 * (end - start) / abs(start), abs=0.051)
            else:
                assert chg == "—"
        if metric == "rankme":  # the synthetic narrow stage collapses: the table must show it
            assert retained["narrow"] < retained["dpo"] - 10 < retained["sft"]
    assert cells[("narrow", "", "alerts")].strip() == "1"
    assert cells[("sft", "", "alerts")].strip() == "0"
    assert "replay ×1" in cells[("narrow", "", "actions")]
    assert "save_checkpoint ×1" in cells[("narrow", "", "actions")]


def test_stage_names_alerts_and_health_appear_escaped(built: tuple[Path, str]) -> None:
    _, page = built
    for name in ("base", "sft", "dpo", "narrow"):
        assert f"<b>{name}</b>" in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; rankme fell &amp; broke" in page
    assert "drop:rankme@final_norm" in page
    assert "lost: 1" in page  # health note about a lost capture
    assert "How to read this" in page
    # other constant metrics (of families added later) may follow
    assert "Constant throughout: n_points = 96, n_outliers = 0, n_nonfinite = 0" in page


@pytest.fixture
def no_render(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip PNG rasterising (the figures are still built); rendering is checked on the shared report."""
    monkeypatch.setattr(
        "topomon.report.html._png", lambda fig: b"\x89PNG\r\n\x1a\n" + fig.get_label().encode()
    )


def test_torn_last_line_is_tolerated_and_reported(run_dir: Path, no_render: None) -> None:
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "metrics", "step": 99, "stage": "narr')
    run = load_run(run_dir)
    assert run.torn_lines["metrics.jsonl"] == 1
    assert max(c.step for c in run.captures) == 24
    page = Path(build_report(run_dir)).read_text()
    assert "1 torn or unreadable line(s) in metrics.jsonl" in page
    assert len(_parse(page).imgs) >= 10


def test_missing_optional_files_are_fine(run_dir: Path, tmp_path: Path, no_render: None) -> None:
    os.remove(run_dir / "alerts.jsonl")
    os.remove(run_dir / "run.json")
    shutil.rmtree(run_dir / "diagrams")
    run = load_run(run_dir)
    # stages and offsets inferred from the records' order
    assert [(s.name, s.step_offset, s.last_step) for s in run.stages] == [
        ("base", 0, 0), ("sft", 0, 8), ("dpo", 8, 16), ("narrow", 16, 24)
    ]  # fmt: skip
    assert run.alerts == [] and run.diagrams == []
    out = tmp_path / "elsewhere" / "r.html"
    path = build_report(run_dir, str(out), title="My <run>")
    page = Path(path).read_text()
    assert path == str(out)
    assert "<title>My &lt;run&gt;</title>" in page
    assert "No alert was raised" in page
    assert "run.json is missing" in page
    assert len(_parse(page).imgs) == 10  # no diagrams, eigenspectra or timeline


def test_empty_metrics_log_gives_a_page_without_figures(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    page = Path(build_report(tmp_path)).read_text()
    assert "no metric records" in page and _parse(page).imgs == []


def test_not_a_run_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a topomon run directory.*metrics.jsonl") as e:
        build_report(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="must be a folder"):
        load_run(tmp_path / "file.txt")
    with pytest.raises(TypeError, match="run_dir"):
        load_run(3)  # type: ignore[arg-type]


def test_actions_get_their_stage_and_cause_in_both_formats(pristine: Path) -> None:
    run = load_run(pristine)
    assert [(a["action"], a["stage"], a["cause"]) for a in run.actions] == [
        ("replay", "narrow", "drop:rankme@final_norm"),
        ("save_checkpoint", "narrow", "drop:rankme@final_norm"),
    ]
    assert run.key_layer == "final_norm"
    assert run.layers == LAYERS
    assert run.captures[0].stage == "base"  # base before sft at the shared step 0


@given(st.permutations(["embed", "layer_0", "layer_2", "layer_10", "layer_11", "final_norm", "model"]))
def test_layer_order_is_depth_order(names: list[str]) -> None:
    assert sorted(names, key=layer_sort_key) == [
        "embed", "layer_0", "layer_2", "layer_10", "layer_11", "final_norm", "model"
    ]  # fmt: skip


@settings(max_examples=50)
@given(
    arrays(np.float64, (3, 5), elements=st.floats(0.1, 1e3)),
    st.floats(0.01, 100.0),
)
def test_relative_to_base_is_scale_invariant_and_zero_at_base(x: np.ndarray, c: float) -> None:
    rel = relative_to_base(x)
    assert np.allclose(rel[:, 0], 0.0)
    assert np.allclose(relative_to_base(c * x), rel, rtol=1e-9, atol=1e-7)
    assert np.allclose(rel, 100 * (x / x[:, :1] - 1))
    assert np.isnan(relative_to_base(np.array([0.0, 1.0]))).all()


def test_random_garbage_lines_are_counted_not_raised(tmp_path: Path) -> None:
    lines = ['{"kind": "metrics", "step": 0, "stage": "s", "layer": "layer_0", "metrics": {"rankme": 2.0}}',
             "[1, 2]", "not json", '{"kind": "metrics", "step": "x", "stage": "s"}']  # fmt: skip
    random.Random(0).shuffle(lines)
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run = load_run(tmp_path)
    assert run.torn_lines["metrics.jsonl"] == 2
    assert len(run.metrics) == 1 and math.isclose(run.metrics[0]["metrics"]["rankme"], 2.0)
    assert any("without step/stage/layer/metrics" in n for n in run.notes)


def test_dollar_signs_in_names_are_literal_text_not_mathtext(tmp_path: Path) -> None:
    stage, layer = r"sft$\foo$", r"layer$\bar$"
    w = JsonlWriter(tmp_path / "metrics.jsonl", fsync=False)
    w.write(
        {"kind": "metrics", "step": s, "stage": stage, "layer": layer, "metrics": {"rankme": 10.0 - s}}
        for s in (0, 1, 2)
    )
    w.close()
    a = Alert(1, stage, r"drop$\x$", "rankme", layer, 9.0, 10.0, "drop", "m")
    (tmp_path / "alerts.jsonl").write_text(json.dumps(a.to_json()) + "\n")
    page = Path(build_report(tmp_path)).read_text()
    assert len(_parse(page).imgs) == 4  # trajectories, relative, heatmap, timeline all rendered
    assert r"<b>sft$\foo$</b>" in page
    cells = _parse(page).cells
    assert cells[(stage, "rankme", "retained")] == "80.0%"  # 8 / 10
    assert cells[(stage, "rankme", "change")] == "-20.0%"


class _Rows(html.parser.HTMLParser):
    """Cells ``[tag, text, attrs]`` per ``<tr>`` of the first ``<table class=cls>``; every ``<a href>``."""

    def __init__(self, cls: str) -> None:
        super().__init__()
        self.cls, self.rows, self.hrefs = cls, [], []
        self._in = self._done = False
        self._cell: list | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])
        if tag == "table" and a.get("class") == self.cls and not self._done:
            self._in = True
        elif self._in and tag == "tr":
            self.rows.append([])
        elif self._in and tag in ("td", "th"):
            self._cell = [tag, "", a]
            self.rows[-1].append(self._cell)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._cell = None
        if tag == "table" and self._in:
            self._in, self._done = False, True

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[1] += data


def _rows(page: str, cls: str) -> _Rows:
    p = _Rows(cls)
    p.feed(page)
    return p


def _meta(page: str, key: str) -> str:
    return next(r[1][1] for r in _rows(page, "meta").rows if r[0][1] == key)


def test_the_version_that_wrote_the_run_is_shown(built: tuple[Path, str]) -> None:
    # run.json holds the version in each stage's entry (stage.py: run.begin_stage)
    assert _meta(built[1], "topomon version").startswith("run: 0.1.0; report: ")


def test_versions_that_differ_are_shown_per_stage(run_dir: Path, no_render: None) -> None:
    info = json.loads((run_dir / "run.json").read_text())
    info["stages"][2]["topomon_version"] = "0.2.0"
    del info["stages"][1]["topomon_version"]
    (run_dir / "run.json").write_text(json.dumps(info))
    shown = _meta(Path(build_report(run_dir)).read_text(), "topomon version")
    assert shown.startswith("run: sft 0.1.0, dpo unknown, narrow 0.2.0; report: ")
    info = {"topomon_version": "0.0.9", "stages": [{"name": "sft", "step_offset": 0}]}  # an older layout
    (run_dir / "run.json").write_text(json.dumps(info))
    assert _meta(Path(build_report(run_dir)).read_text(), "topomon version").startswith("run: 0.0.9;")


def test_base_stage_comes_first_without_a_note(built: tuple[Path, str], run_dir: Path) -> None:
    root, page = built
    run = load_run(root)
    assert [s.name for s in run.stages] == ["base", "sft", "dpo", "narrow"]
    assert not any("inferred" in n for n in run.notes) and "inferred from the records" not in page
    assert [c.stage for c in run.captures[:2]] == ["base", "sft"]  # both at step 0: base first
    assert _meta(page, "stages").startswith("base (offset 0")
    # a stage that run.json does not know is still noted
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": "metrics", "step": 30, "stage": "extra", "layer": "final_norm",
                             "metrics": {"rankme": 1.0}}) + "\n")  # fmt: skip
    run = load_run(run_dir)
    assert [s.name for s in run.stages] == ["base", "sft", "dpo", "narrow", "extra"]
    assert "stages not in run.json, inferred from the records: extra." in run.notes


def test_health_table_has_counters_as_rows_and_stages_as_columns(run_dir: Path, no_render: None) -> None:
    with open(run_dir / "metrics.jsonl", "a") as fh:  # a counter the report does not know, of a sink
        fh.write(json.dumps({"kind": "health", "stage": "narrow", "sink_errors_wandb": 2.0}) + "\n")
    rows = _rows(Path(build_report(run_dir)).read_text(), "health").rows
    assert [c[1] for c in rows[0]] == ["counter", "what it counts", "sft", "dpo", "narrow", "narrow (2)"]
    assert max(len(r) for r in rows) == 6  # as wide as the stages, whatever the number of counters
    assert [r[0][1] for r in rows if len(r) == 1] == ["captures", "errors"]  # group headers
    by_counter = {r[0][1]: [c[1] for c in r[2:]] for r in rows[1:] if len(r) > 1}
    assert by_counter["lost"] == ["0", "0", "1", "—"]
    assert by_counter["captures"] == ["5", "5", "5", "—"]
    assert by_counter["sink_errors_wandb"] == ["—", "—", "—", "2"]
    # sink errors are grouped with the errors, after the group's header
    names = [r[0][1] for r in rows[1:]]
    assert names.index("errors") < names.index("sink_errors_wandb")
    assert names.index("captures") < names.index("lost") < names.index("errors")


def test_out_elsewhere_keeps_the_pngs_beside_the_html(run_dir: Path, tmp_path: Path, no_render: None) -> None:
    out = tmp_path / "elsewhere" / "r.html"
    page = Path(build_report(run_dir, str(out))).read_text()
    assert not (run_dir / "report").exists()  # nothing written into the run directory
    pngs = sorted((tmp_path / "elsewhere" / "r").glob("*.png"))
    assert len(pngs) == len(_parse(page).imgs) == 13
    hrefs = _rows(page, "none").hrefs
    assert len(hrefs) == 13 and all(not h.startswith(("/", "file:")) for h in hrefs)
    for href, src in zip(hrefs, _parse(page).imgs, strict=True):  # each figure links to its own PNG
        target = out.parent / href
        assert target.is_file()
        assert target.read_bytes() == base64.b64decode(src.split(",", 1)[1])
    # the default stays RUN_DIR/report.html with RUN_DIR/report/
    build_report(run_dir)
    assert len(list((run_dir / "report").glob("*.png"))) == 13


@pytest.mark.slow
def test_report_of_a_real_run(tmp_path: Path) -> None:
    from tests.report.tiny_run import make_tiny_run

    root = make_tiny_run(tmp_path / "out")
    page = Path(build_report(root, str(tmp_path / "r.html"))).read_text()
    assert _meta(page, "topomon version").startswith(f"run: {topomon.__version__}; ")
    assert _meta(page, "stages").startswith("base (offset 0")
    assert "inferred" not in page
    header = [c[1] for c in _rows(page, "health").rows[0]]
    assert header == ["counter", "what it counts", "sft", "narrow"]
    assert len(list((tmp_path / "r").glob("*.png"))) == len(_parse(page).imgs) > 5
    assert not (root / "report").exists()
