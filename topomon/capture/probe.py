"""Probe-mode capture: a fixed probe set through the model, no grad, eval mode, at capture steps.

The probe texts are tokenised once, and the token positions that become points are chosen once
(``TokenPlan``), so every capture of a run measures the same tokens: changes between captures
measure the model, not the sampling (RESEARCH.md: two random subsamples of one unchanged model
differ by more than any SFT step).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from topomon.capture.layers import ModelLayout, model_layout
from topomon.capture.logit_stats import reduce_logits, reduce_logits_from_hidden
from topomon.metrics.preprocess import subsample_indices
from topomon.types import Snapshot

__all__ = ["TokenPlan", "plan_tokens", "ProbeCapture", "hooked_outputs", "logits_are_head_of_body"]

logger = logging.getLogger("topomon")


@dataclass
class TokenPlan:
    """Tokenised probe batches and the fixed positions that become points.

    Attributes:
        batches: per batch, ``(input_ids, attention_mask)`` CPU int64 tensors, right-padded.
        order: the probe index of each row, batch after batch (texts are sorted by length).
        select: per batch, what pooling takes: for "all" a ``(k, 2)`` tensor of (row, position);
            for "last" a ``(B,)`` tensor of positions; for "mean" a ``(B, T)`` float weight mask.
        pooling: "all", "last" or "mean".
        n_points: points per layer at each capture.
        n_tokens: non-pad tokens in the probe set.
    """

    batches: list[tuple[torch.Tensor, torch.Tensor]]
    order: list[int]
    select: list[torch.Tensor]
    pooling: str
    n_points: int
    n_tokens: int

    def describe(self) -> dict[str, Any]:
        """JSON-able facts to store with the run."""
        return {
            "pooling": self.pooling,
            "n_probes": len(self.order),
            "n_tokens": self.n_tokens,
            "n_points": self.n_points,
            "n_batches": len(self.batches),
        }


def _tokenizer_of(processing_class: Any) -> Any:
    tok = getattr(processing_class, "tokenizer", None)  # multimodal processors wrap a tokenizer
    return tok if tok is not None else processing_class


def plan_tokens(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int,
    pooling: str,
    max_points: int,
    exclude_first: bool,
    seed: int,
) -> TokenPlan:
    """Tokenise the probe texts and fix the positions to capture.

    Raises:
        ValueError: when no token is left to capture (texts too short once the first position
            is excluded).
    """
    tok = _tokenizer_of(tokenizer)
    if tok is None or not callable(tok):
        raise ValueError("probe mode needs a tokenizer: pass processing_class to the trainer or tokenizer=")
    ids = [list(tok(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts]
    first = 1 if exclude_first else 0
    keep = [i for i, x in enumerate(ids) if len(x) > first]
    if not keep:
        raise ValueError("every probe text is shorter than 2 tokens; give longer probe texts")
    order = sorted(keep, key=lambda i: (len(ids[i]), i))
    pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0
    batches = []
    for s in range(0, len(order), batch_size):
        rows = [ids[i] for i in order[s : s + batch_size]]
        width = max(len(r) for r in rows)
        inp = torch.full((len(rows), width), int(pad), dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for r, x in enumerate(rows):
            inp[r, : len(x)] = torch.tensor(x, dtype=torch.long)
            att[r, : len(x)] = 1
        batches.append((inp, att))
    n_tokens = sum(len(ids[i]) for i in order)
    select: list[torch.Tensor] = []
    if pooling == "all":
        coords = [
            (b, r, p)
            for b, (_, att) in enumerate(batches)
            for r in range(att.shape[0])
            for p in range(first, int(att[r].sum()))
        ]
        chosen = subsample_indices(len(coords), max_points, seed)
        per_batch: list[list[tuple[int, int]]] = [[] for _ in batches]
        for j in chosen:
            b, r, p = coords[int(j)]
            per_batch[b].append((r, p))
        select = [torch.tensor(x, dtype=torch.long).reshape(-1, 2) for x in per_batch]
        n_points = len(chosen)
    elif pooling == "last":
        select = [att.sum(dim=1) - 1 for _, att in batches]
        n_points = len(order)
    elif pooling == "mean":
        for _, att in batches:
            w = att.clone().float()
            w[:, :first] = 0.0
            select.append(w / w.sum(dim=1, keepdim=True))
        n_points = len(order)
    else:
        raise ValueError(f"pooling must be 'all', 'last' or 'mean', got {pooling!r}")
    return TokenPlan(batches, order, select, pooling, n_points, n_tokens)


def _hidden(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hs = getattr(output, "last_hidden_state", None)
    if isinstance(hs, torch.Tensor):
        return hs
    raise TypeError(f"cannot find the hidden state in a module output of type {type(output).__name__}")


@contextlib.contextmanager
def hooked_outputs(modules: dict[str, torch.nn.Module], fn: Any) -> Iterator[None]:
    """Call ``fn(name, hidden)`` on every forward of the named modules while the context is open."""
    handles = []
    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_hook(lambda _m, _i, out, _n=name: fn(_n, _hidden(out))))
        yield
    finally:
        for h in handles:
            h.remove()


def _is_fsdp(module: Any) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return isinstance(module, (FSDPModule, FullyShardedDataParallel))


def _runner(model: Any, layout: ModelLayout) -> Any:
    """What probe batches run through: the body without the LM head, or the root under FSDP.

    FSDP's root forward gathers the parameters; a submodule called on its own would see only its shard.
    """
    if _is_fsdp(model) or _is_fsdp(layout.model):
        return model
    return layout.body


def _to_host(parts: list[dict[str, Any] | None]) -> list[dict[str, np.ndarray] | None]:
    """Move the captured tensors to host numpy arrays.

    On a GPU: asynchronous copies into pinned buffers and a single synchronisation, instead of one
    blocking copy per layer and batch.
    """
    tensors = [v for p in parts if p is not None for v in p.values() if isinstance(v, torch.Tensor)]
    on_gpu = any(t.device.type == "cuda" for t in tensors)
    host: dict[int, torch.Tensor] = {}
    for t in tensors:
        if t.device.type == "cuda":
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            buf.copy_(t, non_blocking=True)
            host[id(t)] = buf
        else:
            host[id(t)] = t.cpu()
    if on_gpu:
        torch.cuda.synchronize()
    out: list[dict[str, np.ndarray] | None] = []
    for p in parts:
        if p is None:
            out.append(None)
            continue
        out.append({k: host[id(v)].numpy() if isinstance(v, torch.Tensor) else v for k, v in p.items()})
    return out


@torch.no_grad()
def logits_are_head_of_body(layout: ModelLayout, ids: torch.Tensor) -> bool:
    """Whether the model's logits are its LM head on the body's output as it is (one short forward).

    In most causal LMs the head reads the body's last hidden state (``final_norm``) and its output is the
    logits. Some transform on either side of the head: MiniCPM3 and Inkling divide its input, NeoMMe
    projects it; Gemma 2 soft-caps its output, Cohere, Granite and Falcon-H1 scale it. Their next-token
    statistics then cannot be computed from ``final_norm`` through the head alone.

    Args:
        layout: the model's layout.
        ids: ``(1, t)`` token ids on the model's device.
    """
    if layout.head is None or layout.decoder is None:
        return False
    seen: dict[str, Any] = {}

    def keep(name: str, h: Any) -> None:  # a hook that returns nothing changes nothing
        seen.setdefault(name, h)

    handles = [
        layout.head.register_forward_pre_hook(lambda _m, args: keep("head", args[0])),
        layout.head.register_forward_hook(lambda _m, _a, out: keep("head_out", out)),
        layout.decoder.register_forward_hook(lambda _m, _a, out: keep("body", _hidden(out))),
    ]
    try:
        result = layout.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    head, body, head_out = seen.get("head"), seen.get("body"), seen.get("head_out")
    logits = getattr(result, "logits", None)
    return (
        isinstance(head, torch.Tensor)
        and isinstance(body, torch.Tensor)
        and head.shape == body.shape
        and torch.equal(head, body)
        and isinstance(head_out, torch.Tensor)
        and isinstance(logits, torch.Tensor)
        and head_out.shape == logits.shape
        and torch.equal(head_out.to(logits.dtype), logits)
    )


class ProbeCapture:
    """Runs the probe set through a model and returns a :class:`Snapshot` of the chosen layers.

    Args:
        plan: the token plan (fixed for the run).
        layer_indices: decoder block indices to capture.
        include_final_norm: also capture the LM head's input (``"final_norm"``: the final norm's output).
        logits: also reduce the next-token predictions on the probe set to per-token statistics
            (entropy, top-1 probability, correctness, NLL) in ``snapshot.extras["logits/..."]``,
            from the same forward, by chunks through the LM head (never ``B * T * V`` at once).
    """

    def __init__(
        self,
        plan: TokenPlan,
        layer_indices: Sequence[int],
        include_final_norm: bool = True,
        logits: bool = False,
    ):
        self.plan = plan
        self.layer_indices = list(layer_indices)
        self.include_final_norm = include_final_norm
        self.logits = logits
        self._logits_from_body: dict[int, bool] = {}

    def modules(self, model: Any) -> dict[str, torch.nn.Module]:
        """The modules hooked at a capture, by layer name."""
        return model_layout(model).capture_modules(self.layer_indices, self.include_final_norm)

    @torch.no_grad()
    def capture(self, model: Any, step: int, stage: str, meta: dict[str, Any] | None = None) -> Snapshot:
        """Forward the probe set (eval mode, no grad; train mode restored) and collect the points."""
        t0 = time.perf_counter()
        parts = self.capture_batches(model, range(len(self.plan.batches)))
        seconds = time.perf_counter() - t0
        return self.snapshot(parts, list(self.modules(model)), step, stage, meta, seconds=seconds)

    @torch.no_grad()
    def capture_batches(
        self, model: Any, indices: Sequence[int | None], *, lockstep: bool = False
    ) -> list[dict[str, np.ndarray] | None]:
        """Forward some probe batches (eval mode, no grad; train mode restored) and return their points.

        One process forwards every batch; under several processes each rank forwards its shard
        (:func:`topomon.distributed.shard_slots`) and the main process reassembles them.

        Args:
            model: the model (DDP / FSDP / PEFT wrapped or not).
            indices: probe batch indices, in the order to run; None is a padding slot.
            lockstep: make exactly one forward per entry of ``indices``, a one-token padding forward
                for a None slot or a batch without chosen points, so that every rank makes the same
                number of forwards (FSDP / ZeRO-3 gather parameters inside each forward); without it
                those are skipped.

        Returns:
            Per entry of ``indices``: layer name -> ``(k, d)`` float32 points of that batch, or None
            for a padding slot or a batch without chosen points.

        Raises:
            ValueError: an index outside the plan's batches.
        """
        n = len(self.plan.batches)
        bad = [i for i in indices if i is not None and not (isinstance(i, int) and 0 <= i < n)]
        if bad:
            raise ValueError(f"indices must be batch indices in [0, {n}) or None, got {bad[0]!r}")
        layout = model_layout(model)
        base = layout.model
        runner = _runner(model, layout)
        device = next(base.parameters()).device
        mods = layout.capture_modules(self.layer_indices, self.include_final_norm)
        current: dict[str, Any] = {"select": None, "points": {}}

        def take(name: str, h: torch.Tensor) -> None:
            sel = current["select"]
            if sel is None:  # a padding forward
                return
            if self.plan.pooling == "all":
                sel = sel.to(h.device)
                pts = h[sel[:, 0], sel[:, 1]]
            elif self.plan.pooling == "last":
                pts = h[torch.arange(h.shape[0], device=h.device), sel.to(h.device)]
            else:
                pts = torch.einsum("bt,btd->bd", sel.to(h.device, torch.float32), h.float())
            # stays on the device until the last batch: one copy and one synchronisation per capture
            current["points"][name] = pts.detach().to(torch.float32)

        head = layout.head if self.logits else None
        pad = self.plan.batches[0][0][:1, :1]
        out: list[dict[str, np.ndarray] | None] = []
        was_training = model.training
        model.eval()
        try:
            if (
                head is not None
                and runner is layout.body
                and not self._logits_from_body_output(layout, pad.to(device))
            ):
                runner = base  # a transform around the head: the model computes its own logits
            with hooked_outputs(mods, take):
                for i in indices:
                    sel = self.plan.select[i] if i is not None else None
                    if i is None or sel is None or (self.plan.pooling == "all" and sel.shape[0] == 0):
                        out.append(None)
                        if lockstep:
                            current["select"] = None
                            runner(
                                input_ids=pad.to(device),
                                attention_mask=torch.ones_like(pad).to(device),
                                use_cache=False,
                            )
                        continue
                    inp, att = self.plan.batches[i]
                    current["select"], current["points"] = sel, {}
                    result = runner(input_ids=inp.to(device), attention_mask=att.to(device), use_cache=False)
                    logits = getattr(result, "logits", None)  # the FSDP root runs the LM head itself
                    # pooling "all": the logit metrics describe the captured tokens only (4x fewer
                    # than the probe's by default; the LM head then runs on them alone, below)
                    at = (sel[:, 0], sel[:, 1]) if self.plan.pooling == "all" else None
                    if head is not None and isinstance(logits, torch.Tensor):
                        stats = reduce_logits(logits, inp.to(device), att.to(device), at=at)
                        current["points"].update({f"logits/{k}": v for k, v in stats.items()})
                    elif head is not None:
                        stats = reduce_logits_from_hidden(
                            _hidden(result), head, inp.to(device), att.to(device), at=at
                        )
                        current["points"].update({f"logits/{k}": v for k, v in stats.items()})
                    out.append(current["points"])
        finally:
            current["select"] = None
            model.train(was_training)
        return _to_host(out)

    def _logits_from_body_output(self, layout: ModelLayout, ids: torch.Tensor) -> bool:
        """Whether the logits are the LM head on the body's output (checked once per model, else warned)."""
        key = id(layout.model)
        if key not in self._logits_from_body:
            same = logits_are_head_of_body(layout, ids)
            if not same:
                logger.warning(
                    "topomon: %s transforms the input or the output of its LM head; the probe forward "
                    "runs the whole model (the head on every position) for the next-token metrics",
                    type(layout.model).__name__,
                )
            self._logits_from_body[key] = same
        return self._logits_from_body[key]

    def snapshot(
        self,
        parts: Sequence[dict[str, np.ndarray] | None],
        names: Sequence[str],
        step: int,
        stage: str,
        meta: dict[str, Any] | None = None,
        *,
        seconds: float = 0.0,
    ) -> Snapshot:
        """Assemble per-batch points, in plan order, into the capture's :class:`Snapshot`.

        Args:
            parts: per probe batch, in plan order, what :meth:`capture_batches` returned for it.
            names: the captured layer names (a layer without points becomes a ``(0, 0)`` array).
            step: global step of the capture.
            stage: stage name.
            meta: extra metadata (the plan's description and ``capture_seconds`` are added).
            seconds: the capture's duration.

        Returns:
            The snapshot: per layer the batches' points concatenated in plan order.
        """
        layers: dict[str, np.ndarray] = {}
        for name in names:
            chunks = [p[name] for p in parts if p is not None and name in p]
            layers[name] = np.concatenate(chunks, axis=0) if chunks else np.zeros((0, 0), np.float32)
        extra_keys = sorted({k for p in parts if p is not None for k in p if k.startswith("logits/")})
        extras = {k: np.concatenate([p[k] for p in parts if p is not None and k in p]) for k in extra_keys}
        info = dict(meta or {})
        info.update(self.plan.describe())
        info["capture_seconds"] = float(seconds)
        return Snapshot(step=int(step), stage=stage, layers=layers, extras=extras, meta=info)
