"""The monitor under several processes (DDP, FSDP, DeepSpeed; ``torchrun`` or ``accelerate launch``).

One rule keeps a multi-process job from hanging: every collective call is made by every rank at the
same event, decided by the schedule and the global step only, never inside a branch that only the
main process takes (TRL #7310, unsloth-zoo #873). Local work between two collectives is wrapped, so
a rank that fails still makes the next call, carrying its error instead of its data.

- :class:`Comm`: gather / broadcast of picklable objects on topomon's own gloo group (CPU, with a
  timeout, separate from the training's NCCL group); every call is a no-op in one process. A
  collective that fails or times out marks the ``Comm`` broken: later calls fail at once (no rank
  waits again) and the monitor stops capturing.
- :func:`shard_slots` / :func:`merge_shards`: rank ``r`` of ``W`` forwards probe batches
  ``r, r + W, ...``, padded so every rank makes the same number of forwards (FSDP and ZeRO-3 need
  every rank in every forward); the main process puts the batches back in plan order, so it sees the
  same points in the same order as a one-process run.
- :func:`merge_passive`: passive captures of every rank, concatenated in rank order and subsampled
  to the one-process point budget.

Only the main process computes metrics, writes files and decides on alerts.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from topomon._validate import check_int
from topomon.metrics.preprocess import subsample_indices
from topomon.types import Snapshot

__all__ = [
    "DEFAULT_TIMEOUT",
    "TIMEOUT_ENV",
    "CollectiveError",
    "rank",
    "world_size",
    "Comm",
    "shard_slots",
    "merge_shards",
    "merge_passive",
]

logger = logging.getLogger("topomon")

DEFAULT_TIMEOUT = 600.0
"""Seconds a topomon collective waits for the other ranks before it fails (not the training's timeout)."""

TIMEOUT_ENV = "TOPOMON_DIST_TIMEOUT"
"""Environment variable that overrides :data:`DEFAULT_TIMEOUT` (seconds)."""

T = TypeVar("T")


class CollectiveError(RuntimeError):
    """A topomon collective failed or timed out; the monitor's collectives are off from then on."""


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def rank() -> int:
    """The global rank of this process (0 without ``torch.distributed``)."""
    dist = _dist()
    return int(dist.get_rank()) if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without ``torch.distributed``)."""
    dist = _dist()
    return int(dist.get_world_size()) if dist.is_available() and dist.is_initialized() else 1


def _resolve_timeout(timeout: float | None) -> float:
    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if raw is None or raw == "":
            return DEFAULT_TIMEOUT
        try:
            timeout = float(raw)
        except ValueError:
            raise ValueError(f"${TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
        where = f"${TIMEOUT_ENV}"
    else:
        where = "timeout"
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{where} must be a number of seconds, got {timeout!r}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"{where} must be a finite number of seconds > 0, got {timeout!r}")
    return float(timeout)


class Comm:
    """Object collectives of the monitor; no-ops when there is one process.

    Constructing it with several processes is itself collective (it creates a gloo group): every
    rank must construct it at the same point. Objects travel pickled through CPU memory (gloo), so a
    GPU job's NCCL group and GPU memory are not involved.

    Args:
        timeout: seconds each collective waits for the other ranks; None reads ``$TOPOMON_DIST_TIMEOUT``
            or uses :data:`DEFAULT_TIMEOUT` (600 s).

    Raises:
        ValueError: a timeout that is not a finite positive number.
        TypeError: a timeout that is not a number.
        CollectiveError: the group could not be created (a rank is missing).

    Example:
        >>> comm = Comm()  # one process: rank 0 of 1, every call returns at once
        >>> comm.gather({"points": 3})
        [{'points': 3}]
    """

    def __init__(self, timeout: float | None = None):
        self.timeout = _resolve_timeout(timeout)
        self.rank = rank()
        self.world = world_size()
        self.broken: str | None = None
        self._group: Any = None
        self._device = "cpu"  # of tensor collectives; a GPU only when falling back to an NCCL default group
        if self.world > 1:
            dist = _dist()
            try:
                self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout))
            except Exception as e:  # noqa: BLE001 - a torch build without gloo: use the default group
                if isinstance(e, (RuntimeError, ValueError)) and "gloo" in str(e).lower():
                    logger.warning("topomon: no gloo group (%s); collectives use the default group", e)
                    self._group = None
                    if dist.get_backend() == "nccl":
                        import torch

                        self._device = f"cuda:{torch.cuda.current_device()}"
                else:
                    raise CollectiveError(
                        f"topomon could not create its process group: {type(e).__name__}: {e}"
                    ) from e

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that computes, writes and decides."""
        return self.rank == 0

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        if self.broken is not None:
            raise CollectiveError(f"topomon collectives are off since an earlier failure ({self.broken})")
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - any failure of a collective breaks the protocol
            self.broken = f"{what} on rank {self.rank}: {type(e).__name__}: {e}"
            raise CollectiveError(
                f"topomon: {self.broken}; a rank did not take part within {self.timeout:g}s "
                "(every process must run the same TopoMonitor); the monitor stops capturing"
            ) from e

    def broadcast(self, obj: T, src: int = 0) -> T:
        """Return rank ``src``'s ``obj`` on every rank (the others' ``obj`` is ignored).

        Raises:
            CollectiveError: the broadcast failed or timed out, or an earlier collective did.
        """
        if self.world == 1:
            return obj

        def go() -> T:
            box: list[Any] = [obj if self.rank == src else None]
            _dist().broadcast_object_list(box, src=src, group=self._group)
            return box[0]

        return self._run("broadcast", go)

    def broadcast_int(self, value: int, src: int = 0) -> int:
        """Return rank ``src``'s ``value`` on every rank: one int64 tensor, cheaper than :meth:`broadcast`.

        Raises:
            CollectiveError: the broadcast failed or timed out, or an earlier collective did.
        """
        if self.world == 1:
            return int(value)

        def go() -> int:
            import torch

            t = torch.tensor([int(value) if self.rank == src else 0], dtype=torch.int64, device=self._device)
            _dist().broadcast(t, src=src, group=self._group)
            return int(t.item())

        return self._run("broadcast", go)

    def gather(self, obj: T, dst: int = 0) -> list[T] | None:
        """Every rank's ``obj``, in rank order, on rank ``dst``; None on the other ranks.

        Raises:
            CollectiveError: the gather failed or timed out, or an earlier collective did.
        """
        if self.world == 1:
            return [obj]

        def go() -> list[T] | None:
            out: list[Any] | None = [None] * self.world if self.rank == dst else None
            _dist().gather_object(obj, out, dst=dst, group=self._group)
            return out

        return self._run("gather", go)

    def close(self) -> None:
        """Release topomon's own process group; no collective follows.

        No gloo thread of it is left to the interpreter's exit, where destroying it can abort the
        process ("terminate called without an active exception").
        """
        group, self._group = self._group, None
        self.broken = self.broken or "closed"
        if group is not None:
            try:
                _dist().destroy_process_group(group)
            except Exception as e:  # noqa: BLE001 - at worst the group lives until exit, as before
                logger.debug("topomon: could not destroy its process group: %s", e)

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank.

        Raises:
            CollectiveError: the all-gather failed or timed out, or an earlier collective did.
        """
        if self.world == 1:
            return [obj]

        def go() -> list[T]:
            out: list[Any] = [None] * self.world
            _dist().all_gather_object(out, obj, group=self._group)
            return out

        return self._run("all_gather", go)


def _check_int(name: str, value: Any, low: int) -> int:
    return check_int(name, value, low, quote=False)


def shard_slots(n_items: int, rank: int, world: int) -> list[int | None]:
    """The items rank ``rank`` of ``world`` processes: ``rank, rank + world, ...``, padded with None.

    Every rank gets ``ceil(n_items / world)`` slots, so every rank makes the same number of forwards
    (a None slot is a padding forward whose output is dropped).

    Args:
        n_items: number of items (probe batches), >= 0.
        rank: this process's rank, in ``[0, world)``.
        world: number of processes, >= 1.

    Returns:
        A list of item indices or None, of length ``ceil(n_items / world)``.

    Raises:
        ValueError: a negative count, a world size below 1, or a rank outside ``[0, world)``.

    Example:
        >>> shard_slots(5, 1, 2)
        [1, 3, None]
    """
    n_items = _check_int("n_items", n_items, 0)
    world = _check_int("world", world, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    n_slots = -(-n_items // world)
    return [i if i < n_items else None for i in (rank + j * world for j in range(n_slots))]


def merge_shards(shards: Sequence[Sequence[T]], n_items: int) -> list[T]:
    """Put gathered shards back in item order: the inverse of :func:`shard_slots`.

    Args:
        shards: per rank (in rank order), the results of its slots, in slot order (padding slots
            included; their results are dropped).
        n_items: the number of items that were sharded.

    Returns:
        The ``n_items`` results, item 0 first: what one process going through the items in order
        would have produced.

    Raises:
        ValueError: a shard whose length is not the slot count of its rank.

    Example:
        >>> merge_shards([["a", "c", "e"], ["b", "d", None]], 5)
        ['a', 'b', 'c', 'd', 'e']
    """
    world = len(shards)
    if world < 1:
        raise ValueError("shards must hold one entry per rank, got none")
    out: list[Any] = [None] * _check_int("n_items", n_items, 0)
    for r, shard in enumerate(shards):
        slots = shard_slots(n_items, r, world)
        if len(shard) != len(slots):
            raise ValueError(f"shards[{r}] must hold {len(slots)} results (its slots), got {len(shard)}")
        for item, result in zip(slots, shard, strict=True):
            if item is not None:
                out[item] = result
    return out


def merge_passive(snaps: Sequence[Snapshot | None], *, max_points: int, seed: int) -> Snapshot | None:
    """One snapshot from every rank's passive capture of the same step.

    Per layer, the ranks' points are concatenated in rank order, then a fixed subsample of
    ``max_points`` (:func:`~topomon.metrics.preprocess.subsample_indices` with ``seed + step``) keeps
    the worker's cost that of one process. A layer missing on a rank is taken from the others. The
    extras (per-token logit statistics) are concatenated in rank order.

    Args:
        snaps: per rank, its snapshot of the step, or None where no training forward ran.
        max_points: points per layer at most after merging, >= 1.
        seed: base seed (the config's ``seed``).

    Returns:
        The merged snapshot (meta: ``capture_seconds`` the slowest rank's, ``n_points``, ``ranks``
        contributing), or None when no rank captured.

    Raises:
        ValueError: snapshots of different steps or stages, or ``max_points`` < 1.
    """
    max_points = _check_int("max_points", max_points, 1)
    seed = _check_int("seed", seed, 0)
    present = [s for s in snaps if s is not None]
    if not present:
        return None
    first = present[0]
    odd = [(s.step, s.stage) for s in present if (s.step, s.stage) != (first.step, first.stage)]
    if odd:
        raise ValueError(f"snaps must share one step and stage, got {(first.step, first.stage)} and {odd[0]}")
    names: list[str] = []
    for s in present:
        names.extend(n for n in s.layers if n not in names)
    layers: dict[str, np.ndarray] = {}
    for name in names:
        parts = [np.asarray(s.layers[name], dtype=np.float32) for s in present if name in s.layers]
        points = np.concatenate(parts, axis=0)
        keep = subsample_indices(points.shape[0], max_points, seed + first.step)
        layers[name] = points[keep]
    keys = sorted({k for s in present for k in s.extras})  # per-token statistics: every rank's, in order
    extras = {k: np.concatenate([s.extras[k] for s in present if k in s.extras]) for k in keys}
    merged = Snapshot(step=first.step, stage=first.stage, layers=layers, extras=extras)
    merged.meta.update(
        {
            "capture_seconds": max(float(s.meta.get("capture_seconds", 0.0)) for s in present),
            "n_points": int(next(iter(layers.values())).shape[0]) if layers else 0,
            "ranks": len(present),
        }
    )
    return merged
