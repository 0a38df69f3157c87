"""examples/fidelity/claim6_rl.py: the claim-6 pipeline (GRPO vs SFT) runs end to end on a tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

FIDELITY = Path(__file__).resolve().parents[2] / "examples" / "fidelity"


@pytest.fixture
def claim6(monkeypatch):
    monkeypatch.syspath_prepend(str(FIDELITY))  # the scripts import their siblings (common, claim3)
    for name in ("claim6_rl", "claim3_entropy", "claim1_transient", "common"):
        sys.modules.pop(name, None)
    import claim6_rl

    # the scripts quiet the libraries' loggers for good (a script's process ends); here they would
    # silence the log records of every later test in this process
    monkeypatch.setattr(sys.modules["common"], "_quiet", lambda: None)
    return claim6_rl


def test_distinct_n_counts_unique_ngrams_over_all_ngrams(claim6):
    seqs = [[1, 2, 3], [1, 2, 3]]
    assert claim6.distinct_n(seqs, 1) == pytest.approx(3 / 6)
    assert claim6.distinct_n(seqs, 2) == pytest.approx(2 / 4)
    assert claim6.distinct_n([[1, 2], [3, 4]], 2) == 1.0
    train, held = claim6.prompts(0)
    assert len(held) == 64 and len(train) == 256
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}  # held-out sums never trained on


@pytest.mark.slow
def test_claim6_trains_both_methods_and_remakes_the_table_without_training(claim6, tmp_path, capsys):
    pytest.importorskip("trl")
    res = tmp_path / "results"
    argv = ["--tiny", "--seeds", "0", "1", "--results", str(res), "--work", str(tmp_path / "work")]
    summary = claim6.main(argv)
    files = sorted(p.name for p in res.glob("*-s[01].json"))
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=FIDELITY)
    assert files == [f"{m}-lr2e-04-n4-e2-s{s}.json" for m in ("grpo", "sft") for s in (0, 1)]
    for f in files:
        r = json.loads((res / f).read_text())
        method = r["spec"]["method"]
        assert r["commit"] == head.stdout.strip() and len(r["commit"]) == 40  # the code it ran
        for probes in ("pydoc", "pydoc_last"):  # captures at the start, every 2 steps and the end
            steps = [s for s, _ in r["probes"][probes][method]["final_norm"]["rankme"]]
            assert steps == [0, 2, 4], (f, probes, steps)
        assert [s for s, _ in r["probes"]["pydoc"][method]["model"]["logit_entropy"]] == [0, 2, 4]
        for when in ("start", "end"):
            ev = r["eval"][when]
            assert 0 <= ev["accuracy"] <= 1 and 0 < ev["distinct_1"] <= 1 and 0 < ev["distinct_2"] <= 1
            assert ev["first_token_entropy"] > 0 and 0 < ev["unique_share"] <= 1
        logged = "reward" if method == "grpo" else "loss"
        assert [s for s, _ in r["log"][logged]] == [1, 2, 3, 4]
        assert all(h["dropped"] == 0 for h in r["monitor_health"].values())
    # SFT on the answers moved the final-norm spectrum (the adapter trained; captures are deterministic)
    sft = summary["sft"]["change_pct"]["pydoc/rankme"]["per_seed"]
    assert all(abs(v) > 0 for v in sft)
    assert set(summary["grpo"]["change_pct"]) == set(summary["sft"]["change_pct"])
    assert (
        "seeds_as_claimed" in summary["grpo"]["eval"]["distinct_2"]["delta"]
    )  # the claim's sign, registered
    capsys.readouterr()
    again = claim6.main([*argv, "--no-train"])
    assert json.dumps(again, sort_keys=True) == json.dumps(summary, sort_keys=True)
    table = capsys.readouterr().out
    assert "| rankme_pca (pydoc x96, last token), % change |" in table
    assert (res / "claim6_rl.png").stat().st_size > 10_000 and (res / "claim6_summary.json").exists()
