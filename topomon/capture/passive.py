"""Passive capture: hooks on the training forward itself at capture steps (no extra forward).

Armed before a capture step, the hooks take the first forward of each chosen layer that runs with
gradients enabled (the training forward; a DPO reference forward or any no-grad pass is skipped),
subsample the counted tokens of that micro-batch, and detach them to CPU float32. Under gradient
checkpointing a layer's forward runs again in the backward recompute: only the first call counts.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from topomon.capture.layers import unwrap_model
from topomon.capture.probe import _hidden
from topomon.metrics.preprocess import subsample_indices
from topomon.types import Snapshot

__all__ = ["PassiveCapture"]


class PassiveCapture:
    """Hooks that capture a subsample of training tokens at armed steps.

    Args:
        modules: layer name -> module to hook.
        max_points: tokens kept per layer (a seeded random subset of the counted positions).
        exclude_first: skip the first non-pad position of each sequence.
        seed: base seed; the subset of a step is drawn with ``seed + step``.
    """

    def __init__(
        self, modules: dict[str, torch.nn.Module], *, max_points: int, exclude_first: bool, seed: int
    ):
        self.modules = modules
        self.max_points = max_points
        self.exclude_first = exclude_first
        self.seed = seed
        self._handles: list[Any] = []
        self._armed_step: int | None = None
        self._mask: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._cols: torch.Tensor | None = None
        self._forwards = 0  # training forwards seen in the armed step (micro-batches)
        self._taken: set[str] = set()  # layers taken in the current forward
        self._parts: dict[str, list[np.ndarray]] = {}
        self._t0 = 0.0
        self._seconds = 0.0

    def attach(self, model: Any) -> None:
        """Register the hooks (they do nothing until :meth:`arm`)."""
        self.detach()
        base = unwrap_model(model)
        self._handles.append(base.register_forward_pre_hook(self._pre, with_kwargs=True))
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(lambda _m, _i, out, _n=name: self._take(_n, out)))

    def detach(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def arm(self, step: int) -> None:
        """Capture during the next training forward, labelled ``step``."""
        self._armed_step = step
        self._mask = None
        self._rows = self._cols = None
        self._forwards = 0
        self._taken = set()
        self._parts = {}
        self._seconds = 0.0

    @property
    def armed(self) -> bool:
        """True between :meth:`arm` and :meth:`collect`."""
        return self._armed_step is not None

    def _pre(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._armed_step is None or not torch.is_grad_enabled():
            return
        t0 = time.perf_counter()
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if mask is None and isinstance(ids, torch.Tensor):
            mask = torch.ones_like(ids)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return
        m = mask.detach().to("cpu").bool().clone()
        if self.exclude_first:
            first = m.float().argmax(dim=1)  # first non-pad position (left or right padding)
            m[torch.arange(m.shape[0]), first] = False
        rows, cols = m.nonzero(as_tuple=True)
        # every micro-batch of the step (gradient accumulation) gets its own seeded draw; the
        # first one's is that of a step without accumulation
        g = torch.Generator().manual_seed(self.seed + self._armed_step + (self._forwards << 32))
        self._forwards += 1
        self._taken = set()
        if len(rows) > self.max_points:
            keep = torch.randperm(len(rows), generator=g)[: self.max_points].sort().values
            rows, cols = rows[keep], cols[keep]
        self._rows, self._cols = rows, cols
        self._seconds += time.perf_counter() - t0

    def _take(self, name: str, out: Any) -> None:
        if (
            self._armed_step is None
            or self._rows is None
            or name in self._taken
            or not torch.is_grad_enabled()
        ):
            return
        t0 = time.perf_counter()
        h = _hidden(out)
        if h.dim() != 3:
            return
        rows, cols = self._rows.to(h.device), self._cols.to(h.device)  # type: ignore[union-attr]
        self._parts.setdefault(name, []).append(h.detach()[rows, cols].to("cpu", torch.float32).numpy())
        self._taken.add(name)
        self._seconds += time.perf_counter() - t0

    def collect(self, stage: str) -> Snapshot | None:
        """Disarm and return the snapshot of the armed step (None if no training forward ran).

        The points of every micro-batch of the step are pooled, then a fixed seeded subset of
        ``max_points`` is kept (:func:`~topomon.metrics.preprocess.subsample_indices`).
        """
        step, self._armed_step = self._armed_step, None
        parts, self._parts = self._parts, {}
        if step is None or not parts:
            return None
        layers = {}
        for name, chunks in parts.items():
            points = np.concatenate(chunks, axis=0)
            layers[name] = points[subsample_indices(len(points), self.max_points, self.seed + step)]
        snap = Snapshot(step=step, stage=stage, layers=layers)
        snap.meta.update(
            {
                "capture_seconds": self._seconds,
                "n_points": len(next(iter(layers.values()))),
                "micro_batches": self._forwards,
            }
        )
        return snap
