"""Passive capture: hooks on the training forward itself at capture steps (no extra forward).

Armed before a capture step, the hooks take the first forward of each chosen layer that runs with
gradients enabled (the training forward; a DPO reference forward or any no-grad pass is skipped),
subsample the counted tokens of that micro-batch, and detach them to CPU float32. Under gradient
checkpointing a layer's forward runs again in the backward recompute: only the first call counts.

When the families need logits, a hook on the model's forward reduces the training forward's own logits
at the captured positions of each micro-batch (:func:`~topomon.capture.logit_stats.reduce_logits`):
per-token next-token statistics against the forward's ``labels`` when it has them (else its
``input_ids``). They are the model's logits as it returns them, so whatever it does around its LM head
(MiniCPM3 rescales the head's input; Gemma 2 soft-caps, Cohere and Granite scale its output) is in them.
When the forward returns logits for the last positions only (GRPO keeps the completion's), the head
on the body's output is compared once with the model's logits at the last kept position: equal, the
captured positions of what the LM head read (else of the body's output) go through the head
(:func:`~topomon.capture.logit_stats.reduce_logits_from_hidden`); different (a transform around the
head), the model's own logits are reduced at the captured positions it kept, and only there (with a
warning). A forward with no logits (a fused LM-head loss) goes through the head as above, where a
transform after the head is not applied. Only ``O(tokens)`` numbers leave the device, in
``snapshot.extras["logits/<stat>"]``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from topomon.capture.layers import model_layout, unwrap_model
from topomon.capture.logit_stats import reduce_logits, reduce_logits_from_hidden
from topomon.capture.probe import _hidden, _runner
from topomon.metrics.preprocess import subsample_indices
from topomon.types import Snapshot

__all__ = ["PassiveCapture"]

logger = logging.getLogger("topomon")


class PassiveCapture:
    """Hooks that capture a subsample of training tokens at armed steps.

    Args:
        modules: layer name -> module to hook.
        max_points: tokens kept per layer (a seeded random subset of the counted positions).
        exclude_first: skip the first non-pad position of each sequence.
        seed: base seed; the subset of a step is drawn with ``seed + step``.
        needs: what the metric families need; with ``"logits"``, the training forward's logits are
            reduced at the captured positions too.
    """

    def __init__(
        self,
        modules: dict[str, torch.nn.Module],
        *,
        max_points: int,
        exclude_first: bool,
        seed: int,
        needs: frozenset[str] = frozenset(),
    ):
        self.modules = modules
        self.max_points = max_points
        self.exclude_first = exclude_first
        self.seed = seed
        self.logits = "logits" in needs
        self._targets: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        self._stats: dict[str, list[np.ndarray]] = {}
        self._head: Any = None
        self._read: dict[str, torch.Tensor] = {}  # this forward: "body" output, "head" input
        self._warned = False
        self._transform: bool | None = None  # the model's logits differ from its head on the body
        self._warned_window = False
        self._model_name = ""
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
        self._model_name, self._transform = type(base).__name__, None
        self._handles.append(base.register_forward_pre_hook(self._pre, with_kwargs=True))
        if self.logits:
            layout = model_layout(base)  # the one discovery: its LM head and the body that feeds it
            self._head = layout.head
            if self._head is None:
                self._warn("the model has no output embeddings (LM head)")
            else:
                runner = _runner(model, layout)  # the root under FSDP (a submodule sees only its shard)
                root = model if runner is model else base
                self._handles.append(root.register_forward_hook(self._logits))
                if runner is not model:  # for a forward that returns no full logits
                    self._handles.append(layout.body.register_forward_hook(self._keep_body))
                    self._handles.append(self._head.register_forward_pre_hook(self._keep_head))
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
        self._stats = {}
        self._read = {}
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
        labels = kwargs.get("labels")
        self._targets = (ids, kwargs.get("attention_mask"), labels) if isinstance(ids, torch.Tensor) else None
        self._seconds += time.perf_counter() - t0

    def _keep_body(self, _module: Any, _args: Any, out: Any) -> None:
        if self._armed_step is not None and torch.is_grad_enabled() and "body" not in self._read:
            self._read["body"] = _hidden(out).detach()

    def _keep_head(self, _module: Any, args: tuple[Any, ...]) -> None:
        if self._armed_step is not None and torch.is_grad_enabled() and "head" not in self._read:
            if args and isinstance(args[0], torch.Tensor):
                self._read["head"] = args[0].detach()

    def _logits(self, _module: Any, _args: Any, out: Any) -> None:
        """The training forward's logits -> statistics at the captured positions."""
        targets, self._targets = self._targets, None
        read, self._read = self._read, {}
        rows, cols = self._rows, self._cols
        if self._armed_step is None or rows is None or cols is None or not torch.is_grad_enabled():
            return
        t0 = time.perf_counter()
        try:
            if targets is None:
                raise ValueError("the training forward was given no input_ids")
            ids, mask, labels = targets
            logits = getattr(out, "logits", None)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[0] != ids.shape[0]:
                logits = None
            if logits is not None and logits.shape[1] == ids.shape[1]:
                stats = reduce_logits(logits.detach(), ids, mask, labels=labels, at=(rows, cols))
            elif logits is not None and logits.shape[1] < ids.shape[1] and self._transforms(read, logits):
                stats = self._kept_window(logits.detach(), ids, mask, labels, rows, cols)
            else:  # no logits for every position: the head on what it read (else on the body's output)
                head = read.get("head")
                hidden = head if head is not None and head.shape[:2] == ids.shape else read.get("body")
                if hidden is None:
                    raise ValueError("the forward returned no logits for every position, and ran no LM head")
                stats = reduce_logits_from_hidden(
                    hidden, self._head, ids, mask, labels=labels, at=(rows, cols)
                )
        except (TypeError, ValueError, RuntimeError) as e:  # e.g. embeddings given instead of ids
            self._warn(str(e))
            return
        for k, v in stats.items():
            self._stats.setdefault(k, []).append(v)
        self._seconds += time.perf_counter() - t0

    def _transforms(self, read: dict[str, torch.Tensor], logits: torch.Tensor) -> bool:
        """Whether the model's logits differ from its LM head on the body's output (checked once).

        On the last position the forward kept: Gemma 2's soft-cap, Cohere's and Granite's scales and
        MiniCPM3's scaled head input all show there.
        """
        if self._transform is None:
            body = read.get("body")
            if body is None or body.shape[0] != logits.shape[0]:
                return False  # nothing to compare with: the head on the hidden state, as before
            with torch.no_grad():
                mine = self._head(body[:1, -1:]).float()
            self._transform = not torch.allclose(mine, logits[:1, -1:].float(), rtol=1e-3, atol=1e-4)
        return self._transform

    def _kept_window(
        self,
        logits: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        rows: torch.Tensor,
        cols: torch.Tensor,
    ) -> dict[str, np.ndarray]:
        """The statistics of the captured positions among the last ones the forward kept logits for.

        For a model that transforms around its LM head while the forward keeps the logits of the last
        positions only (GRPO's ``logits_to_keep``): its own logits, where they exist.
        """
        off = ids.shape[1] - logits.shape[1]
        if not self._warned_window:
            self._warned_window = True
            logger.warning(
                "topomon: %s transforms around its LM head and its training forward returns logits for "
                "the last %d of %d positions: passive next-token statistics are of those positions only",
                self._model_name,
                logits.shape[1],
                ids.shape[1],
            )
        keep = cols.to(ids.device) >= off
        at = (rows.to(ids.device)[keep], cols.to(ids.device)[keep] - off)
        mask = None if mask is None else mask[:, off:]
        labels = None if labels is None else labels[:, off:]
        return reduce_logits(logits, ids[:, off:], mask, labels=labels, at=at)

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "topomon: passive mode cannot take the next-token statistics of the training forward "
                "(%s): the logits family gets none; set logits=False, or use mode='probe'",
                why,
            )

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
        stats, self._stats = self._stats, {}
        extras = {f"logits/{k}": np.concatenate(v) for k, v in stats.items()}
        snap = Snapshot(step=step, stage=stage, layers=layers, extras=extras)
        snap.meta.update(
            {
                "capture_seconds": self._seconds,
                "n_points": len(next(iter(layers.values()))),
                "micro_batches": self._forwards,
            }
        )
        return snap
