"""topomon.models.independent_copy: a copy of a trainer-prepared model that trains on its own."""

import copy

import pytest
import torch

from topomon.models import independent_copy
from topomon.testing import tiny_causal_lm, tiny_tokenizer


def _prepared(tmp_path, peft=None):
    """A tiny model after one step of TRL's SFTTrainer (so accelerate has prepared it)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = tiny_tokenizer()
    model = tiny_causal_lm(vocab_size=len(tok))
    rows = [{"prompt": "hello there ", "completion": "general kenobi"}] * 4
    args = SFTConfig(
        output_dir=str(tmp_path / "tr"),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        max_length=32,
        bf16=False,
    )
    tr = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=peft
    )
    tr.train()
    tr.model.zero_grad(set_to_none=True)
    return tr.model, tok


def _backward(m, tok):
    x = torch.tensor([[5, 9, 11, 13, 17, 19, 23]])
    m(input_ids=x, labels=x).loss.backward()


def test_a_copy_of_a_prepared_model_trains_alone_where_a_deepcopy_does_not(tmp_path):
    model, tok = _prepared(tmp_path)
    x = torch.tensor([[5, 9, 11, 13]])
    model.eval()
    with torch.no_grad():
        want = model(input_ids=x).logits
    clone = independent_copy(model)
    clone.eval()
    with torch.no_grad():
        assert torch.equal(clone(input_ids=x).logits, want)  # the same function
    clone.train()
    _backward(clone, tok)
    assert all(p.grad is not None for p in clone.parameters())
    assert all(p.grad is None for p in model.parameters())  # nothing reached the original
    # why it exists: the deep copy of the same prepared model runs the original's weights
    leaky = copy.deepcopy(model)
    _backward(leaky, tok)
    if all(p.grad is None for p in model.parameters()):
        pytest.skip("this accelerate no longer wraps forward in a closure: deepcopy would do")
    assert all(p.grad is None for p in leaky.parameters())


def test_a_lora_model_is_copied_with_its_adapter_merged(tmp_path):
    from peft import LoraConfig

    model, tok = _prepared(tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a non-zero adapter, so merging it matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    x = torch.tensor([[5, 9, 11, 13]])
    model.eval()
    with torch.no_grad():
        want = model(input_ids=x).logits
    clone = independent_copy(model)
    assert not any("lora" in n for n, _ in clone.named_parameters())
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)
    clone.train()
    _backward(clone, tok)
    assert all(p.grad is not None for p in clone.parameters())
    assert all(p.grad is None for p in model.parameters())
