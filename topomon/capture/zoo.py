"""The architecture zoo: :func:`~topomon.capture.layers.model_layout` on every causal LM and VLM class.

Every class of the installed transformers' causal-LM mapping and image-text-to-text mapping is built on
the meta device from its default config (``config_class()``; no memory, no weights), and its
layout is checked: the blocks are a ``ModuleList`` of the text config's layer count, inside the body
whose output is the LM head's input (``final_norm``), a body that does not hold the head itself.
Run ``python -m topomon.capture.zoo`` for the table and the counts;
``tests/capture/test_architectures.py`` asserts that none fails.

Out of scope, listed here with the reason: encoder-decoder models (``is_encoder_decoder``), encoder-only
families that transformers also offers as a causal LM (BERT and its kin: their LM head runs a transform
of its own on the encoder output), and the few models whose ``num_hidden_layers`` is not a count of
block modules. A class that cannot be built from its default config (an optional dependency missing, a
default config transformers itself cannot build) is *skipped*, with the error.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any

__all__ = ["ZooEntry", "OUT_OF_SCOPE", "zoo_classes", "check_class", "run_zoo", "counts"]

_ENCODER_ONLY = "an encoder-only family offered as a causal LM: its LM head transforms the encoder output"
OUT_OF_SCOPE: dict[str, str] = {
    **{
        t: _ENCODER_ONLY
        for t in (
            "bert",
            "bert-generation",
            "big_bird",
            "camembert",
            "data2vec-text",
            "electra",
            "ernie",
            "megatron-bert",
            "rembert",
            "roberta",
            "roberta-prelayernorm",
            "roc_bert",
            "roformer",
            "xlm",
            "xlm-roberta",
            "xlm-roberta-xl",
            "xmod",
            "reformer",
            "git",
            "blip",
        )
    },
    "blt": "byte-latent: local encoder, global and local decoder stacks, no single block list",
    "hrm_text": "recurrent depth: num_hidden_layers counts block applications, blocks are reused",
    "longcat_flash": "num_hidden_layers counts half-blocks (each block module holds two sublayers)",
    "pi0": "vision-language-action model: no text LM head",
    "pi05": "vision-language-action model: no text LM head",
}
"""Model types out of scope, with the reason (encoder-decoder models are found by their config)."""

KINDS = ("causal-lm", "image-text-to-text")


@dataclass(frozen=True)
class ZooEntry:
    """One class of the zoo and what came of it.

    Attributes:
        kind: ``"causal-lm"`` or ``"image-text-to-text"``.
        model_type: the config's model type.
        class_name: the model class.
        status: ``"resolved"``, ``"out_of_scope"``, ``"skipped"`` (cannot be built here) or ``"failing"``.
        detail: the block and LM-head-input paths and the block count, or the reason.
    """

    kind: str
    model_type: str
    class_name: str
    status: str
    detail: str


def zoo_classes() -> list[tuple[str, str, str]]:
    """``(kind, model_type, class_name)`` of every causal-LM and image-text-to-text class in transformers."""
    from transformers.models.auto import modeling_auto as auto

    out = [("causal-lm", t, c) for t, c in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()]
    out += [("image-text-to-text", t, c) for t, c in auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items()]
    return out


def _is_encoder_decoder(config: Any) -> bool:
    if getattr(config, "is_encoder_decoder", False):
        return True
    get = getattr(config, "get_text_config", None)
    return bool(getattr(get(), "is_encoder_decoder", False)) if callable(get) else False


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"


def check_class(kind: str, model_type: str, class_name: str) -> ZooEntry:
    """Build one class on the meta device from its default config and check its layout."""
    import torch
    import transformers

    from topomon.capture.layers import model_layout, text_layer_count

    def entry(status: str, detail: str) -> ZooEntry:
        return ZooEntry(kind, model_type, class_name, status, detail)

    if model_type in OUT_OF_SCOPE:
        return entry("out_of_scope", OUT_OF_SCOPE[model_type])
    try:
        cls = getattr(transformers, class_name)
    except Exception as e:  # noqa: BLE001 - an optional dependency missing: reported
        return entry("skipped", _why(e))
    # the class's own config class (a text config for a *ForCausalLM of a multimodal family), else the
    # model type's; either default may be one transformers itself cannot build a model from
    makers = [getattr(cls, "config_class", None), lambda: transformers.AutoConfig.for_model(model_type)]
    model, errors = None, []
    for make in makers:
        if make is None:
            continue
        try:
            config = make()
            if _is_encoder_decoder(config):
                return entry("out_of_scope", "an encoder-decoder family (config.is_encoder_decoder)")
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = cls(config)
            break
        except Exception as e:  # noqa: BLE001 - reported
            errors.append(_why(e))
    if model is None:
        return entry("skipped", f"cannot build from the default config: {errors[0]}")
    try:
        layout = model_layout(model)
    except ValueError as e:
        return entry("failing", str(e))
    n = text_layer_count(model)
    if layout.n_layers != n:
        return entry("failing", f"{layout.block_path} holds {layout.n_layers} blocks, the text config {n}")
    if layout.decoder is None:
        return entry("failing", f"{layout.block_path}: no module whose output is the LM head's input")
    if any(m is layout.head for m in layout.decoder.modules()):
        return entry("failing", f"{layout.decoder_path} holds the LM head: its output would be logits")
    if not layout.block_path.startswith(layout.decoder_path + "."):
        return entry("failing", f"the blocks {layout.block_path} are not inside {layout.decoder_path}")
    return entry("resolved", f"{layout.block_path} ({n}), final_norm = output of {layout.decoder_path}")


def run_zoo(kinds: tuple[str, ...] = KINDS) -> list[ZooEntry]:
    """:func:`check_class` on every class of ``kinds``."""
    import logging

    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return [check_class(k, t, c) for k, t, c in zoo_classes() if k in kinds]
    finally:
        log.setLevel(level)


def counts(entries: list[ZooEntry]) -> dict[str, dict[str, int]]:
    """Per kind, the number of entries of each status."""
    out: dict[str, dict[str, int]] = {}
    for e in entries:
        per = out.setdefault(e.kind, {"resolved": 0, "out_of_scope": 0, "skipped": 0, "failing": 0})
        per[e.status] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the zoo's table and its counts; exit 1 when a class fails."""
    entries = run_zoo()
    verbose = "-v" in (argv if argv is not None else sys.argv[1:])
    for e in entries:
        if verbose or e.status != "resolved":
            print(f"{e.kind:19s} {e.model_type:28s} {e.class_name:45s} {e.status:12s} {e.detail}")
    for kind, per in counts(entries).items():
        print(f"{kind}: {sum(per.values())} classes: " + ", ".join(f"{v} {k}" for k, v in per.items()))
    return 1 if any(e.status == "failing" for e in entries) else 0


if __name__ == "__main__":
    raise SystemExit(main())
