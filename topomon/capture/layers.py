"""Find the language model of a causal LM or vision-language model: its blocks and its LM head's input.

Discovery goes by what the model says of itself, not by attribute names:

- the *decoder* is the language model body, reached through ``get_decoder()`` (followed through nested
  wrappers: a VLM's language model, a ``*ForCausalLM`` inside a VLM, OPT's ``model.decoder``);
- its *blocks* are the ``ModuleList`` child of the decoder whose length is the text config's
  ``num_hidden_layers`` (``config.get_text_config(decoder=True)``), never a vision tower's blocks nor an
  experts list; when ``get_decoder()`` leads nowhere, the shallowest ``ModuleList`` of that length in
  the model, outside vision and audio towers, and the decoder is its owner;
- ``"final_norm"`` is the decoder's output (its last hidden state): what the causal LM hands to its
  LM head, i.e. the input of the LM head, which is the final norm's output in every model that has a
  final norm (Llama ``model.norm``, Phi ``final_layernorm``, Mamba ``norm_f``, GPT-2 ``ln_f``, ...);
  a few models transform it before the head, or the head's output after it (MiniCPM3, Gemma 2; see
  :func:`~topomon.capture.probe.logits_are_head_of_body`).
  Hooking the decoder rather than the head keeps the probe forward's saving: the LM head runs on the
  counted positions only (:func:`~topomon.capture.logit_stats.reduce_logits_from_hidden`).

Models without a ``config`` (plain ``torch.nn.Module``) are looked up on the usual attribute paths
(``model.layers``, ``transformer.h``, ...). PEFT (``PeftModel``), DDP (``.module``) and accelerate
wrappers are seen through. Layer indices follow the block order: ``0`` is the first block, ``-1`` the
last. docs/ARCHITECTURE.md lists the architectures checked (``python -m topomon.capture.zoo``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ModelLayout",
    "model_layout",
    "unwrap_model",
    "decoder_layers",
    "resolve_layer_indices",
    "layer_name",
    "text_layer_count",
    "FINAL_NORM",
]

FINAL_NORM = "final_norm"
"""The layer name of the LM head's input (the final norm's output)."""

# plain modules (no transformers config): the usual places of the blocks and of the final norm
_LAYER_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
    "transformer.layers",
)
_NORM_PATHS = (
    "model.norm",
    "model.decoder.final_layer_norm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
)
# submodules never searched for the language model's blocks (the fallback search only)
_TOWER = re.compile(
    r"(^|\.)(vision|visual|image|audio|speech|video|vqmodel|vision_tower|vision_model)[a-z_]*(\.|$)"
)


def unwrap_model(model: Any) -> torch.nn.Module:
    """Strip DDP/FSDP-style ``.module`` wrappers and PEFT wrappers, returning the causal LM itself."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, accelerate wrappers
            model = model.module
        else:
            break
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


@dataclass(frozen=True)
class ModelLayout:
    """Where the language model of a model is.

    Attributes:
        model: the unwrapped model (no PEFT / DDP wrapper).
        blocks: the language model's blocks, in order.
        decoder: the module whose output's last hidden state is the LM head's input (captured as
            ``"final_norm"``), or None when there is none to hook (a plain module without a known norm).
        head: the LM head (``get_output_embeddings()``), or None.
        block_path: the blocks' name in ``model`` (``"model.language_model.layers"``).
        decoder_path: the decoder's name in ``model`` (``""`` for none).
        body: what a text-only forward without the LM head runs (the probe forward): the model's base
            model when it has one (a VLM's outer body builds its position ids and masks), else the
            language model's body (a VLM without one: Llama 4, BLIP-2, InstructBLIP), else the model.
        n_layers: the number of blocks.
    """

    model: torch.nn.Module
    blocks: torch.nn.ModuleList
    decoder: torch.nn.Module | None
    head: torch.nn.Module | None
    block_path: str
    decoder_path: str
    body: torch.nn.Module

    @property
    def n_layers(self) -> int:
        """The number of blocks."""
        return len(self.blocks)

    def capture_modules(self, indices: Sequence[int], final_norm: bool) -> dict[str, torch.nn.Module]:
        """Layer name -> module to hook: ``layer_<i>`` per block index, ``final_norm`` if asked and found."""
        mods: dict[str, torch.nn.Module] = {layer_name(i): self.blocks[i] for i in indices}
        if final_norm and self.decoder is not None:
            mods[FINAL_NORM] = self.decoder
        return mods

    def lora_target_modules(self, names: Sequence[str] | None = None) -> str:
        """A PEFT ``target_modules`` regex for the linear layers inside the language model's blocks only.

        Args:
            names: leaf names to adapt (``["q_proj", "v_proj"]``); None: every ``nn.Linear`` leaf name in
                the blocks.

        Returns:
            A regex for ``LoraConfig(target_modules=...)`` (PEFT full-matches it against module names):
            a VLM's vision tower and projector keep their weights.

        Raises:
            ValueError: ``names`` holds a name no linear layer of the blocks has (the valid names listed).
        """
        found = sorted(
            {n.rsplit(".", 1)[-1] for n, m in self.blocks.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        chosen = found if names is None else list(names)
        bad = [n for n in chosen if n not in found]
        if bad or not chosen:
            raise ValueError(
                f"`names` {bad or chosen} are not linear layers of the blocks; they have {found}"
            )
        alts = "|".join(re.escape(n) for n in chosen)
        return rf"{re.escape(self.block_path)}\.\d+\.(.*\.)?({alts})"


def _get_path(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def text_layer_count(model: Any) -> int | None:
    """The text config's ``num_hidden_layers`` of a transformers model, or None (no config, or no count)."""
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    if callable(get):
        try:
            cfg = get(decoder=True)
        except (TypeError, ValueError):
            cfg = get()
    n = getattr(cfg, "decoder_layers", None)  # the decoder side of a BART-style config
    if not isinstance(n, int):
        n = getattr(cfg, "num_hidden_layers", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _decoder_chain(base: torch.nn.Module) -> list[torch.nn.Module]:
    """``get_decoder()`` followed until it stops moving (a VLM -> its ``*ForCausalLM`` -> its body)."""
    chain: list[torch.nn.Module] = []
    cur: Any = base
    for _ in range(6):
        get = getattr(cur, "get_decoder", None)
        try:
            nxt = get() if callable(get) else None
        except (AttributeError, NotImplementedError, ValueError):
            nxt = None
        if not isinstance(nxt, torch.nn.Module) or nxt is cur or any(nxt is c for c in chain):
            break
        chain.append(nxt)
        cur = nxt
    return chain


def _list_child(module: torch.nn.Module, n: int) -> tuple[str, torch.nn.ModuleList] | None:
    """The first registered ``ModuleList`` child of ``module`` holding ``n`` modules."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) == n:
            return name, child
    return None


def _search(base: torch.nn.Module, n: int) -> tuple[str, torch.nn.ModuleList] | None:
    """The shallowest ``ModuleList`` of ``n`` modules in ``base``, outside vision and audio towers."""
    best: tuple[int, str, torch.nn.ModuleList] | None = None
    for name, mod in base.named_modules():
        if not name or not isinstance(mod, torch.nn.ModuleList) or len(mod) != n or _TOWER.search(name):
            continue
        if best is None or name.count(".") < best[0]:
            best = (name.count("."), name, mod)
    return None if best is None else (best[1], best[2])


def _head(base: torch.nn.Module, chain: Sequence[torch.nn.Module]) -> torch.nn.Module | None:
    for owner in (base, *chain):
        get = getattr(owner, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if isinstance(head, torch.nn.Module):
            return head
    return None


def _base_model(base: torch.nn.Module) -> torch.nn.Module | None:
    body = getattr(base, "base_model", None)
    return body if isinstance(body, torch.nn.Module) and body is not base else None


def _plain_layout(base: torch.nn.Module) -> ModelLayout:
    for path in _LAYER_PATHS:
        layers = _get_path(base, path)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            norm = next((p for p in _NORM_PATHS if isinstance(_get_path(base, p), torch.nn.Module)), "")
            norm_module = _get_path(base, norm) if norm else None
            return ModelLayout(base, layers, norm_module, None, path, norm, _base_model(base) or base)
    raise ValueError(
        f"cannot find the decoder blocks of {type(base).__name__}: it has no transformers `config` "
        f"and none of {', '.join(_LAYER_PATHS)}; pass a transformers PreTrainedModel"
    )


def model_layout(model: Any) -> ModelLayout:
    """The blocks, the LM head's input and the head of ``model``'s language model (see the module doc).

    Args:
        model: a transformers causal LM or vision-language model (PEFT / DDP wrapped or not), or a plain
            module with blocks at ``model.layers`` / ``transformer.h`` / ...

    Returns:
        The :class:`ModelLayout`; its block count equals the text config's ``num_hidden_layers``.

    Raises:
        ValueError: the blocks cannot be identified (the message names the model class, the expected
            block count and where it looked).

    Example:
        >>> from topomon.testing import tiny_causal_lm
        >>> lay = model_layout(tiny_causal_lm(num_layers=3))
        >>> lay.block_path, lay.n_layers, lay.decoder_path
        ('model.layers', 3, 'model')
    """
    base = unwrap_model(model)
    n = text_layer_count(base)
    if n is None:
        if getattr(base, "config", None) is None:
            return _plain_layout(base)
        raise ValueError(
            f"cannot find the blocks of {type(base).__name__}: its text config has no `num_hidden_layers`"
        )
    names = {id(m): name for name, m in base.named_modules()}
    chain = _decoder_chain(base)
    found: tuple[str, torch.nn.ModuleList] | None = None
    decoder: torch.nn.Module | None = None
    for cand in reversed(chain):  # the innermost decoder first
        if cand is not base and id(cand) in names:
            found = _list_child(cand, n)
            if found is not None:
                decoder = cand
                break
    if found is None:
        found = _search(base, n)
        if found is None:
            raise ValueError(
                f"cannot find the blocks of {type(base).__name__}: no list of {n} modules (the text config's "
                f"num_hidden_layers) under its get_decoder() ({[type(c).__name__ for c in chain]}) nor "
                "anywhere outside its vision/audio towers"
            )
        # the body to hook: the innermost get_decoder() module holding the blocks, else their owner
        holders = [
            c
            for c in chain
            if names.get(id(c)) and found[0].startswith(names[id(c)] + ".") and _head(c, ()) is None
        ]
        owner_path = found[0].rpartition(".")[0]
        decoder = holders[-1] if holders else (_get_path(base, owner_path) if owner_path else None)
    assert found is not None
    block_path = names[id(found[1])]
    decoder_path = names.get(id(decoder), "") if decoder is not None else ""
    if decoder is base or not decoder_path:  # the blocks sit on the model itself: no body to hook
        decoder, decoder_path = None, ""
    body = _base_model(base) or decoder or base
    return ModelLayout(base, found[1], decoder, _head(base, chain), block_path, decoder_path, body)


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The language model's blocks of ``model`` in order (:func:`model_layout`'s ``blocks``).

    Raises:
        ValueError: when the blocks cannot be identified (the message names the model class).
    """
    return model_layout(model).blocks


def resolve_layer_indices(spec: str | Sequence[int], n_layers: int, *, n_auto: int = 4) -> list[int]:
    """Turn a layer spec into sorted, non-negative, unique block indices.

    Args:
        spec: ``"auto"`` (``n_auto`` blocks spread evenly from the first quarter to the last, the
            last included) or a sequence of ints (negative counts from the end).
        n_layers: number of decoder blocks of the model.
        n_auto: how many blocks ``"auto"`` picks.

    Returns:
        Sorted unique indices in ``[0, n_layers)``.

    Raises:
        ValueError: for an unknown string, an empty list, or an index out of range (naming the range).
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be positive, got {n_layers}")
    if isinstance(spec, str):
        if spec != "auto":
            raise ValueError(f"layers must be 'auto' or a list of ints, got {spec!r}")
        if n_layers <= n_auto:
            return list(range(n_layers))
        start = n_layers // 4
        picks = {round(start + i * (n_layers - 1 - start) / (n_auto - 1)) for i in range(n_auto)}
        return sorted(picks)
    idx = list(spec)
    if not idx:
        raise ValueError("layers must not be empty: give 'auto' or at least one index")
    out = []
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"layers must hold ints, got {i!r} ({type(i).__name__})")
        if not -n_layers <= i < n_layers:
            raise ValueError(
                f"layer index {i} is out of range for a model with {n_layers} blocks: "
                f"valid indices are {-n_layers}..{n_layers - 1}"
            )
        out.append(i % n_layers)
    return sorted(set(out))


def layer_name(index: int | str) -> str:
    """The name used in tags and logs: ``layer_<i>`` for a block, the string itself otherwise."""
    return f"layer_{index}" if isinstance(index, int) else index
