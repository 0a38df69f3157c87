"""How a capture step gets its points: a fixed probe set, or the training batches (passive).

A strategy hides the mode from the session: :meth:`arm` before a training step, :meth:`collect` at
its end. ``collect`` is collective: every rank calls it at the same step (one process is a world of
one, where the collectives return at once), every rank contributes its share, and the main process
gets the snapshot a one-process run would have made (None on the other ranks).
"""

from __future__ import annotations

import time
from typing import Any

from topomon.capture.passive import PassiveCapture
from topomon.capture.probe import ProbeCapture, TokenPlan
from topomon.distributed import Comm, merge_passive, merge_shards, shard_slots
from topomon.types import Snapshot

__all__ = ["CaptureStrategy", "ProbeStrategy", "PassiveStrategy"]


class CaptureStrategy:
    """The interface: ``takes_baseline``, :meth:`arm`, :meth:`collect`, :meth:`close`."""

    takes_baseline = False
    """Whether the strategy can capture outside a training step (the stage's step-0 baseline)."""

    def arm(self, step: int) -> None:
        """Prepare to capture during the training step that will be labelled ``step``."""

    def collect(self, comm: Comm, model: Any, step: int, stage: str) -> Snapshot | None:  # pragma: no cover
        """The snapshot of ``step`` on the main process, None elsewhere (collective).

        Raises:
            RuntimeError: the capture failed on some rank (raised on the main process only).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Remove what the strategy installed on the model."""

    def describe(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """What the capture takes, for ``run.json`` (the probe plan, or the passive point count)."""
        raise NotImplementedError


class ProbeStrategy(CaptureStrategy):
    """Forward the probe set: each rank its shard of the batches, merged back in plan order."""

    takes_baseline = True

    def __init__(self, probe: ProbeCapture):
        self.probe = probe

    @classmethod
    def build(
        cls, plan: TokenPlan, layer_indices: list[int], *, include_final_norm: bool, needs: frozenset[str]
    ) -> ProbeStrategy:
        """The probe capture of ``plan``, with the next-token statistics when a family ``needs`` them."""
        return cls(ProbeCapture(plan, layer_indices, include_final_norm, "logits" in needs))

    def describe(self) -> dict[str, Any]:
        """The token plan's description."""
        return self.probe.plan.describe()

    def collect(self, comm: Comm, model: Any, step: int, stage: str) -> Snapshot | None:
        """Forward this rank's probe batches, gather them, and assemble the snapshot (main process)."""
        t0 = time.perf_counter()
        slots = shard_slots(len(self.probe.plan.batches), comm.rank, comm.world)
        part: dict[str, Any]
        try:
            # several ranks make the same number of forwards (FSDP / ZeRO-3 gather inside each one)
            part = {"batches": self.probe.capture_batches(model, slots, lockstep=comm.world > 1)}
        except Exception as e:  # noqa: BLE001 - reported by the main process; this rank still gathers
            part = {"error": f"rank {comm.rank}: {type(e).__name__}: {e}"}
        parts = comm.gather(part)
        if parts is None:
            return None
        errors = [p["error"] for p in parts if "error" in p]
        if errors:
            raise RuntimeError(f"probe capture failed at step {step}: {'; '.join(errors)}")
        batches = merge_shards([p["batches"] for p in parts], len(self.probe.plan.batches))
        meta = {"ranks": len(parts)} if len(parts) > 1 else None
        seconds = time.perf_counter() - t0
        return self.probe.snapshot(
            batches, list(self.probe.modules(model)), step, stage, meta, seconds=seconds
        )


class PassiveStrategy(CaptureStrategy):
    """Hooks on the training forward; every rank's points are merged to the one-process budget."""

    def __init__(self, passive: PassiveCapture, model: Any, *, max_points: int, seed: int):
        self.passive = passive
        self.max_points = max_points
        self.seed = seed
        passive.attach(model)

    def describe(self) -> dict[str, Any]:
        """Every counted token of the training forward, subsampled."""
        return {"pooling": "all", "n_points": self.max_points}

    def arm(self, step: int) -> None:
        """Capture during the next training forward."""
        self.passive.arm(step)

    def collect(self, comm: Comm, model: Any, step: int, stage: str) -> Snapshot | None:
        """Disarm and gather every rank's capture; the main process merges them."""
        snap: Snapshot | None = None
        error = None
        try:
            snap = self.passive.collect(stage)
        except Exception as e:  # noqa: BLE001 - this rank still gathers (None)
            error = e
        snaps = comm.gather(snap)
        if error is not None and comm.is_main:
            raise error
        if snaps is None:
            return None
        # one process: the same points (a subsample of at most max_points is all of them)
        return merge_passive(snaps, max_points=self.max_points, seed=self.seed)

    def close(self) -> None:
        """Remove the hooks."""
        self.passive.detach()
