from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from topomon.capture.logit_stats import reduce_logits, reduce_logits_from_hidden
from topomon.metrics.logits import logit_metrics

KEYS = ("entropy", "top1_prob", "correct", "nll")


def _reference(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    """Per-position loop with cross_entropy / softmax / Categorical, in float64."""
    targets = input_ids if labels is None else labels
    out: dict[str, list[float | bool]] = {k: [] for k in KEYS}
    bsz, t_len, _ = logits.shape
    for b in range(bsz):
        for t in range(t_len - 1):
            if not (mask[b, t] and mask[b, t + 1]) or int(targets[b, t + 1]) == -100:
                continue
            row = logits[b, t].double()
            tgt = targets[b, t + 1]
            probs = torch.softmax(row, -1)
            out["entropy"].append(float(torch.distributions.Categorical(logits=row).entropy()))
            out["top1_prob"].append(float(probs.max()))
            out["correct"].append(bool(int(probs.argmax()) == int(tgt)))
            out["nll"].append(float(F.cross_entropy(row[None], tgt[None].long())))
    return {k: np.asarray(v) for k, v in out.items()}


def _padded_batch(seed: int = 0, v: int = 11) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(4, 7, v, generator=g)
    input_ids = torch.randint(0, v, (4, 7), generator=g)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    mask[3, :] = 0
    mask[3, 2:4] = 1  # both sides
    input_ids[mask == 0] = v + 5  # pad id out of vocabulary: must never be used as a target
    return logits, input_ids, mask


def _assert_stats_equal(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], rtol: float = 1e-5) -> None:
    assert set(got) == set(KEYS)
    for k in ("entropy", "top1_prob", "nll"):
        assert got[k].dtype == np.float32
        np.testing.assert_allclose(got[k], ref[k], rtol=rtol, atol=1e-6)
    assert got["correct"].dtype == np.bool_
    np.testing.assert_array_equal(got["correct"], ref["correct"])


def test_reduce_logits_matches_direct_computation_with_left_and_right_padding() -> None:
    logits, input_ids, mask = _padded_batch()
    got = reduce_logits(logits, input_ids, mask)
    # counted positions: real length - 1 per row: 6 + 3 + 4 + 1
    assert got["nll"].shape == (14,)
    _assert_stats_equal(got, _reference(logits, input_ids, mask))


def test_mean_nll_equals_transformers_style_shifted_cross_entropy() -> None:
    logits, input_ids, mask = _padded_batch(seed=1)
    labels = input_ids.clone()
    labels[mask == 0] = -100
    shift_labels = labels[:, 1:].clone()
    shift_labels[mask[:, :-1] == 0] = -100  # a pad position predicts nothing
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 11), shift_labels.reshape(-1), ignore_index=-100)
    assert float(np.mean(reduce_logits(logits, input_ids, mask)["nll"])) == pytest.approx(
        float(loss), rel=1e-5
    )


def test_no_mask_means_every_position_counts() -> None:
    logits, input_ids, _ = _padded_batch(seed=2)
    input_ids = input_ids.clamp_max(10)
    got = reduce_logits(logits, input_ids)
    _assert_stats_equal(got, _reference(logits, input_ids, torch.ones(4, 7)))


def test_labels_minus_100_are_left_out() -> None:
    logits, input_ids, mask = _padded_batch(seed=3)
    labels = input_ids.clone()
    labels[:, :3] = -100  # e.g. a prompt not trained on
    got = reduce_logits(logits, input_ids, mask, labels=labels)
    _assert_stats_equal(got, _reference(logits, input_ids, mask, labels))
    assert got["nll"].shape[0] < reduce_logits(logits, input_ids, mask)["nll"].shape[0]


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 10_000])
def test_chunk_size_does_not_change_the_result(chunk_size: int) -> None:
    logits, input_ids, mask = _padded_batch(seed=4)
    ref = reduce_logits(logits, input_ids, mask, chunk_size=7)
    got = reduce_logits(logits, input_ids, mask, chunk_size=chunk_size)
    for k in KEYS:
        np.testing.assert_array_equal(got[k], ref[k])


def test_wide_logit_ranges_masked_tokens_and_many_rows_match_the_reference() -> None:
    """Logits spanning hundreds of nats (exp underflows), -inf for masked vocabulary entries, and more
    positions than one reduction block: the float64 reference's values, an exact NLL included."""
    g = torch.Generator().manual_seed(9)
    v = 300
    logits = 60.0 * torch.randn(2, 50, v, generator=g)  # spreads of several hundred nats
    logits[:, :, 250:] = -math.inf  # tokens the model can never predict
    input_ids = torch.randint(0, 250, (2, 50), generator=g)
    input_ids[0, 10] = 7
    logits[0, 9, 7] = logits[0, 9].max() - 150.0  # a target 150 nats below the top: NLL 150
    mask = torch.ones(2, 50, dtype=torch.long)
    got = reduce_logits(logits, input_ids, mask)
    ref = _reference(logits, input_ids, mask)
    _assert_stats_equal(got, ref)
    assert got["nll"][9] == pytest.approx(150.0, rel=1e-5)
    assert np.isfinite(got["entropy"]).all() and (got["entropy"] >= 0).all()


def test_half_precision_logits_are_reduced_in_float32() -> None:
    logits, input_ids, mask = _padded_batch(seed=5)
    low = logits.to(torch.bfloat16)
    _assert_stats_equal(reduce_logits(low, input_ids, mask), _reference(low.float(), input_ids, mask))


def test_uniform_logits_known_answers_through_logit_metrics() -> None:
    v = 32
    input_ids = torch.randint(0, v, (3, 50), generator=torch.Generator().manual_seed(6))
    stats = reduce_logits(torch.zeros(3, 50, v), input_ids)
    np.testing.assert_allclose(stats["entropy"], math.log(v), rtol=1e-6)
    np.testing.assert_allclose(stats["nll"], math.log(v), rtol=1e-6)
    m = logit_metrics(stats)
    acc = float((input_ids[:, 1:] == 0).float().mean())  # the arg-max of a tie is token 0
    assert m["logit_accuracy"] == pytest.approx(acc)
    assert m["logit_ece"] == pytest.approx(abs(acc - 1 / v), abs=1e-6)


def test_one_hot_right_model_has_zero_ece_and_nll() -> None:
    input_ids = torch.randint(0, 9, (2, 12), generator=torch.Generator().manual_seed(7))
    logits = torch.full((2, 12, 9), -1e4)
    logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 0.0)
    m = logit_metrics(reduce_logits(logits, input_ids))
    assert m["logit_accuracy"] == 1.0
    assert m["logit_ece"] == pytest.approx(0.0, abs=1e-6)
    assert m["logit_nll"] == pytest.approx(0.0, abs=1e-6)


def test_single_token_sequences_give_empty_stats_and_nan_metrics() -> None:
    stats = reduce_logits(torch.randn(3, 1, 5), torch.zeros(3, 1, dtype=torch.long))
    assert all(stats[k].shape == (0,) for k in KEYS)
    assert all(math.isnan(v) for v in logit_metrics(stats).values())


# --- from hidden states ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_from_hidden_equals_reduce_logits_on_full_logits(chunk_size: int) -> None:
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(4, 7, 6, generator=g)
    head = torch.nn.Linear(6, 11)
    _, input_ids, mask = _padded_batch(seed=8)
    with torch.no_grad():
        full = reduce_logits(head(hidden), input_ids, mask)
    got = reduce_logits_from_hidden(hidden, head, input_ids, mask, chunk_size=chunk_size)
    _assert_stats_equal(got, full)


def test_from_hidden_with_tiny_causal_lm_base_model_and_head() -> None:
    from topomon.testing import tiny_causal_lm

    model = tiny_causal_lm("llama", vocab_size=64, hidden_size=32, num_layers=2).eval()
    input_ids = torch.randint(4, 64, (2, 9), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0
    input_ids[0, :2] = 3
    with torch.no_grad():
        full_logits = model(input_ids=input_ids, attention_mask=mask).logits
        hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    got = reduce_logits_from_hidden(hidden, model.get_output_embeddings(), input_ids, mask, chunk_size=5)
    _assert_stats_equal(got, reduce_logits(full_logits, input_ids, mask), rtol=1e-4)


def test_from_hidden_calls_head_only_on_counted_positions_in_chunks() -> None:
    calls: list[int] = []
    head = torch.nn.Linear(6, 11)

    def spy(h: torch.Tensor) -> torch.Tensor:
        calls.append(h.shape[0])
        return head(h)

    _, input_ids, mask = _padded_batch(seed=10)
    reduce_logits_from_hidden(torch.randn(4, 7, 6), spy, input_ids, mask, chunk_size=4)
    assert calls == [4, 4, 4, 2]  # 14 counted positions, never B * T = 28 rows at once


# --- bad input ---------------------------------------------------------------------------------------


def test_reduce_logits_validation() -> None:
    logits, input_ids, mask = _padded_batch()
    with pytest.raises(ValueError, match=r"logits must have shape \(B, T, V\)"):
        reduce_logits(logits[0], input_ids, mask)
    with pytest.raises(ValueError, match="logits must have shape"):
        reduce_logits(torch.zeros(0, 3, 5), torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must have shape"):
        reduce_logits(logits, input_ids[:, :5], mask)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        reduce_logits(logits, input_ids, mask[:3])
    with pytest.raises(TypeError, match="input_ids must be an integer"):
        reduce_logits(logits, input_ids.float(), mask)
    with pytest.raises(TypeError, match="logits must be a floating"):
        reduce_logits(logits.long(), input_ids, mask)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        reduce_logits(logits.numpy(), input_ids, mask)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        reduce_logits(logits, input_ids, None)  # pad ids (16) become targets without the mask
    with pytest.raises(ValueError, match="chunk_size"):
        reduce_logits(logits, input_ids, mask, chunk_size=0)
    with pytest.raises(ValueError, match="labels must have shape"):
        reduce_logits(logits, input_ids, mask, labels=input_ids[:2])


def test_reduce_logits_from_hidden_validation() -> None:
    _, input_ids, mask = _padded_batch()
    hidden = torch.randn(4, 7, 6)
    with pytest.raises(ValueError, match=r"lm_head must map \(c, d\) to \(c, V\)"):
        reduce_logits_from_hidden(hidden, lambda h: h.sum(-1), input_ids, mask)
    with pytest.raises(TypeError, match="lm_head must be"):
        reduce_logits_from_hidden(hidden, "head", input_ids, mask)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"hidden must have shape \(B, T, d\)"):
        reduce_logits_from_hidden(hidden[0], torch.nn.Linear(6, 11), input_ids, mask)
    with pytest.raises(ValueError, match="input_ids must have shape"):
        reduce_logits_from_hidden(hidden, torch.nn.Linear(6, 11), input_ids.T, mask)


def test_from_hidden_at_counts_only_the_given_positions_in_row_major_order() -> None:
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(4, 7, 6, generator=g)
    head = torch.nn.Linear(6, 11)
    logits, input_ids, mask = _padded_batch(seed=11)
    # some counted positions, a padded one, the last position (no next token), out of order, repeated
    at_b = torch.tensor([2, 0, 0, 1, 3, 0, 2])
    at_t = torch.tensor([1, 5, 0, 0, 2, 5, 6])
    with torch.no_grad():
        ref_logits = head(hidden)
    keep = torch.zeros(4, 6, dtype=torch.bool)
    for b, t in zip(at_b.tolist(), at_t.tolist(), strict=True):
        if t < 6:
            keep[b, t] = True
    # the reference: the per-position loop over full logits, then only the wanted positions kept
    masked_ids = input_ids.clone()
    ref_all = _reference(ref_logits, masked_ids, mask)
    counted = [
        (b, t) for b in range(4) for t in range(6) if mask[b, t] and mask[b, t + 1]
    ]  # row-major, the order of ref_all
    pick = [i for i, (b, t) in enumerate(counted) if keep[b, t]]
    ref = {k: v[pick] for k, v in ref_all.items()}
    got = reduce_logits_from_hidden(hidden, head, input_ids, mask, at=(at_b, at_t), chunk_size=2)
    assert len(got["nll"]) == len(pick) == 4  # (0,0), (0,5), (2,1), (3,2); (1,0) is padding, t=6 last
    _assert_stats_equal(got, ref)
    # the same positions from full logits (the FSDP path of a probe capture)
    _assert_stats_equal(reduce_logits(ref_logits, input_ids, mask, at=(at_b, at_t)), ref)
