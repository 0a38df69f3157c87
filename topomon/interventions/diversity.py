"""Representation-diversity regularisation applied through hooks, without touching the trainer's loss.

The sequential post-training study (arXiv 2605.30524) counters representation collapse with a
diversity penalty on hidden states. To work with any trainer and any loss (SFT, DPO, ...) the
penalty is not added to the loss: a forward hook on each chosen decoder block passes the block's
output through :class:`_AddGradient`, an autograd function that is the identity in the forward
pass and adds ``weight / L * dP/dh`` to the gradient flowing back into the block output (``L``
layers, ``P`` the penalty of that layer's selected tokens). The parameter gradients are then those
of ``loss + weight * mean_l P_l``, while the logged loss is unchanged.

Penalties (pure functions on a ``(n, d)`` tensor of token states; differentiable; NaN when undefined):

* ``"logdet"``: ``-(1/d) log det(C_hat + eps I)`` with ``C_hat = d C / tr C`` the centred covariance
  rescaled to trace ``d``. The trace normalisation makes it scale-invariant: the raw
  ``-log det(C + eps I)`` is minimised by inflating the norms of the states, not by spreading them.
  Computed on the smaller of the ``n x n`` Gram and ``d x d`` covariance matrices (same eigenvalues).
* ``"entropy"``: minus the Shannon entropy (natural log) of the centred covariance spectrum
  normalised to sum 1, i.e. ``-log`` of the effective rank of Roy & Vetterli (2007).
* ``"uniformity"``: ``log mean_{i<j} exp(-t ||z_i - z_j||^2)`` on unit-normalised states
  (Wang & Isola 2020, ``t = 2``).

When the penalty is applied: the regulariser's weight is positive, grad is enabled, the block is
in training mode and its output requires grad. So the DPO reference forward (under ``no_grad``),
the monitor's no-grad probe pass and evaluation are left alone. Tokens: the 2-D attention mask
(captured by a pre-hook on the module that owns the decoder blocks) selects real tokens, otherwise
all tokens are used; the first real token of each sequence is skipped by default (massive
activations, see RESEARCH.md); then at most ``max_tokens`` are drawn at random.

Gradient checkpointing (on by default in TRL's SFT/DPO configs): a pre-hook on the decoder stack
starts a new round at each grad-enabled training forward, and a block regularised in the current
round is not regularised again, so the non-reentrant recompute during backward (the
transformers/TRL default) adds nothing; no-grad forwards in between (DPO reference pass, probe
pass) do not start a round. With reentrant checkpointing the first forward runs under no_grad, so
the penalty is applied once, in the recompute (with the attention mask of the latest training
forward). The penalty's own small graph is built under identity saved-tensor hooks, out of reach
of the checkpoint's hooks.

Scaling caveats: the added gradient is not divided by the Trainer's gradient-accumulation factor
(with ``k`` micro-batches the effective weight is ``k * weight`` relative to the mean loss) and is
not multiplied by an fp16 ``GradScaler``'s scale; bf16 and fp32 training need no correction.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from topomon._validate import check_weight
from topomon.capture.layers import model_layout, resolve_layer_indices, unwrap_model

__all__ = [
    "KINDS",
    "logdet_penalty",
    "spectral_entropy_penalty",
    "uniformity_penalty",
    "diversity_penalty",
    "select_tokens",
    "DiversityRegularizer",
]

KINDS = ("logdet", "entropy", "uniformity")
_TINY = 1e-12


def _check_points(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (n, d), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (n, d), got shape {tuple(x.shape)}")


def _nan(x: torch.Tensor) -> torch.Tensor:
    return x.sum() * float("nan")  # keeps the graph connected, so autograd callers see NaN, not an error


def _centred_gram(x: torch.Tensor) -> torch.Tensor:
    """The smaller of ``Xc Xc^T`` (n x n) and ``Xc^T Xc`` (d x d), ``Xc`` the centred points."""
    xc = x - x.mean(dim=0, keepdim=True)
    return xc @ xc.T if x.shape[0] < x.shape[1] else xc.T @ xc


def logdet_penalty(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Scale-invariant log-determinant penalty ``-(1/d) log det(d C / tr C + eps I_d)``.

    ``C`` is the centred covariance of the rows of ``x``; the ``(d - m)`` zero eigenvalues beyond the
    Gram matrix's size ``m`` contribute ``log eps`` each. Lower means more spread (isotropic:
    ``-log(1 + eps)``).

    Args:
        x: ``(n, d)`` token states.
        eps: ridge added to the trace-normalised covariance, positive.

    Returns:
        A 0-d tensor (differentiable); NaN when ``n < 2`` or all points are equal.

    Raises:
        ValueError: for a non-2-D ``x`` or a non-positive ``eps``.
    """
    _check_points(x)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    n, d = x.shape
    if n < 2:
        return _nan(x)
    g = _centred_gram(x)
    tr = torch.diagonal(g).sum()
    if not bool(tr > 0):
        return _nan(x)
    m = g.shape[0]
    eye = torch.eye(m, dtype=g.dtype, device=g.device)
    logdet = torch.linalg.slogdet(g * (d / tr) + eps * eye)[1] + (d - m) * math.log(eps)
    return -logdet / d


def spectral_entropy_penalty(x: torch.Tensor) -> torch.Tensor:
    """Minus the spectral entropy (nats) of the centred covariance: ``-log`` of the effective rank.

    ``p_k = lambda_k / sum(lambda)`` over the covariance eigenvalues; penalty ``sum p_k log p_k``
    (Roy & Vetterli 2007 effective rank ``exp(-sum p log p)``). Lower means more spread.

    Args:
        x: ``(n, d)`` token states.

    Returns:
        A 0-d tensor in ``[-log min(n - 1, d), 0]``; NaN when ``n < 2`` or all points are equal.

    Raises:
        ValueError: for a non-2-D ``x``.
    """
    _check_points(x)
    if x.shape[0] < 2:
        return _nan(x)
    lam = torch.linalg.eigvalsh(_centred_gram(x)).clamp(min=0.0)
    total = lam.sum()
    if not bool(total > 0):
        return _nan(x)
    p = lam / total
    return (p * torch.log(p + _TINY)).sum()


def uniformity_penalty(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Uniformity loss of Wang & Isola (2020): ``log mean_{i<j} exp(-t ||z_i - z_j||^2)``, ``z = x/||x||``.

    Args:
        x: ``(n, d)`` token states (not centred; each row is normalised to unit length).
        t: temperature, positive (the paper uses 2).

    Returns:
        A 0-d tensor in ``[-4t, 0]``; NaN when ``n < 2``.

    Raises:
        ValueError: for a non-2-D ``x`` or a non-positive ``t``.
    """
    _check_points(x)
    if not t > 0:
        raise ValueError(f"t must be positive, got {t}")
    n = x.shape[0]
    if n < 2:
        return _nan(x)
    z = torch.nn.functional.normalize(x, dim=1, eps=_TINY)
    sq = torch.pdist(z).pow(2)
    return torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel())


def diversity_penalty(
    x: torch.Tensor, kind: str = "logdet", *, eps: float = 1e-4, t: float = 2.0
) -> torch.Tensor:
    """Dispatch to the penalty named ``kind`` (``"logdet"``, ``"entropy"`` or ``"uniformity"``).

    Args:
        x: ``(n, d)`` token states.
        kind: one of :data:`KINDS`.
        eps: ridge of ``"logdet"``.
        t: temperature of ``"uniformity"``.

    Returns:
        The penalty as a 0-d tensor (NaN where undefined).

    Raises:
        ValueError: for an unknown ``kind``.
    """
    if kind == "logdet":
        return logdet_penalty(x, eps)
    if kind == "entropy":
        return spectral_entropy_penalty(x)
    if kind == "uniformity":
        return uniformity_penalty(x, t)
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def select_tokens(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    skip_first_token: bool = True,
    max_tokens: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Flat indices (into ``hidden.reshape(-1, d)``) of the tokens a penalty is computed on.

    Args:
        hidden: ``(B, T, d)`` block output.
        attention_mask: ``(B, T)`` mask (nonzero = real token) or None (all tokens are real).
        skip_first_token: drop the first real token of each sequence (the BOS / massive-activation
            position; with left padding it is the first masked-in position, not position 0).
        max_tokens: keep at most this many, drawn uniformly without replacement (None: all).
        generator: CPU generator for that draw.

    Returns:
        A sorted 1-D int64 tensor on ``hidden.device``.

    Raises:
        ValueError: if the mask's shape is not ``hidden.shape[:2]``.
    """
    b, t = hidden.shape[:2]
    if attention_mask is None:
        keep = torch.ones((b, t), dtype=torch.bool, device=hidden.device)
    else:
        if tuple(attention_mask.shape) != (b, t):
            raise ValueError(
                f"attention_mask must have shape {(b, t)} to match hidden, got {tuple(attention_mask.shape)}"
            )
        keep = attention_mask.to(device=hidden.device) != 0
    if skip_first_token:
        first = keep & (keep.long().cumsum(dim=1) == 1)
        keep = keep & ~first
    idx = torch.nonzero(keep.reshape(-1), as_tuple=False).squeeze(1)
    if max_tokens is not None and idx.numel() > max_tokens:
        pick = torch.randperm(idx.numel(), generator=generator)[:max_tokens].to(idx.device)
        idx = idx[pick].sort().values
    return idx


class _AddGradient(torch.autograd.Function):
    """Identity forward; backward adds a precomputed gradient ``g`` at flat token rows ``idx``."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        # Plain attributes, not save_for_backward: nothing goes through checkpointing's saved-tensor hooks.
        ctx.idx, ctx.g = idx, g
        return h.view_as(h)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        d = grad_out.shape[-1]
        flat = grad_out.reshape(-1, d).index_add(0, ctx.idx, ctx.g.to(grad_out.dtype))
        return flat.view(grad_out.shape), None, None


def _decoder_owner(model: Any, layers: torch.nn.ModuleList) -> torch.nn.Module:
    for module in unwrap_model(model).modules():
        if any(child is layers for child in module.children()):
            return module
    raise ValueError(
        "cannot find the module that owns the decoder blocks (needed to read the attention mask)"
    )


class DiversityRegularizer:
    """Adds ``weight * mean_l P(h_l)`` to the training objective through forward hooks (see the module doc).

    Args:
        model: a causal LM (plain, PEFT-wrapped or DDP-wrapped).
        layers: decoder block indices (negative from the end) or ``"auto"``.
        weight: penalty weight, finite and non-negative; 0 switches the regulariser off.
        kind: ``"logdet"``, ``"entropy"`` or ``"uniformity"``.
        max_tokens: at most this many tokens per layer and forward, drawn at random.
        eps: ridge of ``"logdet"``.
        temperature: ``t`` of ``"uniformity"``.
        skip_first_token: leave out the first real token of each sequence.
        normalize_tokens: normalise each token state to unit length first (robust to outlier
            tokens) for ``"logdet"`` / ``"entropy"``.
        seed: seed of the token subsampling.

    Raises:
        ValueError: unknown kind, bad weight / max_tokens / layer index, or no decoder blocks.

    Example:
        >>> reg = DiversityRegularizer(model, layers=[-1], weight=0.0)  # doctest: +SKIP
        >>> reg.set_weight(0.1)  # on an alert; reg.last_value is logged  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        layers: Sequence[int] | str,
        weight: float = 0.0,
        kind: str = "logdet",
        max_tokens: int = 256,
        *,
        eps: float = 1e-4,
        temperature: float = 2.0,
        skip_first_token: bool = True,
        normalize_tokens: bool = False,
        seed: int = 0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
            raise ValueError(f"max_tokens must be an int >= 2, got {max_tokens!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        blocks = model_layout(model).blocks
        self.layers = resolve_layer_indices(layers, len(blocks))
        self.kind = kind
        self.max_tokens = max_tokens
        self.eps = float(eps)
        self.temperature = float(temperature)
        self.skip_first_token = bool(skip_first_token)
        self.normalize_tokens = bool(normalize_tokens)
        self._weight = 0.0
        self.set_weight(weight)
        self._gen = torch.Generator().manual_seed(int(seed))
        self._mask: torch.Tensor | None = None
        self._done: set[int] = set()
        self._values: dict[int, float] = {}
        self.last_values: dict[int, float] = {}
        self.n_applied = 0
        self._warned_mask = False
        owner = _decoder_owner(model, blocks)
        self._mask_param = self._mask_position(owner)
        self._handles = [owner.register_forward_pre_hook(self._pre_hook, with_kwargs=True)]
        for i in self.layers:
            self._handles.append(blocks[i].register_forward_hook(self._make_hook(i)))

    # ------------------------------------------------------------------ public state
    @property
    def weight(self) -> float:
        """Current penalty weight (0 = off)."""
        return self._weight

    def set_weight(self, weight: float) -> None:
        """Set the penalty weight; takes effect at the next forward.

        Raises:
            ValueError: for a negative or non-finite weight.
            TypeError: for a non-number.
        """
        self._weight = check_weight(weight)

    @property
    def last_value(self) -> float:
        """Mean penalty over the layers of the last forward it was applied in (NaN before any)."""
        vals = [v for v in self.last_values.values() if math.isfinite(v)]
        return sum(vals) / len(vals) if vals else float("nan")

    @property
    def hooked(self) -> bool:
        """Whether the hooks are installed (False after :meth:`remove`)."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook; the model behaves as if the regulariser had never been installed."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        """Plain-typed state (the weight; hooks and layers are configuration)."""
        return {"weight": self._weight, "kind": self.kind, "layers": list(self.layers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the weight."""
        self.set_weight(float(state.get("weight", self._weight)))

    # ------------------------------------------------------------------ hooks
    @staticmethod
    def _mask_position(owner: torch.nn.Module) -> int | None:
        try:
            params = list(inspect.signature(owner.forward).parameters)
        except (TypeError, ValueError):
            return None
        return params.index("attention_mask") if "attention_mask" in params else None

    def _pre_hook(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Only a forward that can be regularised starts a new round: a no-grad forward in between (the DPO
        # reference pass, a probe pass) must not reset the record a checkpoint recompute is checked against.
        if not (torch.is_grad_enabled() and module.training):
            return
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_param is not None and len(args) > self._mask_param:
            mask = args[self._mask_param]
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._done = set()
        self._values = {}

    def _active(self, module: torch.nn.Module, hidden: Any) -> bool:
        return (
            self._weight > 0
            and torch.is_grad_enabled()
            and module.training
            and isinstance(hidden, torch.Tensor)
            and hidden.requires_grad
            and hidden.dim() == 3
        )

    def _make_hook(self, layer: int) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            if not self._active(module, hidden) or layer in self._done:
                return None  # off, no-grad pass, eval, or the checkpoint recompute of a block already done
            self._done.add(layer)
            new = self._apply(layer, hidden)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def _apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        mask = self._mask
        if mask is not None and tuple(mask.shape) != tuple(hidden.shape[:2]):
            if not self._warned_mask:
                warnings.warn(
                    f"attention mask shape {tuple(mask.shape)} does not match hidden states "
                    f"{tuple(hidden.shape[:2])}; the diversity penalty uses all tokens",
                    stacklevel=2,
                )
                self._warned_mask = True
            mask = None
        idx = select_tokens(
            hidden,
            mask,
            skip_first_token=self.skip_first_token,
            max_tokens=self.max_tokens,
            generator=self._gen,
        )
        if idx.numel() < 2:
            return None
        d = hidden.shape[-1]
        # Own graph on a detached copy: float32, no autocast, and identity saved-tensor hooks so that
        # an enclosing non-reentrant checkpoint does not capture (and later recompute) these tensors.
        with (
            torch.enable_grad(),
            torch.autocast(hidden.device.type, enabled=False),
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
        ):
            x = hidden.detach().reshape(-1, d)[idx].float().requires_grad_(True)
            z = torch.nn.functional.normalize(x, dim=1, eps=_TINY) if self.normalize_tokens else x
            value = diversity_penalty(z, self.kind, eps=self.eps, t=self.temperature)
            if not bool(torch.isfinite(value)):
                self._record(layer, float("nan"))
                return None
            (grad,) = torch.autograd.grad(value, x)
        self._record(layer, float(value.detach()))
        self.n_applied += 1
        scale = self._weight / len(self.layers)
        return _AddGradient.apply(hidden, idx, grad * scale)

    def _record(self, layer: int, value: float) -> None:
        self._values[layer] = value
        self.last_values = dict(self._values)
