"""A training script whose custom metric is defined in the script itself (run as ``__main__``; not a test).

Usage: ``python tests/integrations/main_metric_script.py OUT WORKER``. No ``__main__`` guard, as many
training scripts are written: a worker process that imported the script would train again.
"""

import sys

import numpy as np
import torch

import topomon
from topomon.testing import sample_texts, tiny_causal_lm, tiny_tokenizer


def mean_norm(x: np.ndarray) -> float:
    """The metric, defined in the training script."""
    return float(np.linalg.norm(x, axis=1).mean())


out, worker = sys.argv[1], sys.argv[2]
tok = tiny_tokenizer()
model = tiny_causal_lm("llama", seed=0)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
texts = sample_texts(8, seed=5)
with topomon.watch(
    model,
    tok,
    output_dir=out,
    worker=worker,
    custom_metrics={"cm": "__main__:mean_norm"},
    schedule="every",
    every_n_steps=1,
    topology=False,
    figures_every=0,
) as mon:
    for step in (1, 2):
        enc = tok(texts[(step - 1) * 4 : step * 4], return_tensors="pt", padding=True)
        model(**enc, labels=enc["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
        mon.step(step)
print("health", mon.health()["monitor_errors"], mon.health()["lost"])
