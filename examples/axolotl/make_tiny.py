"""Write the tiny model and data set that examples/axolotl/tiny.yaml trains (seconds, offline).

python examples/axolotl/make_tiny.py [DIR]   # DIR/runs/axolotl-tiny/{model,data.jsonl}; DIR defaults to "."

The model is a randomly initialised 4-block Llama (hidden size 32) and its byte-level tokenizer, saved with
``save_pretrained``; the data set is 64 lines of English text from Python's own documentation.
"""

from __future__ import annotations

import json
import os
import sys


def make_tiny(root: str = ".") -> str:
    """Write ``root/runs/axolotl-tiny/{model,data.jsonl}``; returns that folder."""
    from topomon.testing import sample_texts, tiny_causal_lm, tiny_tokenizer

    out = os.path.join(root, "runs", "axolotl-tiny")
    os.makedirs(out, exist_ok=True)
    model_dir = os.path.join(out, "model")
    tiny_causal_lm("llama", num_layers=4, hidden_size=32, seed=0).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    with open(os.path.join(out, "data.jsonl"), "w", encoding="utf-8") as fh:
        for text in sample_texts(64, seed=5):
            fh.write(json.dumps({"text": text}) + "\n")
    return out


if __name__ == "__main__":
    print(make_tiny(sys.argv[1] if len(sys.argv) > 1 else "."))
