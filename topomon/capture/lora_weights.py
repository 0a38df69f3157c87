"""Read the LoRA factors of a PEFT model as detached float32 numpy, for :mod:`topomon.metrics.lora`.

``torch`` and ``peft`` are imported on first call only.

Convention: for every LoRA-adapted module, ``(A, B, scaling)`` with ``A`` of shape ``(r, in)`` and ``B`` of
shape ``(out, r)`` such that ``scaling * B @ A`` is the update of the module's linear map ``x -> W x``
(``W`` of shape ``(out, in)``):

- ``nn.Linear``: ``A = lora_A.weight``, ``B = lora_B.weight``; the update equals PEFT's
  ``get_delta_weight`` (for GPT-2's ``Conv1D``, ``fan_in_fan_out=True``, PEFT stores the transpose of it:
  the linear map is the same).
- ``nn.Embedding``: ``A = lora_embedding_A`` (``(r, num_embeddings)``), ``B = lora_embedding_B``
  (``(embedding_dim, r)``): ``scaling * B @ A`` is the transpose of the embedding table's update.
- Convolutions: ``A`` is ``lora_A``'s kernel flattened to ``(r, in * prod(kernel))``, ``B`` is ``lora_B``'s
  ``1 x 1`` kernel as ``(out, r)``: the update of the unfolded (im2col) convolution matrix. Grouped
  convolutions and other adapted layer types (multi-head attention, parameter wrappers) are skipped.

For DoRA adapters the factors are returned as they are, but the merged update also rescales by the
magnitude vector, so it is not ``scaling * B @ A``. Adapters sharded by DeepSpeed ZeRO-3 or FSDP must be
gathered by the caller first (a sharded parameter reads as empty and is skipped).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["lora_factors", "lora_extras", "has_lora", "LoraReference"]


def _to_numpy(t: Any) -> np.ndarray:
    # a copy: for float32 CPU parameters .numpy() would share (and expose) the live weights
    return np.array(t.detach().float().cpu().numpy(), dtype=np.float32, copy=True)


def _module_tensors(module: Any, adapter: str) -> tuple[Any, Any, float] | None:
    """``(A, B, scaling)`` of one adapted module as the live tensors (see the module's conventions)."""
    import torch

    if adapter not in module.scaling:
        return None
    scaling = float(module.scaling[adapter])
    if adapter in getattr(module, "lora_embedding_A", {}):
        a = module.lora_embedding_A[adapter]
        b = module.lora_embedding_B[adapter]
    elif adapter in getattr(module, "lora_A", {}):
        la, lb = module.lora_A[adapter], module.lora_B[adapter]
        if isinstance(la, torch.nn.Linear) and isinstance(lb, torch.nn.Linear):
            a, b = la.weight, lb.weight
        elif isinstance(la, torch.nn.modules.conv._ConvNd) and isinstance(lb, torch.nn.modules.conv._ConvNd):
            if la.groups != 1 or lb.groups != 1:
                return None
            a = la.weight.reshape(la.weight.shape[0], -1)
            b = lb.weight.reshape(lb.weight.shape[0], -1)
        else:
            return None
    else:
        return None
    if a.ndim != 2 or b.ndim != 2 or a.numel() == 0 or b.numel() == 0 or a.shape[0] != b.shape[1]:
        return None
    return a, b, scaling


def _lora_tensors(model: Any, adapter_name: str | None) -> Iterator[tuple[str, Any, Any, float]]:
    """``(module name, A, B, scaling)`` of every LoRA-adapted module, as live tensors."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if adapter_name is not None and not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a str or None, got {adapter_name!r}")
    from peft.tuners.lora import LoraLayer

    root = model
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):  # PeftModel: name modules relative to the underlying transformers model
        root = get_base()
    for name, module in root.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name is None:
            active = list(module.active_adapters)
            if not active:
                continue
            if len(active) > 1:
                raise ValueError(
                    f"module {name!r} has several active adapters {active}; pass adapter_name to choose one"
                )
            adapter = active[0]
        else:
            adapter = adapter_name
        found = _module_tensors(module, adapter)
        if found is not None:
            yield (name, *found)


def lora_factors(
    model: Any, adapter_name: str | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """LoRA factors of every LoRA-adapted module of a model, detached, as float32 numpy.

    Works on a ``peft.PeftModel`` and on a plain model with adapters injected
    (``peft.inject_adapter_in_model``); the module names are the same in both cases (relative to the
    underlying model, e.g. ``"model.layers.0.self_attn.q_proj"``).

    Args:
        model: a ``torch.nn.Module``.
        adapter_name: the adapter to read; ``None`` reads each module's active adapter.

    Returns:
        ``{module_name: (A, B, scaling)}`` with ``A`` of shape ``(r, in)``, ``B`` of shape ``(out, r)``, both
        float32 numpy copies, and ``scaling`` a float, such that ``scaling * B @ A`` is the module's update
        (see the module docstring for embeddings and convolutions). ``{}`` for a model without LoRA, or
        when no module holds ``adapter_name``.

    Raises:
        TypeError: if ``model`` is not a ``torch.nn.Module`` or ``adapter_name`` is not a string.
        ValueError: if ``adapter_name`` is ``None`` and a module has several active adapters (name one).

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> from topomon.testing import tiny_causal_lm
        >>> peft_model = get_peft_model(tiny_causal_lm(), LoraConfig(r=4, target_modules=["q_proj"]))
        >>> a, b, scaling = lora_factors(peft_model)["model.layers.0.self_attn.q_proj"]
        >>> a.shape, b.shape, scaling
        ((4, 32), (32, 4), 2.0)
    """
    return {name: (_to_numpy(a), _to_numpy(b), sc) for name, a, b, sc in _lora_tensors(model, adapter_name)}


def has_lora(model: Any) -> bool:
    """Whether ``model`` has a LoRA-adapted module with an active adapter (nothing is copied)."""
    return next(_lora_tensors(model, None), None) is not None


class LoraReference:
    """Earlier stages' LoRA update subspaces, read once and kept beside each adapted module.

    The training process projects each module's factors on them (:func:`lora_extras`), so a capture
    ships ``r x k`` numbers per module and reference instead of the factors. The bases are read from
    the files on first use and moved, as float32, to the device of the module they belong to: about
    the size of the factors themselves.

    Args:
        paths: subspace files (``save_lora_subspaces``), earliest first.
    """

    def __init__(self, paths: Sequence[str] = ()) -> None:
        self.paths = tuple(paths)
        self._loaded: dict[str, list[tuple[np.ndarray, np.ndarray]]] | None = None
        self._placed: dict[str, list[tuple[Any, Any]]] = {}

    def __bool__(self) -> bool:
        return bool(self.paths)

    def bases(self, name: str, device: Any) -> list[tuple[Any, Any]]:
        """``[(U_ref, V_ref), ...]`` of module ``name`` (one per file holding it) on ``device``."""
        import torch

        if self._loaded is None:
            from topomon.metrics.lora import load_lora_subspaces

            self._loaded = {}
            for path in self.paths:
                for module, uv in load_lora_subspaces(path).items():
                    self._loaded.setdefault(module, []).append(uv)
        if name not in self._placed:
            self._placed[name] = [
                (
                    torch.as_tensor(u, dtype=torch.float32, device=device),
                    torch.as_tensor(v, dtype=torch.float32, device=device),
                )
                for u, v in self._loaded.pop(name, [])  # (the host copy is not kept)
            ]
        return self._placed[name]


def lora_extras(model: Any, reference: LoraReference | None = None) -> dict[str, np.ndarray]:
    """The LoRA updates of ``model`` as snapshot extras, per adapted module ``lora/<module>/...``.

    ``gram_A`` and ``gram_B`` (``A A^T`` and ``B^T B``: the update's spectrum), ``scaling``, and for
    each earlier stage's subspace ``(U_ref, V_ref)`` of the module in ``reference``, ``AV_<j>`` and
    ``BtU_<j>`` (``A V_ref`` and ``B^T U_ref``: its overlap with it,
    :func:`topomon.metrics.lora.lora_gram_overlap`). All float64, computed where the factors live:
    ``2 r^2 + 2 r k`` numbers per module leave the device, not ``r (in + out)`` (about 1 MiB instead
    of 160 for r=16 on every linear layer of an 8B Llama).

    Args:
        model: a ``torch.nn.Module`` (a ``peft.PeftModel`` or one with adapters injected).
        reference: earlier stages' subspaces, or None.

    Returns:
        An empty mapping for a model without LoRA adapters.

    Raises:
        ValueError: a reference basis whose size does not match the module's (another model).
    """
    import torch

    extras: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name, a, b, scaling in _lora_tensors(model, None):
            if a.device.type == "mps":  # no float64 there
                a, b = a.cpu(), b.cpu()
            a64, b64 = a.detach().double(), b.detach().double()
            extras[f"lora/{name}/gram_A"] = (a64 @ a64.T).cpu().numpy()
            extras[f"lora/{name}/gram_B"] = (b64.T @ b64).cpu().numpy()
            extras[f"lora/{name}/scaling"] = np.asarray(scaling, dtype=np.float64)
            for j, (u, v) in enumerate(reference.bases(name, a64.device) if reference else []):
                if u.shape[0] != b64.shape[0] or v.shape[0] != a64.shape[1]:
                    raise ValueError(
                        f"module {name!r}: the reference subspace is ({u.shape[0]}, {v.shape[0]}) but the "
                        f"update is ({b64.shape[0]}, {a64.shape[1]}): lora_reference comes from another model"
                    )
                extras[f"lora/{name}/AV_{j}"] = (a64 @ v.double()).cpu().numpy()
                extras[f"lora/{name}/BtU_{j}"] = (b64.T @ u.double()).cpu().numpy()
    return extras
