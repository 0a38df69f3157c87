"""The monitor under several processes: sharding helpers (fast) and real 2-process runs (slow).

The slow tests launch ``torchrun --standalone --nproc_per_node 2`` (gloo on CPU) on
``tests/integrations/dist_train.py`` and compare with ``python dist_train.py`` (one process, the same
global batch, probe set and seed). Every launch has a subprocess timeout: a hang fails the test.
"""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import TrainerControl

from tests.integrations.dist_train import comm_check, fsdp_check
from topomon.capture.layers import decoder_layers
from topomon.capture.probe import ProbeCapture, plan_tokens
from topomon.distributed import (
    TIMEOUT_ENV,
    Comm,
    merge_passive,
    merge_shards,
    shard_slots,
)
from topomon.interventions.actions import Action
from topomon.testing import sample_texts, tiny_causal_lm
from topomon.types import Snapshot

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "integrations" / "dist_train.py"
LIT_SCRIPT = ROOT / "tests" / "integrations" / "lit_ddp.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


# ---------------------------------------------------------------- sharding: pure helpers
@given(n=st.integers(0, 60), world=st.integers(1, 7))
def test_shards_cover_every_item_once_with_equal_slot_counts(n, world):
    shards = [shard_slots(n, r, world) for r in range(world)]
    assert {len(s) for s in shards} == {math.ceil(n / world)}  # same number of forwards on every rank
    items = sorted(i for s in shards for i in s if i is not None)
    assert items == list(range(n))
    for r, s in enumerate(shards):
        real = [i for i in s if i is not None]
        assert real == sorted(real) and all(i % world == r for i in real)
        assert all(i is None for i in s[len(real) :])  # padding only at the end


@given(items=st.lists(st.integers(), max_size=40), world=st.integers(1, 6))
def test_merge_shards_restores_item_order(items, world):
    n = len(items)
    shards = [[items[i] if i is not None else "pad" for i in shard_slots(n, r, world)] for r in range(world)]
    assert merge_shards(shards, n) == items


def test_shard_helpers_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        shard_slots(5, 2, 2)
    with pytest.raises(ValueError, match=r"world must be an int >= 1, got 0"):
        shard_slots(5, 0, 0)
    with pytest.raises(ValueError, match=r"n_items must be an int >= 0, got -1"):
        shard_slots(-1, 0, 1)
    with pytest.raises(ValueError, match=r"shards\[1\] must hold 2 results"):
        merge_shards([["a", "c"], ["b"]], 4)


def test_comm_is_a_no_op_in_one_process(monkeypatch):
    comm = Comm()
    assert (comm.rank, comm.world, comm.is_main) == (0, 1, True)
    assert comm.gather({"x": 1}) == [{"x": 1}]
    assert comm.all_gather(3) == [3]
    assert comm.broadcast("a") == "a"
    assert comm.broadcast_int(5) == 5
    assert comm.broken is None
    with pytest.raises(ValueError, match=r"timeout must be a finite number of seconds > 0, got 0"):
        Comm(timeout=0)
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=r"TOPOMON_DIST_TIMEOUT must be a number of seconds, got 'soon'"):
        Comm()
    monkeypatch.setenv(TIMEOUT_ENV, "7.5")
    assert Comm().timeout == 7.5


def _snap(step, rows, d=3, offset=0.0):
    x = (np.arange(rows * d, dtype=np.float32).reshape(rows, d) + offset).astype(np.float32)
    return Snapshot(step=step, stage="sft", layers={"a": x, "b": -x}, meta={"capture_seconds": offset})


def test_merge_passive_concatenates_in_rank_order_and_caps_points():
    s0, s1 = _snap(4, 5), _snap(4, 3, offset=100.0)
    merged = merge_passive([s0, None, s1], max_points=100, seed=1)
    assert merged is not None
    np.testing.assert_array_equal(merged.layers["a"], np.concatenate([s0.layers["a"], s1.layers["a"]]))
    np.testing.assert_array_equal(merged.layers["b"], -merged.layers["a"])
    assert merged.meta["n_points"] == 8 and merged.meta["ranks"] == 2
    assert merged.meta["capture_seconds"] == 100.0
    capped = merge_passive([s0, s1], max_points=6, seed=1)
    assert capped is not None and capped.layers["a"].shape == (6, 3)
    full = merged.layers["a"]
    rows = [int(np.flatnonzero((full == r).all(axis=1))[0]) for r in capped.layers["a"]]
    assert rows == sorted(set(rows))  # distinct rows, in rank order
    # layers keep the same tokens (a token is one row index in every layer)
    np.testing.assert_array_equal(capped.layers["b"], -capped.layers["a"])
    assert merge_passive([None, None], max_points=6, seed=1) is None
    # every rank's per-token logit statistics, in rank order (not subsampled: the model-level metrics)
    s0.extras["logits/nll"] = np.array([1.0, 2.0], np.float32)
    s1.extras["logits/nll"] = np.array([3.0], np.float32)
    np.testing.assert_array_equal(
        merge_passive([s1, s0], max_points=6, seed=1).extras["logits/nll"], [3, 1, 2]
    )
    with pytest.raises(ValueError, match=r"one step and stage"):
        merge_passive([s0, _snap(5, 2)], max_points=6, seed=1)


def test_actions_travel_as_plain_dicts_and_apply_on_another_rank():
    decided = [
        Action(step=3, kind="diversity", params={"weight": 0.1}, cause={"rule": "r"}, spec="diversity:r"),
        Action(step=3, kind="replay", params={"ratio": 0.25}, cause={"rule": "r"}),
        Action(step=3, kind="checkpoint", params={}, cause={"rule": "r"}),
        Action(step=3, kind="stop", params={}, cause={"rule": "r"}),
    ]
    wire = json.loads(json.dumps([a.to_dict() for a in decided]))  # JSON-able
    assert [Action.from_dict(d) for d in wire] == decided


# ---------------------------------------------------------------- sharded probe capture, in process
@pytest.mark.parametrize("pooling", ["all", "last", "mean"])
def test_sharded_probe_capture_reassembles_the_one_process_snapshot(tok, pooling):
    model = tiny_causal_lm("llama", num_layers=3, hidden_size=32, seed=1)
    # 11 texts in batches of 3: 4 batches, so 3 ranks get 2, 1 and 1 real batches
    plan = plan_tokens(
        tok,
        sample_texts(11, seed=2),
        max_length=24,
        batch_size=3,
        pooling=pooling,
        max_points=40,
        exclude_first=True,
        seed=0,
    )
    probe = ProbeCapture(plan, [0, 2], logits=True)
    one = probe.capture(model, 5, "sft")
    assert one.extras  # next-token statistics travel per batch too
    calls = []
    decoder_layers(model)[0].register_forward_hook(lambda *_: calls.append(1))
    for world in (2, 3, 5):
        parts, forwards = [], []
        for r in range(world):
            n0 = len(calls)
            parts.append(
                probe.capture_batches(model, shard_slots(len(plan.batches), r, world), lockstep=True)
            )
            forwards.append(len(calls) - n0)
        assert forwards == [math.ceil(len(plan.batches) / world)] * world  # lockstep: equal forwards
        merged = probe.snapshot(merge_shards(parts, len(plan.batches)), list(one.layers), 5, "sft")
        assert list(merged.layers) == list(one.layers)
        for name in one.layers:
            assert one.layers[name].shape[0] == plan.n_points
            np.testing.assert_array_equal(merged.layers[name], one.layers[name])
        assert sorted(merged.extras) == sorted(one.extras)
        for key in one.extras:
            np.testing.assert_array_equal(merged.extras[key], one.extras[key])
    assert model.training  # train mode restored


# ---------------------------------------------------------------- the monitor's protocol, one rank at a time
class FakeComm:
    """Plays one rank of a 2-process group: records this rank's collective calls, answers from a script."""

    def __init__(self, rank, answers):
        self.rank, self.world, self.broken = rank, 2, None
        self.answers, self.calls = answers, []

    @property
    def is_main(self):
        return self.rank == 0

    def _answer(self, what, obj):
        self.calls.append(what)
        return self.answers[what](obj) if what in self.answers else obj

    def broadcast(self, obj, src=0):
        return self._answer("broadcast", obj)

    def broadcast_int(self, value, src=0):
        return self._answer("broadcast_int", value)

    def gather(self, obj, dst=0):
        self.sent = obj
        got = self._answer("gather", obj)
        return got if self.is_main else None

    def all_gather(self, obj):
        return self._answer("all_gather", obj)

    def close(self):
        self.closed = True


@pytest.fixture
def two_ranks(monkeypatch):
    import topomon.session as session

    def use(comm):
        monkeypatch.setattr(session, "Comm", lambda: comm)
        return comm

    return use


def _begin(mon, tmp_path, model=None):
    from transformers import TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    mon.on_train_begin(args, TrainerState(), TrainerControl(), model=model)


def test_a_set_up_error_on_the_main_process_is_raised_on_every_rank(two_ranks, tmp_path):
    from topomon import TopoMonitor
    from topomon.config import ConfigError

    # rank 1: the main process broadcast its error; rank 1 skips its own set-up, still all-gathers, raises
    error = "ConfigError: the run directory /r was started with another probe set"
    comm = two_ranks(
        FakeComm(1, {"broadcast": lambda _: {"error": error}, "all_gather": lambda mine: [error, mine]})
    )
    with pytest.raises(ConfigError, match=r"could not start on rank 0: ConfigError: the run directory"):
        _begin(TopoMonitor(worker="sync"), tmp_path)
    assert comm.calls == ["broadcast", "all_gather"]

    # rank 0: its own error is raised after the same two collectives
    comm = two_ranks(FakeComm(0, {"all_gather": lambda mine: [mine, None]}))
    with pytest.raises(ConfigError, match=r"topomon needs the model"):
        _begin(TopoMonitor(worker="sync"), tmp_path, model=None)
    assert comm.calls == ["broadcast", "all_gather"]


def test_a_rank_whose_capture_fails_still_gathers_its_error(two_ranks, tmp_path, tok, monkeypatch):
    from topomon import TopoMonitor

    opts = dict(max_length=16, batch_size=2, pooling="last", max_points=8, exclude_first=True, seed=0)
    plan = plan_tokens(tok, sample_texts(5), **opts)

    class Broken(ProbeCapture):
        def capture_batches(self, model, indices, *, lockstep=False):
            raise RuntimeError("out of memory")

    shared = {"error": None, "plan": plan, "needs": (), "step_offset": 0, "done": [], "resumed": {}}
    shared["stage"] = "train"
    shared["run_path"] = str(tmp_path)
    comm = two_ranks(FakeComm(1, {"broadcast": lambda _: shared, "all_gather": lambda mine: [None, mine]}))
    monkeypatch.setattr(ProbeCapture, "capture_batches", Broken.capture_batches)
    mon = TopoMonitor(worker="sync", layers=[0])
    _begin(mon, tmp_path, model=tiny_causal_lm("llama"))
    assert comm.calls == ["broadcast", "all_gather", "gather"]
    assert comm.sent == {"error": "rank 1: RuntimeError: out of memory"}  # reported by the main process
    assert mon.session.started and mon.captures == [] and mon.run is None  # rank 1 writes nothing
    assert mon.errors == 0  # nothing raised on this rank


def test_the_main_process_reports_a_rank_failure_and_makes_the_next_collective(two_ranks, tmp_path, tok):
    from transformers import TrainerState

    from topomon import TopoMonitor

    failed = {"error": "rank 1: RuntimeError: out of memory"}
    answers = {"all_gather": lambda mine: [mine, None], "gather": lambda mine: [mine, failed]}
    comm = two_ranks(FakeComm(0, answers))
    mon = TopoMonitor(
        worker="sync", schedule="every", every_n_steps=1, actions=[{"kind": "checkpoint"}], tokenizer=tok
    )
    model = tiny_causal_lm("llama")
    _begin(mon, tmp_path, model=model)
    assert comm.calls == ["broadcast", "all_gather", "gather"]  # set-up, then the baseline capture
    assert mon.errors == 1 and "rank 1: RuntimeError: out of memory" in mon.last_error
    state = TrainerState()
    state.global_step = 1
    mon.on_step_end(None, state, TrainerControl(), model=model)
    assert comm.calls[3:] == ["gather", "broadcast_int"]  # the capture failed again; the actions still cross
    assert mon.errors == 2 and mon.captures == []
    mon.close()


def test_actions_decided_on_the_main_process_are_applied_on_another_rank(two_ranks):
    from topomon import TopoMonitor

    mon = TopoMonitor(worker="sync", actions=[{"kind": "checkpoint"}, {"kind": "stop"}])
    stop = Action(step=3, kind="stop", params={}, cause={"rule": "always"}, spec="stop:*")
    payload = mon.interventions.decisions([stop])  # what the main process broadcasts
    session = mon.session
    session.comm = FakeComm(1, {"broadcast_int": lambda _: 1, "broadcast": lambda _: payload})
    control = TrainerControl()
    assert session._act(control, 3) == [stop]
    assert control.should_training_stop and not control.should_save
    assert mon.actions == [stop] and session.comm.calls == ["broadcast_int", "broadcast"]
    # no new action on the main process: one integer crosses, nothing else
    session.comm = FakeComm(1, {"broadcast_int": lambda _: 0})
    session._act(TrainerControl(), 4)
    assert session.comm.calls == ["broadcast_int"]


# ---------------------------------------------------------------- two real processes (slow)
def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env.pop(TIMEOUT_ENV, None)
    return env


def _excerpt(stderr):
    """The first Python traceback or fatal error of a failed launch, and the launcher's summary."""
    marks = [i for i in (stderr.find("Traceback"), stderr.find("Fatal Python error")) if i >= 0]
    head = stderr[min(marks) : min(marks) + 4000] if marks else ""
    return f"{head}\n...\n{stderr[-2000:]}"


def _launch(args, out, processes, timeout=150, script=SCRIPT):
    out.mkdir(parents=True, exist_ok=True)
    if processes == 1:
        cmd = [sys.executable, str(script), str(out), *args]
    else:
        cmd = [
            str(TORCHRUN),
            "--standalone",
            "--nproc_per_node",
            str(processes),
            str(script),
            str(out),
            *args,
        ]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        pytest.fail(f"{' '.join(cmd[:4])} did not finish within {timeout}s (a hang): {_excerpt(err)}")
    (out / "launch.log").write_text(proc.stdout + proc.stderr)  # for a failure's post-mortem
    assert proc.returncode == 0, _excerpt(proc.stderr)
    return proc, time.monotonic() - t0


def _metrics(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in lines if r["kind"] == "metrics"], [r for r in lines if r["kind"] == "health"]


def _marker(out, rank):
    return json.loads((out / f"marker_rank{rank}.json").read_text())


# a rule that fires at the baseline and a checkpoint action: saving under DDP / FSDP needs every rank
COMMON = ["--actions", json.dumps([{"kind": "checkpoint"}]), "--max-steps", "6", "--every", "2"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, the global batch of two processes of 4 each."""
    out = tmp_path_factory.mktemp("one")
    _launch([*COMMON, "--batch", "8"], out, 1)
    return _metrics(out / "topomon")[0]


def _assert_same_metrics(two, one):
    keys = [(r["stage"], r["step"], r["layer"]) for r in two]
    assert sorted(keys) == sorted((r["stage"], r["step"], r["layer"]) for r in one)
    assert {s for _, s, _ in keys} == {0, 2, 4, 6}
    by_key = {(r["stage"], r["step"], r["layer"]): r["metrics"] for r in one}
    compared = 0
    for r in two:
        ref = by_key[(r["stage"], r["step"], r["layer"])]
        assert set(r["metrics"]) == set(ref)
        for name, value in r["metrics"].items():
            if r["step"] == 0:  # the untrained model: bit-identical points
                assert value == ref[name], (r["layer"], name)
            elif value is None or ref[name] is None:
                assert value == ref[name], (r["step"], r["layer"], name)
            else:  # after training: the gradient all-reduce sums in another order (float rounding)
                assert math.isclose(value, ref[name], rel_tol=1e-4, abs_tol=1e-6), (r["layer"], name)
                compared += 1
    assert compared > 50
    assert any(r["metrics"].get("n_points") == 256 for r in two)


def _assert_checkpoint_on_both_ranks(out):
    markers = [_marker(out, r) for r in (0, 1)]
    assert [(m["main"], m["writer"], m["errors"]) for m in markers] == [(True, True, 0), (False, False, 0)]
    for m in markers:  # the alert at the baseline: decided on rank 0 at step 1, taken on both ranks
        first = m["steps"][0]
        assert (first["step"], first["should_save"], first["actions"]) == (1, True, ["checkpoint"])
        assert m["saves"] == [1] and m["global_step"] == 6
    assert (out / "checkpoint-1").is_dir()
    alerts = [json.loads(x) for x in (out / "topomon" / "alerts.jsonl").read_text().splitlines()]
    assert [a["kind"] for a in alerts] == ["alert", "action"]
    return markers


@pytest.mark.slow
def test_two_processes_give_the_one_process_metrics_and_act_alike(tmp_path, one_process):
    _launch([*COMMON, "--batch", "4"], tmp_path / "two", 2)
    two, health = _metrics(tmp_path / "two" / "topomon")

    # one process wrote: every (stage, step, layer) once, one event file, one health line
    keys = [(r["stage"], r["step"], r["layer"]) for r in two]
    assert len(keys) == len(set(keys))
    assert len(health) == 1
    assert len(list((tmp_path / "two" / "topomon" / "tensorboard" / "sft").glob("events.out.tfevents*"))) == 1
    _assert_same_metrics(two, one_process)
    _assert_checkpoint_on_both_ranks(tmp_path / "two")


@pytest.mark.slow
def test_a_dying_worker_does_not_hang_two_processes_and_actions_reach_both(tmp_path):
    out = tmp_path / "run"
    actions = json.dumps([{"kind": "diversity", "value": 0.1}, {"kind": "checkpoint"}])
    args = [
        "--mode",
        "passive",
        "--worker",
        "process",
        "--actions",
        actions,
        "--every",
        "1",
        "--max-steps",
        "8",
    ]
    _, seconds = _launch([*args, "--batch", "4", "--kill-worker"], out, 2, timeout=180)
    recs, health = _metrics(out / "topomon")
    markers = [_marker(out, r) for r in (0, 1)]
    # the step-1 capture holds every token both ranks captured (max_points is above their sum)
    shares = [{s["step"]: s["passive_points"] for s in m["steps"]}[1] for m in markers]
    first = [r for r in recs if r["step"] == 1]
    assert all(shares) and first
    assert all(r["metrics"]["n_points"] == sum(shares) for r in first if r["layer"] != "model")
    # the alert on step 1 acted at step 2 on both ranks: regulariser on, checkpoint saved by both
    for m in markers:
        assert m["global_step"] == 8
        by_step = {s["step"]: s for s in m["steps"]}
        assert by_step[1]["diversity_weight"] == 0.0 and not by_step[1]["should_save"]
        assert by_step[2]["should_save"] and by_step[2]["actions"] == ["diversity", "checkpoint"]
        assert all(by_step[s]["diversity_weight"] == 0.1 for s in range(2, 9))
        assert m["saves"] == [2] and m["diversity_applied"] > 0
    # the worker died on every capture after the flag; the job went on and finished
    assert (out / "die.flag").exists()
    assert health and health[-1]["restarts"] + health[-1]["lost"] >= 1
    assert {r["step"] for r in recs} == {1}  # nothing computed once the worker kept dying
    assert seconds < 180


def _spawn_two(target, store, seconds=180):
    """Run ``target(rank, store, queue)`` in two spawned processes (a file store: no port to race for)."""
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, str(store), q)) for r in (0, 1)]
    for p in procs:
        p.start()
    results: dict = {}
    deadline = time.monotonic() + seconds
    try:
        while len(results) < len(procs):
            try:
                rank, value = q.get(timeout=1.0)
                results[rank] = value
            except queue.Empty:
                dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                assert not dead, f"a spawned rank died before reporting: (rank, exit code) {dead}"
                assert time.monotonic() < deadline, (
                    f"no result from ranks {sorted(set((0, 1)) - set(results))} in 180 s"
                )
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    return results


@pytest.mark.slow
def test_comm_gathers_in_rank_order_and_times_out_instead_of_hanging(tmp_path):
    results = _spawn_two(comm_check, tmp_path / "store", seconds=45)
    assert results[0]["gathered"] == [{"rank": 0}, {"rank": 1}] and results[1]["gathered"] is None
    assert results[0]["broadcast"] == results[1]["broadcast"] == "from 0"
    assert results[0]["flag"] == results[1]["flag"] == 7
    assert "gather" in results[0]["error"] and results[0]["waited"] < 30
    assert "off since an earlier failure" in results[0]["after"]


@pytest.mark.slow
def test_fully_sharded_probe_capture_matches_the_unsharded_model(tmp_path):
    """FSDP2 on CPU: the probe forwards go through the sharded root, in lockstep on both ranks."""
    results = _spawn_two(fsdp_check, tmp_path / "store")
    assert {r["param_class"] for r in results.values()} == {"DTensor"}  # really sharded
    assert all(r["model_class"].startswith("FSDP") for r in results.values())
    n = results[0]["n_batches"]
    assert [results[r]["forwards"] for r in (0, 1)] == [math.ceil(n / 2)] * 2
    assert all(a == b and a[0] > 0 for a, b in results[0]["shapes"].values())
    assert results[0]["max_diff"] == {name: 0.0 for name in results[0]["shapes"]}
    assert results[0]["extras"] and results[0]["extras_close"]  # logit statistics from the sharded root


# ---------------------------------------------------------------- Lightning's DDP strategy (slow)
@pytest.mark.slow
def test_lightning_ddp_gives_the_one_process_metrics_and_acts_on_both_ranks(tmp_path):
    pytest.importorskip("lightning")
    checkpoint = ["--actions", json.dumps([{"kind": "checkpoint"}])]
    _launch([*checkpoint, "--batch", "8"], tmp_path / "one", 1, script=LIT_SCRIPT)
    _launch([*checkpoint, "--batch", "4"], tmp_path / "two", 2, script=LIT_SCRIPT)
    one = _metrics(tmp_path / "one" / "topomon")[0]
    two, health = _metrics(tmp_path / "two" / "topomon")
    keys = [(r["stage"], r["step"], r["layer"]) for r in two]
    assert len(keys) == len(set(keys)) and len(health) == 1  # one process wrote, once
    _assert_same_metrics(two, one)
    markers = [_marker(tmp_path / "two", r) for r in (0, 1)]
    assert [(m["rank"], m["world"], m["main"], m["errors"]) for m in markers] == [
        (0, 2, True, 0),
        (1, 2, False, 0),
    ]
    for m in markers:  # decided on rank 0 at the baseline alert, taken by both ranks' Trainer at step 1
        assert m["actions"] == [[1, "checkpoint"]] and m["checkpoints"] == ["topomon-step=1.ckpt"]
        assert m["global_step"] == 6
    assert (tmp_path / "two" / "checkpoints" / "topomon-step=1.ckpt").is_file()

    # a stop action ends the fit on both ranks at the same step (no rank left waiting in a collective)
    _launch(
        ["--actions", json.dumps([{"kind": "stop"}]), "--batch", "4"], tmp_path / "stop", 2, script=LIT_SCRIPT
    )
    stopped = [_marker(tmp_path / "stop", r) for r in (0, 1)]
    assert [(m["global_step"], m["actions"]) for m in stopped] == [(1, [[1, "stop"]])] * 2
    final = [
        (r["stage"], r["step"])
        for r in _metrics(tmp_path / "stop" / "topomon")[0]
        if r["layer"] == "final_norm"
    ]
    assert final == [("base", 0), ("train", 0), ("train", 1)]  # the final capture is of the stopped model
