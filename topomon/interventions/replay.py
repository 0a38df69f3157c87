"""Replay mixing: swap training examples for replay examples at a ratio the monitor can change mid-run.

When the monitor sees representation collapse, mixing earlier-stage or general data back into the
training stream is the first intervention of the sequential post-training literature (arXiv
2605.30524, "mixed-domain replay"). This module does it without subclassing the trainer:
:func:`install_replay` prepares the replay set the way the trainer prepared its own training set
(TRL ``SFTTrainer`` / ``DPOTrainer`` ``_prepare_dataset``), then replaces ``trainer.train_dataset``
by a :class:`ReplayDataset` that, at each draw, returns a replay example instead of training
example ``i`` with probability ``ratio``. The Trainer builds its DataLoader from
``trainer.train_dataset`` when ``train()`` starts, so the wrapper is used with the Trainer's own
sampler, collator and ``dataloader_num_workers``.

Semantics:

* **Replacement, not insertion**: the epoch keeps its length (so ``max_steps``, schedulers and
  progress bars are unchanged); a replaced training example is not seen in that epoch.
* **The ratio reaches worker processes**: it lives in a shared-memory tensor read at every draw,
  so a change made in the main process is seen by DataLoader workers (``num_workers > 0``,
  persistent or not, fork or spawn). Batches already prepared keep the ratio they were drawn with:
  a change takes effect after the prefetched batches (about ``num_workers * prefetch_factor``
  batches with workers, one or two without).
* **Deterministic given a seed**: whether draw ``(epoch, index)`` is replaced, and by which replay
  example, is a hash of ``(seed, epoch, index)`` (:func:`replay_draw`), compared with the ratio
  current at the draw. For a fixed ratio the stream is reproducible whatever the number of
  workers; the draws are nested in the ratio (every example replaced at ratio ``r`` is replaced
  at any ``r' > r``). Which batches see a ratio change depends on prefetching.
* **Counters** of drawn and replayed examples are kept per process in shared memory and summed
  by :attr:`ReplayMixer.counts`; they count draws, which run ahead of the optimizer by the
  prefetch depth.

Example:
    >>> mixer = install_replay(trainer, general_data, ratio=0.0)  # doctest: +SKIP
    >>> mixer.set_ratio(0.25)  # on an alert  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["replay_draw", "ReplayDataset", "ReplayMixer", "install_replay"]

_MASK64 = (1 << 64) - 1
_N_STATE = 2  # [ratio, epoch]


def _splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele, Lea & Flood 2014): a fast, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def replay_draw(seed: int, epoch: int, index: int, n_replay: int) -> tuple[float, int]:
    """The random draw for training example ``index`` in ``epoch``: a uniform number and a replay index.

    A pure function: the example is replaced when ``u < ratio``, by replay example ``j``. ``u`` and
    ``j`` come from SplitMix64 hashes of ``(seed, epoch, index)``, so they do not depend on the
    order of draws, the process that makes them, or the ratio.

    Args:
        seed: the mixer's seed (any int; reduced modulo 2**64).
        epoch: training epoch (any int).
        index: index of the training example in the training set.
        n_replay: size of the replay set, positive.

    Returns:
        ``(u, j)`` with ``u`` in ``[0, 1)`` (53-bit resolution) and ``j`` in ``[0, n_replay)``.

    Raises:
        ValueError: if ``n_replay`` is not positive.
    """
    if n_replay < 1:
        raise ValueError(f"n_replay must be a positive int, got {n_replay}")
    h = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64))
    u = (h >> 11) * 2.0**-53
    j = _splitmix64(h ^ 0x5DEECE66D) % n_replay
    return u, j


def _check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a float in [0, 1], got {ratio!r} ({type(ratio).__name__})")
    r = float(ratio)
    if not (0.0 <= r <= 1.0):
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    return r


def _worker_slot(n_slots: int) -> int:
    """Row of the counter table owned by this process: 0 in the main process, 1 + worker id in a worker."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return 0
    return 1 + info.id % (n_slots - 1) if n_slots > 1 else 0


class ReplayDataset(torch.utils.data.Dataset):
    """A map-style dataset that returns a replay example instead of ``base[i]`` with probability ``ratio``.

    Built by :meth:`ReplayMixer.wrap`; the ratio, the epoch and the counters are shared-memory tensors
    owned by the mixer, so every copy of this object (one per DataLoader worker) sees the same ratio
    and writes its own counter row.

    Args:
        base: the training set (``len`` and integer indexing; rows are mappings).
        replay: the replay set, in the same processed form and with the same columns as ``base``.
        state: shared float64 tensor ``[ratio, epoch]``.
        counts: shared int64 tensor ``(n_slots, 2)``: per process, ``[drawn, replayed]``.
        seed: seed of :func:`replay_draw`.
    """

    def __init__(self, base: Any, replay: Any, state: torch.Tensor, counts: torch.Tensor, seed: int) -> None:
        self.base = base
        self.replay = replay
        self._state = state
        self._counts = counts
        self.seed = int(seed)
        self._n_replay = len(replay)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        ratio = float(self._state[0])
        epoch = int(self._state[1])
        u, j = replay_draw(self.seed, epoch, int(index), self._n_replay)
        slot = _worker_slot(self._counts.shape[0])
        self._counts[slot, 0] += 1
        if u < ratio:
            self._counts[slot, 1] += 1
            return self.replay[j]
        return self.base[index]

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used in the draws (accelerate's DataLoader calls this in single-process runs)."""
        self._state[1] = float(int(epoch))

    @property
    def column_names(self) -> list[str] | None:
        """The training set's column names, when it has them (``datasets.Dataset``)."""
        names = getattr(self.base, "column_names", None)
        return list(names) if names is not None else None


class ReplayMixer:
    """Owns the replay ratio, the epoch and the counters shared with every :class:`ReplayDataset` copy.

    Args:
        replay: the processed replay set (``len`` and integer indexing, rows are mappings), non-empty.
        ratio: initial probability that a training draw is replaced, in ``[0, 1]``.
        seed: seed of the draws (see :func:`replay_draw`).
        max_workers: number of DataLoader worker processes the counters keep apart (more workers
            share rows, and their counts may then lose increments).

    Raises:
        ValueError: for an empty replay set, a ratio outside ``[0, 1]`` or a negative ``max_workers``.
        TypeError: for a replay set without ``len``/indexing or a non-numeric ratio.

    Example:
        >>> mixer = ReplayMixer([{"input_ids": [0, 5]}], ratio=0.5, seed=1)
        >>> ds = mixer.wrap([{"input_ids": [7, 8]}] * 4)
        >>> mixer.set_ratio(1.0); ds[0]
        {'input_ids': [0, 5]}
    """

    def __init__(self, replay: Any, *, ratio: float = 0.0, seed: int = 0, max_workers: int = 32) -> None:
        if not hasattr(replay, "__len__") or not hasattr(replay, "__getitem__"):
            raise TypeError(
                f"replay must be a map-style dataset (len and indexing), got {type(replay).__name__}"
            )
        if len(replay) == 0:
            raise ValueError("replay must hold at least one example, got an empty data set")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 0:
            raise ValueError(f"max_workers must be a non-negative int, got {max_workers!r}")
        self.replay = replay
        self.seed = seed
        self._state = torch.zeros(_N_STATE, dtype=torch.float64).share_memory_()
        self._counts = torch.zeros((max_workers + 1, 2), dtype=torch.int64).share_memory_()
        self.set_ratio(ratio)

    @property
    def ratio(self) -> float:
        """Current probability that a training draw is replaced by a replay example."""
        return float(self._state[0])

    def set_ratio(self, ratio: float) -> None:
        """Set the replay ratio; every DataLoader worker reads it at its next draw.

        Args:
            ratio: probability in ``[0, 1]``.

        Raises:
            ValueError: if ``ratio`` is outside ``[0, 1]`` or not finite.
            TypeError: if ``ratio`` is not a number.
        """
        self._state[0] = _check_ratio(ratio)

    @property
    def epoch(self) -> int:
        """Epoch used in the draws."""
        return int(self._state[1])

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used in the draws (the callback installed by :func:`install_replay` does this)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self._state[1] = float(epoch)

    @property
    def counts(self) -> dict[str, int]:
        """Draws so far, summed over processes: ``{"drawn": ..., "replayed": ...}``."""
        total = self._counts.sum(dim=0)
        return {"drawn": int(total[0]), "replayed": int(total[1])}

    @property
    def n_replayed(self) -> int:
        """Number of draws that returned a replay example."""
        return self.counts["replayed"]

    @property
    def n_drawn(self) -> int:
        """Number of draws (training and replay examples)."""
        return self.counts["drawn"]

    def wrap(self, base: Any) -> ReplayDataset:
        """A :class:`ReplayDataset` over ``base`` that shares this mixer's ratio, epoch and counters.

        Args:
            base: the training set: map-style (``len`` and integer indexing).

        Returns:
            The wrapped data set.

        Raises:
            TypeError: for an iterable-style data set (no ``len`` or indexing).
        """
        if isinstance(base, torch.utils.data.IterableDataset) or not (
            hasattr(base, "__len__") and hasattr(base, "__getitem__")
        ):
            raise TypeError(
                "replay mixing needs a map-style training set (len and indexing), got "
                f"{type(base).__name__}; iterable data sets are not supported"
            )
        return ReplayDataset(base, self.replay, self._state, self._counts, self.seed)

    def state_dict(self) -> dict[str, Any]:
        """Plain-typed state: ratio, epoch, seed and counters."""
        return {"ratio": self.ratio, "epoch": self.epoch, "seed": self.seed, **self.counts}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the ratio and epoch (counters restart from the saved totals, in the main-process row)."""
        self.set_ratio(state.get("ratio", self.ratio))
        self.set_epoch(int(state.get("epoch", self.epoch)))
        self._counts.zero_()
        self._counts[0, 0] = int(state.get("drawn", 0))
        self._counts[0, 1] = int(state.get("replayed", 0))


def _column_names(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    try:
        first = dataset[0]
    except Exception:  # noqa: BLE001 - any indexing failure means "unknown columns"
        return None
    return list(first.keys()) if isinstance(first, Mapping) else None


def _needed_columns(trainer: Any, columns: list[str] | None) -> list[str] | None:
    """Training columns that reach the collator: all, or those the model accepts (remove_unused_columns)."""
    if columns is None or not getattr(trainer.args, "remove_unused_columns", False):
        return columns
    try:
        trainer._set_signature_columns_if_needed()
        signature = set(trainer._signature_columns)
    except Exception:  # noqa: BLE001 - a trainer without the private helper: keep every column
        return columns
    kept = [c for c in columns if c in signature]
    return kept or columns


def _trl_prepare(trainer: Any) -> Callable[[Any], Any] | None:
    """The trainer's own dataset preparation as a one-argument function, or None if it has none we know."""
    if not hasattr(trainer, "_prepare_dataset"):
        return None
    try:
        import trl
    except ImportError:  # pragma: no cover - trl is a dependency
        return None
    t: Any = trainer  # TRL's private signatures, called with the trainer's own arguments
    if isinstance(trainer, trl.SFTTrainer):
        if getattr(trainer, "_skip_prepare_dataset", False):
            return None
        return lambda ds: t._prepare_dataset(
            ds, t.processing_class, t.args, t.args.packing, getattr(t, "_formatting_func", None), "replay"
        )
    if isinstance(trainer, trl.DPOTrainer):
        if getattr(trainer, "precompute_ref_logps", False):
            raise ValueError(
                "replay mixing is not supported with DPOConfig(precompute_ref_log_probs=True): the replay "
                "examples would lack their reference log-probabilities; set precompute_ref_log_probs=False"
            )
        return lambda ds: t._prepare_dataset(ds, t.processing_class, t.args, "replay")
    raise TypeError(
        f"{type(trainer).__name__} prepares its data sets with a _prepare_dataset this module does not know; "
        "pass prepare=<a function that processes the replay set like the training set> or prepare=None"
    )


def _check_grouped(trainer: Any) -> None:
    """Refuse replay where it could split a GRPO group of completions across two prompts.

    TRL's GRPO (and RLOO) sampler repeats each prompt index ``num_generations`` times in a row, and the
    group's rewards are normalised together. A replaced index draws the same replay example every time
    in an epoch (:func:`replay_draw` hashes the index), and a batch drawn in the training process at
    once reads one ratio, so a group stays one prompt. With DataLoader worker processes a worker could
    read a ratio changed halfway through a group (and ranks could differ): refused.

    Raises:
        ValueError: a grouped trainer with ``dataloader_num_workers > 0``.
    """
    workers = int(getattr(getattr(trainer, "args", None), "dataloader_num_workers", 0) or 0)
    if getattr(trainer, "num_generations", None) is not None and workers > 0:
        raise ValueError(
            f"replay mixing in {type(trainer).__name__} needs dataloader_num_workers=0, got {workers}: the "
            f"sampler repeats each prompt num_generations={trainer.num_generations} times as one group, and "
            "a ratio changed while a worker process draws a group would split it across two prompts"
        )


_CALLBACK_CLASS: type | None = None


def _epoch_callback(mixer: ReplayMixer) -> Any:
    """A TrainerCallback setting the mixer's epoch at ``on_epoch_begin`` (before the DataLoader starts)."""
    global _CALLBACK_CLASS
    if _CALLBACK_CLASS is None:
        from transformers import TrainerCallback

        class ReplayEpochCallback(TrainerCallback):
            """Keeps the replay draws' epoch in step with the Trainer's epoch."""

            def __init__(self, mixer: ReplayMixer) -> None:
                self.mixer = mixer

            def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                self.mixer.set_epoch(max(0, math.floor(float(state.epoch or 0.0) + 1e-6)))

        _CALLBACK_CLASS = ReplayEpochCallback
    return _CALLBACK_CLASS(mixer)


def install_replay(
    trainer: Any,
    replay_dataset: Any,
    ratio: float = 0.0,
    *,
    seed: int | None = None,
    prepare: Callable[[Any], Any] | str | None = "auto",
) -> ReplayMixer:
    """Mix a replay set into a built trainer's training stream; returns the mixer that sets the ratio.

    Call after the trainer is built and before ``trainer.train()``. Works with ``transformers.Trainer``
    and TRL's ``SFTTrainer`` / ``DPOTrainer`` / ``GRPOTrainer`` (no subclassing; for GRPO the replay
    rows are prompts with the reward functions' columns, used as they are, and
    ``dataloader_num_workers`` must be 0): the replay set is processed the way the trainer processed
    its training set, restricted to the training set's columns, and ``trainer.train_dataset`` is
    replaced by a :class:`ReplayDataset`. A small callback is added to keep the draws' epoch in step
    with the Trainer's.

    Args:
        trainer: a built ``transformers.Trainer`` (or subclass) with a map-style ``train_dataset``.
        replay_dataset: replay examples in the trainer's *input* form: raw for TRL trainers (e.g.
            ``{"text": ...}`` for SFT, ``{"prompt", "chosen", "rejected"}`` for DPO), already
            tokenised for a plain ``Trainer``. A ``datasets.Dataset`` or a list of dicts.
        ratio: initial replay ratio in ``[0, 1]``.
        seed: seed of the draws; defaults to ``trainer.args.seed``.
        prepare: ``"auto"`` (TRL SFT/DPO: the trainer's own ``_prepare_dataset``; plain Trainer:
            nothing), a function ``dataset -> processed dataset``, or None (use as is).

    Returns:
        The :class:`ReplayMixer`; call :meth:`ReplayMixer.set_ratio` to change the ratio.

    Raises:
        ValueError: no training set, replay already installed, an empty replay set, replay rows
            missing a training column, or an unsupported trainer setting.
        TypeError: an iterable training set, or an unknown ``prepare``.
    """
    base = getattr(trainer, "train_dataset", None)
    if base is None:
        raise ValueError("trainer.train_dataset is None: replay mixing needs a training set")
    if isinstance(base, ReplayDataset):
        raise ValueError("replay is already installed on this trainer: use the returned mixer's set_ratio")
    _check_grouped(trainer)
    if isinstance(replay_dataset, list):
        import datasets

        replay_dataset = datasets.Dataset.from_list(replay_dataset)
    if prepare == "auto":
        fn = _trl_prepare(trainer)
        replay = fn(replay_dataset) if fn is not None else replay_dataset
    elif prepare is None:
        replay = replay_dataset
    elif callable(prepare):
        replay = prepare(replay_dataset)
    else:
        raise TypeError(f"prepare must be 'auto', None or a callable, got {prepare!r}")
    base_cols = _needed_columns(trainer, _column_names(base))
    replay_cols = _column_names(replay)
    if base_cols is not None and replay_cols is not None:
        missing = [c for c in base_cols if c not in replay_cols]
        if missing:
            raise ValueError(
                f"replay examples lack the training columns {missing} after preparation (they have "
                f"{replay_cols}); give replay data in the form the trainer expects"
            )
        if hasattr(replay, "select_columns") and replay_cols != base_cols:
            replay = replay.select_columns(base_cols)
    n_workers = int(getattr(getattr(trainer, "args", None), "dataloader_num_workers", 0) or 0)
    mixer = ReplayMixer(
        replay,
        ratio=ratio,
        seed=int(trainer.args.seed) if seed is None else seed,
        max_workers=max(n_workers, 1),
    )
    trainer.train_dataset = mixer.wrap(base)
    trainer.add_callback(_epoch_callback(mixer))
    return mixer
