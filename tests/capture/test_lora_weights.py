from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model

from topomon.capture.lora_weights import LoraReference, has_lora, lora_extras, lora_factors
from topomon.metrics.lora import lora_update_singular_values
from topomon.testing import tiny_causal_lm

NUM_LAYERS = 3


def _llama() -> Any:
    return tiny_causal_lm("llama", vocab_size=64, hidden_size=32, num_layers=NUM_LAYERS)


def _randomise_lora(model: torch.nn.Module) -> None:
    """LoRA starts with B = 0 (a zero update): randomise every factor so the checks mean something."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))


def _peft_llama(**kwargs: object) -> Any:
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], **kwargs)  # type: ignore[arg-type]
    model = get_peft_model(_llama(), config)
    _randomise_lora(model)
    return model


def test_one_factor_triple_per_adapted_module_with_plain_names() -> None:
    model = _peft_llama()
    factors = lora_factors(model)
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(NUM_LAYERS) for p in ("q_proj", "v_proj")}
    assert set(factors) == expected
    for name, (a, b, scaling) in factors.items():
        module = model.get_base_model().get_submodule(name)
        assert a.dtype == np.float32 and b.dtype == np.float32
        assert a.shape == (4, module.in_features) and b.shape == (module.out_features, 4)
        assert scaling == pytest.approx(16 / 4)


def test_scaled_product_equals_merged_weight_difference() -> None:
    model = _peft_llama()
    factors = lora_factors(model)
    before = {n: model.get_base_model().get_submodule(n).base_layer.weight.detach().clone() for n in factors}
    merged = copy.deepcopy(model).merge_and_unload()
    for name, (a, b, scaling) in factors.items():
        diff = (merged.get_submodule(name).weight - before[name]).detach().numpy()
        np.testing.assert_allclose(scaling * b @ a, diff, rtol=1e-4, atol=1e-4)
        delta = model.get_base_model().get_submodule(name).get_delta_weight("default").detach().numpy()
        np.testing.assert_allclose(scaling * b @ a, delta, rtol=1e-5, atol=1e-5)
        s = lora_update_singular_values(a, b, scaling)
        np.testing.assert_allclose(s, np.linalg.svd(delta, compute_uv=False)[:4], rtol=1e-4)


def test_rslora_scaling_is_read_from_the_module() -> None:
    factors = lora_factors(_peft_llama(use_rslora=True))
    assert {round(s, 6) for _, _, s in factors.values()} == {16 / 2}  # lora_alpha / sqrt(r)


def test_factors_are_detached_copies() -> None:
    model = _peft_llama()
    name = "model.layers.0.self_attn.q_proj"
    a, b, _ = lora_factors(model)[name]
    a[:] = 0.0
    live = model.get_base_model().get_submodule(name).lora_A["default"].weight
    assert torch.count_nonzero(live) > 0


def test_injected_adapters_give_the_same_names_and_values() -> None:
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    peft_model = _peft_llama()
    plain = inject_adapter_in_model(config, _llama())
    plain.load_state_dict(peft_model.get_base_model().state_dict())
    got, ref = lora_factors(plain), lora_factors(peft_model)
    assert set(got) == set(ref)
    for name in ref:
        np.testing.assert_array_equal(got[name][0], ref[name][0])
        np.testing.assert_array_equal(got[name][1], ref[name][1])
        assert got[name][2] == ref[name][2]


def test_model_without_lora_gives_empty_dict() -> None:
    assert lora_factors(_llama()) == {}
    assert lora_factors(torch.nn.Linear(3, 2)) == {}


def test_named_and_active_adapters() -> None:
    model = _peft_llama()
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["v_proj"]))
    assert len(lora_factors(model)) == 2 * NUM_LAYERS  # "default" is still the active one
    second = lora_factors(model, adapter_name="second")
    assert set(second) == {f"model.layers.{i}.self_attn.v_proj" for i in range(NUM_LAYERS)}
    assert all(a.shape[0] == 2 and s == 1.0 for a, _, s in second.values())
    model.set_adapter("second")
    assert set(lora_factors(model)) == set(second)
    assert lora_factors(model, adapter_name="missing") == {}


def test_gpt2_conv1d_fan_in_fan_out_is_the_linear_map_update() -> None:
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True)
    model: Any = get_peft_model(tiny_causal_lm("gpt2", vocab_size=64, hidden_size=32, num_layers=2), config)
    _randomise_lora(model)
    factors = lora_factors(model)
    assert len(factors) == 2
    for name, (a, b, scaling) in factors.items():
        delta = model.get_base_model().get_submodule(name).get_delta_weight("default").detach().numpy()
        # Conv1D stores W as (in, out): PEFT's delta is the transpose of the (out, in) linear-map update
        np.testing.assert_allclose(scaling * b @ a, delta.T, rtol=1e-5, atol=1e-5)


def test_embedding_adapter_is_the_transposed_table_update() -> None:
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens"])
    model: Any = get_peft_model(_llama(), config)
    _randomise_lora(model)
    (name, (a, b, scaling)), *rest = lora_factors(model).items()
    assert not rest and name == "model.embed_tokens"
    delta = model.get_base_model().get_submodule(name).get_delta_weight("default").detach().numpy()
    assert a.shape == (4, 64) and b.shape == (32, 4)
    np.testing.assert_allclose(scaling * b @ a, delta.T, rtol=1e-5, atol=1e-5)


def test_bfloat16_adapters_come_back_as_float32() -> None:
    model = _peft_llama().to(torch.bfloat16)
    a, b, _ = lora_factors(model)["model.layers.1.self_attn.v_proj"]
    live = model.get_base_model().get_submodule("model.layers.1.self_attn.v_proj").lora_B["default"].weight
    assert a.dtype == np.float32 and b.dtype == np.float32
    np.testing.assert_array_equal(b, live.detach().float().numpy())


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lora_factors("model")
    with pytest.raises(TypeError, match="adapter_name"):
        lora_factors(_llama(), adapter_name=1)  # type: ignore[arg-type]


def test_the_extras_are_the_factors_grams_and_their_projections_on_earlier_subspaces(tmp_path) -> None:
    from topomon.interventions.lora_decorrelation import save_lora_subspaces
    from topomon.metrics.lora import lora_gram_overlap, lora_update_subspace, subspace_overlap

    model = _peft_llama()
    factors, first = lora_factors(model), lora_extras(model)
    assert {k.split("/")[1] for k in first} == set(factors) and has_lora(model) and not has_lora(_llama())
    for name, (a, b, scaling) in factors.items():
        ga, gb, sc = (first[f"lora/{name}/{p}"] for p in ("gram_A", "gram_B", "scaling"))
        assert ga.shape == gb.shape == (4, 4) and ga.dtype == np.float64 and sc == scaling
        np.testing.assert_allclose(ga, a.astype(np.float64) @ a.T, rtol=1e-5)
        np.testing.assert_allclose(gb, b.T.astype(np.float64) @ b, rtol=1e-5)
    # a first stage ships the Grams and the scaling only
    name = next(iter(factors))
    assert {k for k in first if k.startswith(f"lora/{name}/")} == {
        f"lora/{name}/{p}" for p in ("gram_A", "gram_B", "scaling")
    }
    # a later stage: the factors projected on each earlier stage's bases, r x k numbers each
    earlier = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in earlier.named_parameters():
            if "lora_" in n:
                p.mul_(1.5).add_(0.3)
    save_lora_subspaces(earlier, tmp_path / "sft.npz")
    save_lora_subspaces(model, tmp_path / "dpo.npz")  # the current update itself
    later = lora_extras(model, LoraReference([str(tmp_path / "sft.npz"), str(tmp_path / "dpo.npz")]))
    factor_bytes = sum(a.nbytes + b.nbytes for a, b, _ in factors.values())
    assert sum(v.nbytes for v in later.values()) < factor_bytes
    for name, (a, b, scaling) in factors.items():
        u, v = lora_update_subspace(a, b, scaling)
        refs = [lora_update_subspace(*lora_factors(earlier)[name]), (u, v)]
        for j, (u_ref, v_ref) in enumerate(refs):
            av, btu = later[f"lora/{name}/AV_{j}"], later[f"lora/{name}/BtU_{j}"]
            assert av.shape == btu.shape == (4, u_ref.shape[1])
            np.testing.assert_allclose(av, a.astype(np.float64) @ v_ref, rtol=1e-4, atol=1e-5)
            want = 0.5 * (subspace_overlap(u, u_ref) + subspace_overlap(v, v_ref))
            got = lora_gram_overlap(later[f"lora/{name}/gram_A"], later[f"lora/{name}/gram_B"], av, btu)
            assert got == pytest.approx(want, abs=1e-5)
            assert j == 0 or got == pytest.approx(1.0, abs=1e-5)  # against itself
    with pytest.raises(ValueError, match="another model"):
        lora_extras(_other_width(), LoraReference([str(tmp_path / "sft.npz")]))


def _other_width() -> Any:
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(
        tiny_causal_lm("llama", vocab_size=64, hidden_size=48, num_layers=NUM_LAYERS), config
    )
    _randomise_lora(model)
    return model
