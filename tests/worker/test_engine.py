import math

import numpy as np
import pytest

from topomon.metrics.families import FamilyComputer, family
from topomon.metrics.logits import logit_metrics
from topomon.metrics.lora import lora_update_subspace
from topomon.types import Snapshot
from topomon.worker.engine import ComputeOptions, MetricEngine


def cloud(n=80, d=10, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_layer_records_and_a_model_record_from_extras():
    rng = np.random.default_rng(1)
    stats = {
        "entropy": rng.uniform(0, 3, 50).astype(np.float32),
        "top1_prob": rng.uniform(0, 1, 50).astype(np.float32),
        "correct": rng.uniform(0, 1, 50) < 0.4,
        "nll": rng.uniform(0, 5, 50).astype(np.float32),
    }
    x = cloud()
    snap = Snapshot(
        3, "sft", {"layer_0": x, "final_norm": x.copy()}, extras={f"logits/{k}": v for k, v in stats.items()}
    )
    recs = MetricEngine(ComputeOptions(topology=False)).process(snap)
    assert [r.layer for r in recs] == ["layer_0", "final_norm", "model"]
    model = recs[-1].metrics
    want = logit_metrics(stats)
    assert {k: model[k] for k in want} == want
    # the same tokens at every layer: a trajectory that does not move (cosine 1, CKA 1)
    assert model["traj_cosine_mean"] == pytest.approx(1.0)
    assert model["cka_adjacent_mean"] == pytest.approx(1.0)
    assert math.isnan(model["traj_straightness_mean"])  # paths of length 0 have no straightness


def test_no_model_record_without_model_level_data():
    recs = MetricEngine(ComputeOptions(topology=False, trajectory=False)).process(
        Snapshot(0, "s", {"a": cloud()})
    )
    assert [r.layer for r in recs] == ["a"]


@pytest.mark.parametrize("trajectory", [True, False])
def test_figures_one_eigenspectra_image_per_capture_and_a_diagram_per_topology_layer(trajectory):
    layers = {"layer_0": cloud(seed=1), "layer_1": cloud(seed=2), "final_norm": cloud(seed=3)}
    opts = ComputeOptions(topology_layers=("final_norm",), trajectory=trajectory)
    recs = MetricEngine(opts).process(Snapshot(5, "sft", layers, meta={"figures": True}))
    by = {r.layer: r for r in recs}
    # the model-level record (trajectories) carries the eigenspectra figure; without one, the last layer
    assert list(by) == ["layer_0", "layer_1", "final_norm", *(["model"] if trajectory else [])]
    carrier = by["model" if trajectory else "final_norm"]
    img = carrier.arrays["figure_eigenspectra"]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.std() > 0
    assert "figure_persistence" in by["final_norm"].arrays
    assert sum("figure_eigenspectra" in r.arrays for r in recs) == 1
    assert not any(k.startswith("figure_") for ly in ("layer_0", "layer_1") for k in by[ly].arrays)
    # one line per layer: a capture of fewer layers draws a different picture
    two = {k: layers[k] for k in ("layer_0", "final_norm")}
    fewer = MetricEngine(opts).process(Snapshot(5, "sft", two, meta={"figures": True}))
    assert not np.array_equal(fewer[-1].arrays["figure_eigenspectra"], img)
    # without figures, no images
    plain = MetricEngine(opts).process(Snapshot(6, "sft", layers))
    assert [r.layer for r in plain] == list(by)
    assert not any(k.startswith("figure_") for r in plain for k in r.arrays)


def test_the_worker_thread_count_reaches_the_persistent_homology_engine(monkeypatch):
    import topomon.metrics.builtin_families as families_mod  # the topology family's module

    seen = []
    real = families_mod.topology_metrics

    def spy(x, **kw):
        seen.append(kw["n_threads"])
        return real(x, **kw)

    monkeypatch.setattr(families_mod, "topology_metrics", spy)
    MetricEngine(ComputeOptions(threads=3, trajectory=False)).process(Snapshot(0, "s", {"a": cloud()}))
    assert seen == [3]


def lora_pair(rank, out=24, inp=20, r=6, seed=0):
    rng = np.random.default_rng(seed)
    b = np.zeros((out, r))
    a = np.zeros((r, inp))
    b[:, :rank] = rng.standard_normal((out, rank))
    a[:rank] = rng.standard_normal((rank, inp))
    return a, b


def test_lora_geometry_and_overlap_with_an_earlier_stage():
    a1, b1 = lora_pair(3, seed=1)
    a2, b2 = lora_pair(2, seed=2)
    # an earlier stage whose update subspace equals module m1's current one, and one orthogonal to it
    u, v = lora_update_subspace(a1, b1, 2.0)
    u_perp = np.linalg.svd(np.eye(24) - u @ u.T)[0][:, :3]
    v_perp = np.linalg.svd(np.eye(20) - v @ v.T)[0][:, :3]
    extras = {}
    for m, a, b in (("m1", a1, b1), ("m2", a2, b2)):
        extras |= {
            f"lora/{m}/gram_A": a @ a.T,
            f"lora/{m}/gram_B": b.T @ b,
            f"lora/{m}/scaling": np.array(2.0),
        }
    extras |= {"lora/m1/AV_0": a1 @ v, "lora/m1/BtU_0": b1.T @ u}  # m2 has no reference
    opts = ComputeOptions(topology=False, trajectory=False)
    m = MetricEngine(opts).process(Snapshot(5, "dpo", {"l": cloud()}, extras=extras))[-1].metrics
    assert set(family("lora").keys) <= set(m)
    assert m["lora_modules"] == 2
    norms = [np.linalg.norm(2.0 * b @ a) for a, b in ((a1, b1), (a2, b2))]
    assert m["lora_norm_total"] == pytest.approx(float(np.sqrt(np.sum(np.square(norms)))))
    assert m["lora_norm_max"] == pytest.approx(max(norms))
    assert 1.0 < m["lora_effective_rank_mean"] <= 2.5  # ranks 3 and 2
    assert m["lora_overlap_prev"] == pytest.approx(1.0)  # only m1 has a reference, and it is identical
    # a second earlier stage, orthogonal: the mean over (module, reference) pairs
    extras |= {"lora/m1/AV_1": a1 @ v_perp, "lora/m1/BtU_1": b1.T @ u_perp}
    m = MetricEngine(opts).process(Snapshot(5, "dpo", {"l": cloud()}, extras=extras))[-1].metrics
    assert m["lora_overlap_prev"] == pytest.approx(0.5, abs=1e-9)


def test_topological_drift_is_zero_at_the_first_capture_then_the_bottleneck_to_it():
    from topomon.metrics.topology import bottleneck_distance

    engine = MetricEngine(ComputeOptions(spectral=False, trajectory=False, pca_dim=None))
    first = engine.process(Snapshot(0, "sft", {"final_norm": cloud(seed=1)}))[0]
    engine.observe([first])
    assert first.metrics["topo_drift"] == 0.0
    assert math.isnan(first.metrics["topo_activity"])
    later = engine.process(Snapshot(5, "sft", {"final_norm": cloud(seed=2)}))[0]
    want = bottleneck_distance(later.arrays["dgm_h1"], first.arrays["dgm_h1"])
    assert want > 0
    assert later.metrics["topo_drift"] == want == later.metrics["topo_activity"]


class _Counter(FamilyComputer):
    """A stateful family's computer whose state key ("seen") another family uses too."""

    def __init__(self, options):
        self.seen = 0

    def compute(self, inp):
        return None

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = int(state.get("seen", 0))


def test_engine_state_is_kept_per_family_and_a_flat_state_from_before_still_loads():
    from topomon.metrics.families import MetricFamily, register_family, unregister_family

    opts = ComputeOptions(spectral=False, trajectory=False, pca_dim=None)
    engine = MetricEngine(opts)
    engine.process(Snapshot(0, "sft", {"final_norm": cloud(seed=1)}))
    state = engine.state_dict()
    assert list(state) == ["topology"] and set(state["topology"]) == {"prev", "first"}
    # a checkpoint written before the state was namespaced: the topology keys at the top level
    old = MetricEngine(opts)
    old.load_state_dict(state["topology"])
    assert old.state_dict() == state
    fresh = MetricEngine(opts)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    later = Snapshot(4, "sft", {"final_norm": cloud(seed=2)})
    assert (
        old.process(later)[0].metrics == fresh.process(later)[0].metrics == engine.process(later)[0].metrics
    )

    # two stateful families with the same state key keep their own values
    fams = [
        MetricFamily(
            name=f"count_{i}",
            scope="model",
            keys=(f"count_{i}",),
            needs=frozenset({"points"}),
            start=_Counter,
            stateful=True,
        )
        for i in (1, 2)
    ]
    for f in fams:
        register_family(f)
    try:
        eng = MetricEngine(ComputeOptions(spectral=False, topology=False, trajectory=False))
        for n, (_, comp) in enumerate(c for c in eng._families if c[0] in fams):
            comp.seen = n + 5
        saved = eng.state_dict()
        assert saved == {"count_1": {"seen": 5}, "count_2": {"seen": 6}}
        again = MetricEngine(ComputeOptions(spectral=False, topology=False, trajectory=False))
        again.load_state_dict(saved)
        assert again.state_dict() == saved
    finally:
        for f in fams:
            unregister_family(f.name)
