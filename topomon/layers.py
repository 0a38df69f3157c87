"""Layer analysis by zigzag persistence: which decoder blocks change the topology least.

The Python API behind ``topomon layers``: run a fixed text set through the model once, take the
last non-pad token's hidden state after every decoder block, compute the zigzag barcodes of the
blocks' kNN clique complexes (:mod:`topomon.metrics.zigzag`, Gardinazzi et al.) and rank the
blocks by the authors' pruning score. :meth:`LayerAnalysis.save` writes ``layers.json`` and a
heatmap ``layer_similarity.png``.

Representation: the output of decoder block ``i`` (the residual stream after block ``i``), at the
last non-pad token of each text. The paper used the post-attention LayerNorm output inside each
block plus the final-norm output; the block output is what every architecture exposes and what
pruning removes (block ``i`` maps the output of block ``i - 1`` to this one).
"""

from __future__ import annotations

import json
import math
import numbers
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from topomon.metrics.preprocess import DEFAULT_TREATMENT, prepare_aligned
from topomon.metrics.zigzag import (
    ZigzagResult,
    adjacent_layer_similarity,
    persistence_similarity,
    prune_scores,
    zigzag_barcodes,
    zigzag_descriptors,
)

__all__ = ["LayerAnalysis", "last_token_states", "analyze_layers"]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return int(value)


def _json_list(arr: np.ndarray) -> Any:
    """Nested lists with NaN/inf replaced by None (strict JSON)."""
    return (
        [_json_list(a) for a in arr]
        if arr.ndim > 1
        else [None if not math.isfinite(v) else v for v in arr.tolist()]
    )


@dataclass
class LayerAnalysis:
    """Result of :func:`analyze_layers`.

    Attributes:
        layers: decoder-block indices analysed, in order (position ``i`` in the arrays below).
        similarity: ``(L, L)`` row-normalised persistence similarity in H``similarity_dim``:
            the fraction of block ``i``'s features still alive, unchanged, at block ``j``.
        similarity_dim: homology dimension of ``similarity`` and of the pruning score.
        prune_score: ``(L,)`` the authors' score (higher: removal should cost less).
        prune_ranking: block indices, best pruning candidate first (all ``L`` of them).
        descriptors: per-layer descriptors of :func:`~topomon.metrics.zigzag.zigzag_descriptors`.
        adjacent_similarity: ``(L - 1,)`` kNN-graph Jaccard overlap of consecutive analysed blocks.
        result: the zigzag barcodes.
        n_texts: number of texts kept by the preprocessing (points per layer).
        timings: seconds spent capturing (``"capture_s"``) and in the zigzag (``"zigzag_s"``).
    """

    layers: list[int]
    similarity: np.ndarray
    similarity_dim: int
    prune_score: np.ndarray
    prune_ranking: list[int]
    descriptors: dict[str, np.ndarray]
    adjacent_similarity: np.ndarray
    result: ZigzagResult
    n_texts: int
    timings: dict[str, float] = field(default_factory=dict)

    def prune_candidates(self, k: int) -> list[int]:
        """The ``k`` best pruning candidates (block indices), best first."""
        k = _positive_int(k, "k")
        if k > len(self.layers):
            raise ValueError(
                f"`k` must be at most the number of analysed layers ({len(self.layers)}), got {k}"
            )
        return self.prune_ranking[:k]

    def to_json(self) -> dict[str, Any]:
        """The content of ``layers.json`` (strict JSON: NaN and inf become ``null``)."""
        return {
            "kind": "zigzag_layers",
            "layers": list(self.layers),
            "n_texts": self.n_texts,
            "k": self.result.k,
            "maxdim": self.result.maxdim,
            "engine": self.result.engine,
            "similarity_dim": self.similarity_dim,
            "similarity_normalization": "row: S[i, j] = C[i, j] / C[i, i]",
            "similarity": _json_list(self.similarity),
            "prune_score": _json_list(self.prune_score),
            "prune_ranking": list(self.prune_ranking),
            "adjacent_similarity": _json_list(self.adjacent_similarity),
            "descriptors": {name: _json_list(v) for name, v in self.descriptors.items()},
            "bars": self.result.to_json()["bars"],
            "position_convention": "layer l at l, intersection l/l+1 at l + 0.5; alive on [birth, death)",
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }

    def save(self, run_dir: str | Path, *, top_k: int = 4) -> dict[str, Path]:
        """Write ``layers.json`` and the heatmap ``layer_similarity.png`` into ``run_dir`` (created).

        Args:
            run_dir: output folder.
            top_k: how many best pruning candidates the figure highlights.

        Returns:
            ``{"json": path, "png": path}``.
        """
        out = Path(run_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path = out / "layers.json"
        json_path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        png_path = out / "layer_similarity.png"
        self._figure(top_k).savefig(png_path, dpi=120)
        return {"json": json_path, "png": png_path}

    def _figure(self, top_k: int) -> Any:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        n = len(self.layers)
        top = set(self.prune_ranking[: max(0, min(top_k, n))])
        fig = Figure(figsize=(7.5, 8.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax, ax_score = fig.subplots(2, 1, height_ratios=[4, 1], sharex=True)
        cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
        image = ax.imshow(self.similarity, cmap=cmap, vmin=0.0, vmax=1.0, origin="upper", aspect="auto")
        h = f"H{self.similarity_dim}"
        cbar = fig.colorbar(image, ax=ax, shrink=0.9)
        cbar.set_label(f"fraction of block i's {h} features alive through block j")
        step = max(1, int(math.ceil(n / 16)))
        ticks = list(range(0, n, step))
        ax.set_yticks(ticks, [str(self.layers[t]) for t in ticks])
        ax.set_ylabel("decoder block i")
        ax.set_title(
            f"Zigzag persistence similarity ({h}, kNN k={self.result.k}, {self.n_texts} texts)\n"
            "grey: no feature at that block"
        )
        colors = ["tab:red" if self.layers[i] in top else "tab:blue" for i in range(n)]
        ax_score.bar(range(n), np.nan_to_num(self.prune_score), color=colors)
        ax_score.set_xticks(ticks, [str(self.layers[t]) for t in ticks])
        ax_score.set_xlabel("decoder block j")
        ax_score.set_ylabel("prune score")
        ax_score.set_title(f"column mean of the matrix (red: top {len(top)} pruning candidates)", fontsize=9)
        return fig


def last_token_states(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    max_length: int = 128,
) -> tuple[list[int], list[np.ndarray]]:
    """Hidden state of the last non-pad token after each selected decoder block, for every text.

    One no-grad forward pass of the base model (no LM head) per batch, with forward hooks on the
    decoder blocks; texts are batched by length and the rows returned in the order of ``texts``.
    The model's train/eval mode is restored and the hooks removed afterwards. A tokenizer without a
    pad token pads with its EOS token for the duration of the call.

    Args:
        model: a causal LM (transformers ``PreTrainedModel``, possibly PEFT/DDP-wrapped).
        tokenizer: its tokenizer.
        texts: the probe texts.
        layers: decoder-block indices (negative counts from the end); ``None`` means every block.
        batch_size: texts per forward pass.
        max_length: truncation length in tokens.

    Returns:
        ``(block indices, arrays)``: one float32 ``(len(texts), hidden)`` array per block.

    Raises:
        TypeError: for texts that are not a sequence of strings.
        ValueError: for empty texts, bad layer indices, a non-positive size, or a tokenizer with
            neither a pad nor an EOS token.
    """
    import torch

    from topomon.capture.layers import model_layout, resolve_layer_indices

    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"`texts` must be a sequence of strings, got {type(texts).__name__}")
    if len(texts) == 0 or not all(isinstance(t, str) and t for t in texts):
        raise ValueError("`texts` must be a non-empty sequence of non-empty strings")
    batch_size = _positive_int(batch_size, "batch_size")
    max_length = _positive_int(max_length, "max_length")
    layout = model_layout(model)
    blocks = layout.blocks
    indices = list(range(len(blocks))) if layers is None else resolve_layer_indices(list(layers), len(blocks))
    base = layout.model
    runner = layout.body
    restore_pad = tokenizer.pad_token is None
    if restore_pad:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    lengths = [
        len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    ]
    order = np.argsort(lengths, kind="stable")
    captured: dict[int, list[Any]] = {i: [] for i in indices}
    last: list[Any] = []

    def make_hook(i: int) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            captured[i].append(hidden[torch.arange(hidden.shape[0]), last[-1]].detach().float().cpu())

        return hook

    handles = [blocks[i].register_forward_hook(make_hook(i)) for i in indices]
    was_training = model.training
    device = next(base.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                chunk = [texts[j] for j in order[start : start + batch_size].tolist()]
                batch = tokenizer(
                    chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length
                )
                mask = batch["attention_mask"]
                width = mask.shape[1]
                # index of the last 1 in each row, for left or right padding alike
                last.append(width - 1 - torch.flip(mask, dims=[1]).argmax(dim=1))
                runner(
                    input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device), use_cache=False
                )
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        if restore_pad:
            tokenizer.pad_token = None
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    arrays = [torch.cat(captured[i]).numpy().astype(np.float32)[inverse] for i in indices]
    return indices, arrays


def analyze_layers(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    k: int = 10,
    maxdim: int = 1,
    batch_size: int = 16,
    layers: Sequence[int] | None = None,
    max_length: int = 128,
    engine: str = "auto",
    similarity_dim: int | None = None,
    massive_treatment: str = DEFAULT_TREATMENT,
) -> LayerAnalysis:
    """Zigzag persistence across the decoder blocks of ``model`` on a fixed text set.

    Captures the last non-pad token after every selected block (:func:`last_token_states`),
    computes the zigzag barcodes of the blocks' kNN clique complexes, the persistence similarity
    and descriptors, and ranks blocks by the authors' pruning score (Gardinazzi et al.; see
    :mod:`topomon.metrics.zigzag`). Use a few hundred texts: the kNN complexes need ``n > k`` and the
    H1 statistics are noisy below ~100 points.

    Args:
        model: a causal LM (possibly PEFT/DDP-wrapped); its train/eval mode is restored.
        tokenizer: its tokenizer.
        texts: probe texts (one point per text and layer).
        k: neighbours of the kNN graphs.
        maxdim: largest homology dimension (0 or 1).
        batch_size: texts per forward pass.
        layers: decoder-block indices to analyse (default: all, in order).
        max_length: truncation length in tokens.
        engine: zigzag engine (``"auto"``, ``"builtin"``, ``"dionysus"``).
        similarity_dim: homology dimension for the similarity and the pruning score; default
            ``maxdim`` (H1, as in the paper).
        massive_treatment: the monitor's preprocessing of the states
            (:func:`topomon.metrics.preprocess.prepare_aligned`, one of
            :data:`~topomon.metrics.preprocess.TREATMENTS`): a text whose state is a massive token
            (or non-finite) at some block is left out at every block, so the vertices stay shared.

    Returns:
        A :class:`LayerAnalysis`.

    Raises:
        ValueError: for fewer texts than ``k + 1``, fewer than two layers, ``similarity_dim`` above
            ``maxdim``, or any invalid argument of the functions called.

    Example:
        >>> from topomon.testing import sample_texts, tiny_causal_lm, tiny_tokenizer
        >>> la = analyze_layers(tiny_causal_lm(num_layers=4), tiny_tokenizer(), sample_texts(30), k=5)
        >>> la.similarity.shape
        (4, 4)
    """
    k = _positive_int(k, "k")
    if len(texts) <= k:
        raise ValueError(f"analyze_layers needs more texts than k={k}, got {len(texts)}")
    if similarity_dim is None:
        similarity_dim = maxdim
    if similarity_dim not in (0, 1) or similarity_dim > maxdim:
        raise ValueError(
            f"`similarity_dim` must be 0 or 1 and at most maxdim={maxdim}, got {similarity_dim!r}"
        )
    t0 = time.perf_counter()
    indices, states = last_token_states(
        model, tokenizer, texts, layers=layers, batch_size=batch_size, max_length=max_length
    )
    if len(indices) < 2:
        raise ValueError(f"analyze_layers needs at least two decoder blocks, got {indices}")
    states, kept = prepare_aligned(states, treatment=massive_treatment)
    if len(kept) <= k:
        raise ValueError(
            f"analyze_layers needs more texts than k={k} after preprocessing, got {len(kept)} of {len(texts)}"
        )
    t1 = time.perf_counter()
    result = zigzag_barcodes(states, k=k, maxdim=maxdim, engine=engine)
    similarity = persistence_similarity(result, dim=similarity_dim)
    score = prune_scores(similarity)
    empty = [indices[i] for i in np.nonzero(np.isnan(np.diag(similarity)))[0].tolist()]
    if empty:
        warnings.warn(
            f"no H{similarity_dim} feature at blocks {empty} (n={len(texts)} texts, k={k}): their pruning "
            "score is NaN and they rank last; use more texts or a smaller k for a meaningful ranking",
            RuntimeWarning,
            stacklevel=2,
        )
    ranking = np.lexsort((np.arange(len(indices)), -np.nan_to_num(score, nan=-np.inf)))
    adjacent = adjacent_layer_similarity(states, k=k)
    t2 = time.perf_counter()
    return LayerAnalysis(
        layers=indices,
        similarity=similarity,
        similarity_dim=similarity_dim,
        prune_score=score,
        prune_ranking=[indices[i] for i in ranking.tolist()],
        descriptors=zigzag_descriptors(result),
        adjacent_similarity=adjacent,
        result=result,
        n_texts=len(kept),
        timings={"capture_s": t1 - t0, "zigzag_s": t2 - t1},
    )
