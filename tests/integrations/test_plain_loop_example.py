"""examples/plain_loop.py: a plain PyTorch loop with topomon.watch, 1 process and torchrun 2 processes.

Both runs are the example's own command line (``python examples/plain_loop.py --tiny`` and
``torchrun --standalone --nproc_per_node 2 examples/plain_loop.py --tiny``, gloo on CPU); their
``metrics.jsonl`` must hold the same captures and the same numbers: the example splits one global
batch over the ranks and normalises the loss by the global token count, so the trained weights agree,
and the probe set is the same on every rank.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integrations.test_distributed import TORCHRUN, _env, _excerpt

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "plain_loop.py"
STEP_LINE = re.compile(r"^step +(\d+)/(\d+) +loss (\S+)( +captured)?$", re.M)


def _run(out: Path, processes: int, timeout: int = 240) -> str:
    out.mkdir(parents=True, exist_ok=True)
    args = [str(EXAMPLE), "--tiny", "--out", str(out)]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(processes), *args]
    try:
        proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        pytest.fail(f"{' '.join(cmd[:4])} did not finish within {timeout}s (a hang): {_excerpt(err)}")
    (out / "launch.log").write_text(proc.stdout + proc.stderr)  # for a failure's post-mortem
    assert proc.returncode == 0, _excerpt(proc.stderr)
    return proc.stdout


def _metrics(out: Path) -> dict[tuple[str, int, str], dict[str, float | None]]:
    lines = (out / "topomon" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines if x.strip()]
    return {(r["stage"], r["step"], r["layer"]): r["metrics"] for r in records if r["kind"] == "metrics"}


def _check_output(stdout: str, processes: int) -> list[tuple[int, str, bool]]:
    """The example's progress lines and summary; returns (step, printed loss, captured) per step."""
    steps = [(int(s), loss, bool(c)) for s, _, loss, c in STEP_LINE.findall(stdout)]
    assert [s for s, _, _ in steps] == list(range(1, 13)), stdout[-3000:]
    assert [s for s, _, c in steps if c] == [4, 8, 12]
    assert f"{processes} process(es)" in stdout
    assert "topomon: stage 'sft': 4 captures (steps 0-12), 0 dropped, 0 lost, 0 errors" in stdout
    table = stdout[stdout.index("final_norm at each capture") :].splitlines()
    assert [int(line.split()[0]) for line in table[2:6]] == [0, 4, 8, 12]
    return steps


def test_the_plain_loop_example_gives_the_same_numbers_on_1_and_2_processes(tmp_path):
    one_out, two_out = tmp_path / "one", tmp_path / "two"
    one = _check_output(_run(one_out, 1), 1)
    two = _check_output(_run(two_out, 2), 2)
    assert two == one  # the same losses (4 decimals) and captures, step by step

    m1, m2 = _metrics(one_out), _metrics(two_out)
    assert sorted(m2) == sorted(m1)
    assert {step for _, step, _ in m1} == {0, 4, 8, 12}
    assert {layer for _, _, layer in m1} >= {"layer_0", "layer_3", "final_norm", "model"}
    compared = 0
    for key, ref in m1.items():
        got = m2[key]
        assert set(got) == set(ref), key
        for name, value in got.items():
            if key[1] == 0 or value is None or ref[name] is None:  # the untrained model: identical points
                assert value == ref[name], (key, name)
            else:  # trained: the gradient all-reduce sums in another order (float rounding)
                assert math.isclose(value, ref[name], rel_tol=1e-4, abs_tol=1e-6), (
                    key,
                    name,
                    value,
                    ref[name],
                )
                compared += 1
    assert compared > 200
    assert m1[("sft", 12, "final_norm")]["rankme"] != m1[("sft", 0, "final_norm")]["rankme"]  # it trained
