"""LoRA update decorrelation: keep a stage's LoRA update out of the subspaces earlier stages used.

One of the interventions of the sequential post-training study (arXiv 2605.30524): each stage's
LoRA update ``Delta W = s B A`` (``B (out, r)``, ``A (r, in)``, ``s`` the adapter scaling) is
pushed away from the update subspaces of earlier stages, given per module by orthonormal bases
``U_prev (out, k)`` of the output (column) space and ``V_prev (in, k')`` of the input (row) space.

Penalty per module (:func:`lora_overlap_penalty`), computed on ``k x r`` and ``r x r`` matrices only::

    P = ||U^T dW V||_F^2 + c (||U^T dW||_F^2 + ||dW V||_F^2)
      = s^2 ( ||(U^T B)(A V)||^2 + c ( tr[(U^T B)(A A^T)(U^T B)^T] + tr[(A V)^T (B^T B)(A V)] ) )

The two-sided term is the energy of the update inside both old subspaces; the one-sided terms
(weight ``c = one_sided``) also penalise writing into the old output space or reading from the old
input space. ``P = 0`` exactly when the update is orthogonal to both old subspaces.

The penalty is applied without touching the loss: :meth:`LoRADecorrelation.apply_gradients`,
called from ``TrainerCallback.on_pre_optimizer_step``, adds ``weight * dP/dA`` and
``weight * dP/dB`` to the LoRA parameters' ``.grad``. In ``transformers.Trainer`` that event fires
once per optimizer step, after gradient clipping (so the added gradient is not clipped) and after
gradient accumulation and DDP synchronisation (every rank adds the same gradient).

Subspaces are saved at a stage's end with :func:`save_lora_subspaces` (SVD of the update via QR of
the factors, :func:`topomon.metrics.lora.lora_update_subspace`) into a numpy ``.npz`` file read
back with ``allow_pickle=False`` by :func:`load_lora_subspaces`; :func:`merge_lora_subspaces` joins
the subspaces of several earlier stages.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from topomon._validate import check_weight
from topomon.capture.layers import unwrap_model
from topomon.metrics.lora import LORA_SUBSPACE_FORMAT as _FORMAT
from topomon.metrics.lora import load_lora_subspaces

__all__ = [
    "lora_overlap_penalty",
    "has_lora_adapters",
    "LoRADecorrelation",
    "save_lora_subspaces",
    "load_lora_subspaces",
    "merge_lora_subspaces",
]

_ORTHO_TOL = 1e-3  # float32 bases are orthonormal to ~1e-6; looser inputs are not bases


def lora_overlap_penalty(
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    U: torch.Tensor,
    V: torch.Tensor,
    one_sided: float = 1.0,
) -> torch.Tensor:
    """Overlap of the update ``scaling * B @ A`` with old subspaces ``U`` (outputs) and ``V`` (inputs).

    ``||U^T dW V||_F^2 + one_sided * (||U^T dW||_F^2 + ||dW V||_F^2)`` without forming ``dW``.

    Args:
        A: ``(r, in)`` LoRA down-projection.
        B: ``(out, r)`` LoRA up-projection.
        scaling: the adapter's scaling ``s``.
        U: ``(out, k)`` orthonormal basis of the old output space (``k`` may be 0).
        V: ``(in, k')`` orthonormal basis of the old input space (``k'`` may be 0).
        one_sided: weight of the one-sided terms, ``>= 0``.

    Returns:
        A differentiable 0-d tensor, ``>= 0``.

    Raises:
        ValueError: on mismatched shapes.
    """
    r, n_in = A.shape
    n_out = B.shape[0]
    if B.shape[1] != r or U.shape[0] != n_out or V.shape[0] != n_in:
        raise ValueError(
            f"shapes do not match: A {tuple(A.shape)} (r, in), B {tuple(B.shape)} (out, r), "
            f"U {tuple(U.shape)} (out, k), V {tuple(V.shape)} (in, k)"
        )
    ub = U.T @ B  # (k, r)
    av = A @ V  # (r, k')
    total = (ub @ av).pow(2).sum()
    if one_sided > 0:
        left = ((ub @ (A @ A.T)) * ub).sum()  # ||U^T B A||^2
        right = ((B.T @ B @ av) * av).sum()  # ||B A V||^2
        total = total + one_sided * (left + right)
    return total * (scaling * scaling)


def _lora_root(model: Any) -> torch.nn.Module:
    return unwrap_model(model)


def _live_factors(
    model: Any, adapter_name: str | None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{name: (A, B, scaling)}``: the live ``nn.Linear`` LoRA parameters, named as by ``lora_factors``."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for name, module in _lora_root(model).named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name is None:
            active = list(module.active_adapters)
            if len(active) != 1:
                if len(active) > 1:
                    raise ValueError(
                        f"module {name!r} has several active adapters {active}; "
                        "pass adapter_name to choose one"
                    )
                continue
            adapter = active[0]
        else:
            adapter = adapter_name
        dict_a, dict_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if dict_a is None or dict_b is None or adapter not in dict_a or adapter not in dict_b:
            continue
        la, lb = dict_a[adapter], dict_b[adapter]
        if isinstance(la, torch.nn.Linear) and isinstance(lb, torch.nn.Linear):
            out[name] = (la.weight, lb.weight, float(module.scaling[adapter]))
    return out


def has_lora_adapters(model: Any, adapter_name: str | None = None) -> bool:
    """Whether the model has live ``nn.Linear`` LoRA adapters (PEFT) that a decorrelation can act on.

    Raises:
        ValueError: a module has several active adapters and ``adapter_name`` is None.
    """
    try:
        import peft  # noqa: F401
    except ImportError:  # without peft there are no LoRA layers
        return False
    return bool(_live_factors(model, adapter_name))


def _orthonormal(name: str, which: str, arr: Any, rows: int) -> np.ndarray:
    m = np.asarray(arr)
    if m.dtype.kind not in "iuf" or m.ndim != 2:
        raise ValueError(f"previous[{name!r}] {which} must be a 2-D real array, got {m.dtype} {m.shape}")
    if m.shape[0] != rows:
        raise ValueError(
            f"previous[{name!r}] {which} has {m.shape[0]} rows but the module's LoRA update needs {rows}"
        )
    m = m.astype(np.float64)
    if not np.all(np.isfinite(m)):
        raise ValueError(f"previous[{name!r}] {which} must be finite")
    err = float(np.max(np.abs(m.T @ m - np.eye(m.shape[1])), initial=0.0))
    if err > _ORTHO_TOL:
        raise ValueError(
            f"previous[{name!r}] {which} must have orthonormal columns, max |M^T M - I| = {err:.3g}"
        )
    return m


class LoRADecorrelation:
    """Adds the gradient of ``weight * sum_modules P`` (:func:`lora_overlap_penalty`) to the LoRA grads.

    Args:
        model: a PEFT model (or a model with LoRA layers injected), DDP-wrapped or not.
        previous: ``{module_name: (U_prev (out, k), V_prev (in, k'))}`` orthonormal bases, module names
            as in :func:`topomon.capture.lora_weights.lora_factors` (e.g.
            ``"model.layers.0.self_attn.q_proj"``); modules not listed get no penalty.
        weight: penalty weight, finite and ``>= 0`` (0 = off).
        one_sided: weight of the one-sided terms, finite and ``>= 0`` (0 = two-sided term only).
        adapter_name: adapter to regularise (None: each module's single active adapter).

    Raises:
        ValueError: a module name absent from the model, shapes that do not match, bases that are
            not orthonormal, or a bad weight.

    Example:
        >>> dec = LoRADecorrelation(model, load_lora_subspaces("sft.npz"), weight=1.0)  # doctest: +SKIP
        >>> # in TrainerCallback.on_pre_optimizer_step:
        >>> penalty = dec.apply_gradients()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        previous: Mapping[str, tuple[np.ndarray, np.ndarray]],
        weight: float = 0.0,
        *,
        one_sided: float = 1.0,
        adapter_name: str | None = None,
    ) -> None:
        if not isinstance(previous, Mapping):
            raise TypeError(f"previous must be a mapping name -> (U, V), got {type(previous).__name__}")
        self._weight = 0.0
        self.set_weight(weight)
        if (
            isinstance(one_sided, bool)
            or not isinstance(one_sided, (int, float))
            or not (math.isfinite(one_sided) and one_sided >= 0)
        ):
            raise ValueError(f"one_sided must be a finite float >= 0, got {one_sided!r}")
        self.one_sided = float(one_sided)
        self.model = model
        self.adapter_name = adapter_name
        live = _live_factors(model, adapter_name)
        missing = sorted(set(previous) - set(live))
        if missing:
            raise ValueError(
                f"{len(missing)} module(s) of previous have no LoRA adapter in the model, "
                f"e.g. {missing[:3]}; LoRA modules of the model are e.g. {sorted(live)[:3]}"
            )
        self._bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, pair in previous.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"previous[{name!r}] must be a pair (U, V), got {type(pair).__name__}")
            a, b, _ = live[name]
            u = _orthonormal(name, "U", pair[0], b.shape[0])
            v = _orthonormal(name, "V", pair[1], a.shape[1])
            self._bases[name] = (torch.from_numpy(u).float(), torch.from_numpy(v).float())
        self.last_value = float("nan")

    @property
    def weight(self) -> float:
        """Current penalty weight (0 = off)."""
        return self._weight

    def set_weight(self, weight: float) -> None:
        """Set the penalty weight.

        Raises:
            ValueError: for a negative or non-finite weight.
            TypeError: for a non-number.
        """
        self._weight = check_weight(weight)

    @property
    def modules(self) -> list[str]:
        """Names of the regularised modules."""
        return sorted(self._bases)

    def _basis(self, name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, v = self._bases[name]
        if u.device != like.device:
            u, v = u.to(like.device), v.to(like.device)
            self._bases[name] = (u, v)
        return u, v

    def value(self) -> float:
        """The unweighted penalty of the current update, summed over modules (no gradients touched)."""
        total = 0.0
        with torch.no_grad():
            for name, (a, b, s) in _live_factors(self.model, self.adapter_name).items():
                if name in self._bases:
                    u, v = self._basis(name, a)
                    total += float(lora_overlap_penalty(a.float(), b.float(), s, u, v, self.one_sided))
        self.last_value = total
        return total

    def apply_gradients(self) -> float:
        """Add ``weight * dP/d(A, B)`` to the LoRA parameters' ``.grad``; call in ``on_pre_optimizer_step``.

        Parameters without ``requires_grad`` are left alone; a ``None`` grad becomes the penalty's.
        With ``weight == 0`` only the value is computed.

        Returns:
            The unweighted penalty ``sum_modules P`` before the update (also in :attr:`last_value`).
        """
        if self._weight == 0:
            return self.value()
        total = 0.0
        for name, (a, b, s) in _live_factors(self.model, self.adapter_name).items():
            if name not in self._bases:
                continue
            u, v = self._basis(name, a)
            with torch.enable_grad():
                a32 = a.detach().float().requires_grad_(True)
                b32 = b.detach().float().requires_grad_(True)
                p = lora_overlap_penalty(a32, b32, s, u, v, self.one_sided)
                ga, gb = torch.autograd.grad(p, (a32, b32))
            total += float(p.detach())
            for param, g in ((a, ga), (b, gb)):
                if not param.requires_grad:
                    continue
                g = (self._weight * g).to(param.dtype)
                if param.grad is None:
                    param.grad = g
                else:
                    param.grad.add_(g)
        self.last_value = total
        return total

    def state_dict(self) -> dict[str, Any]:
        """Plain-typed state: the weight (the bases are configuration: :func:`save_lora_subspaces`)."""
        return {"weight": self._weight, "one_sided": self.one_sided}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the weight."""
        self.set_weight(float(state.get("weight", self._weight)))


def save_lora_subspaces(
    model: Any,
    path: str | os.PathLike[str],
    *,
    k: int | None = None,
    rtol: float = 0.0,
    adapter_name: str | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Save the update subspaces of every LoRA module (at a stage's end) to a numpy ``.npz`` file.

    Per module: the left and right singular vectors of ``s B A`` with nonzero singular value (numerical
    rank), at most ``k`` of them, and only those with ``sigma > rtol * sigma_max``. A zero update (LoRA
    at initialisation) gives empty ``(out, 0)`` / ``(in, 0)`` bases.

    Args:
        model: a PEFT model.
        path: the file to write (written as given; the ``.npz`` suffix is not added).
        k: keep at most the top ``k`` directions (None: all).
        rtol: drop directions whose singular value is at most ``rtol`` times the largest, ``0 <= rtol < 1``.
        adapter_name: the adapter to read (None: each module's active adapter).

    Returns:
        ``{module_name: (U (out, k), V (in, k))}`` as saved, float64.

    Raises:
        ValueError: a model without LoRA modules, or a bad ``k`` / ``rtol``.
    """
    from topomon.capture.lora_weights import lora_factors
    from topomon.metrics.lora import lora_update_singular_values, lora_update_subspace

    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive int or None, got {k!r}")
    if not (0.0 <= rtol < 1.0):
        raise ValueError(f"rtol must be in [0, 1), got {rtol!r}")
    factors = lora_factors(unwrap_model(model), adapter_name)
    if not factors:
        raise ValueError("the model has no LoRA modules to save subspaces of")
    subspaces: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    arrays: dict[str, np.ndarray] = {"__format__": np.array(_FORMAT)}
    for i, (name, (a, b, s)) in enumerate(sorted(factors.items())):
        u, v = lora_update_subspace(a, b, s)
        sv = lora_update_singular_values(a, b, s)[: u.shape[1]]
        keep = int(np.sum(sv > rtol * sv[0])) if sv.size else 0
        if k is not None:
            keep = min(keep, k)
        u, v, sv = u[:, :keep], v[:, :keep], sv[:keep]
        subspaces[name] = (u, v)
        arrays[f"name_{i}"] = np.array(name)
        arrays[f"U_{i}"], arrays[f"V_{i}"], arrays[f"S_{i}"] = u, v, sv
    with open(path, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    return subspaces


def merge_lora_subspaces(
    *subspaces: Mapping[str, tuple[np.ndarray, np.ndarray]], tol: float = 1e-6
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Union of several stages' subspaces: per module, an orthonormal basis of the span of all bases.

    Args:
        *subspaces: mappings ``{module_name: (U, V)}`` (e.g. from :func:`load_lora_subspaces`).
        tol: singular values of the stacked bases at most ``tol`` (relative to 1) are dropped.

    Returns:
        ``{module_name: (U, V)}`` over the union of module names.

    Raises:
        ValueError: when a module's bases disagree on the ambient dimension.
    """
    merged: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for sub in subspaces:
        for name, (u, v) in sub.items():
            us, vs = merged.setdefault(name, ([], []))
            us.append(np.asarray(u, dtype=np.float64))
            vs.append(np.asarray(v, dtype=np.float64))

    def span(name: str, mats: list[np.ndarray]) -> np.ndarray:
        if len({m.shape[0] for m in mats}) != 1:
            raise ValueError(f"bases of {name!r} have different numbers of rows: {[m.shape for m in mats]}")
        stacked = np.concatenate(mats, axis=1)
        if stacked.shape[1] == 0:
            return stacked
        q, s, _ = np.linalg.svd(stacked, full_matrices=False)
        return np.asarray(q[:, s > tol])

    return {name: (span(name, us), span(name, vs)) for name, (us, vs) in merged.items()}
