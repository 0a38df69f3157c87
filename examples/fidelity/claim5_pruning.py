"""Claim 5: persistence similarity across layers finds prunable layers (Gardinazzi et al.).

The measurement is ``examples/prune_layers.py`` (``topomon layers`` + held-out perplexity after
dropping blocks, about 40 minutes on 2 shared cores), written to ``docs/PRUNING.md``. This script
only reads that table back (no model, seconds) and draws it: held-out perplexity against the
number of dropped blocks for the zigzag top-k, random-k (mean and range of the draws), last-k and
zigzag bottom-k choices. Writes ``results/claim5_summary.json`` and
``docs/img/fidelity/claim5_pruning.png``.

    python examples/fidelity/claim5_pruning.py
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

from common import IMG, write_json

__all__ = ["parse_pruning_table", "main"]

PRUNING_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "PRUNING.md")


def _cell(text: str) -> dict[str, float]:
    """``"123.7 ± 77.9 (72.4-258.3)"`` or ``"72.42"`` -> mean (and sd, lo, hi when given)."""
    nums = [float(x) for x in re.findall(r"[0-9]+(?:\.[0-9]+)?", text)]
    if not nums:
        raise ValueError(f"no number in table cell {text!r}")
    if len(nums) >= 4:
        return {"mean": nums[0], "sd": nums[1], "lo": nums[2], "hi": nums[3]}
    return {"mean": nums[0]}


def parse_pruning_table(text: str) -> list[dict[str, Any]]:
    """Rows of the perplexity table of ``docs/PRUNING.md``: which, k, blocks, ppl per eval set."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[1].isdigit():
            continue
        rows.append(
            {
                "which": cells[0],
                "k": int(cells[1]),
                "blocks": cells[2],
                "ppl_pydoc": _cell(cells[3]),
                "ppl_chitchat": _cell(cells[4]),
            }
        )
    if not rows:
        raise ValueError("no perplexity table found in docs/PRUNING.md")
    return rows


def figure(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next(r for r in rows if r["k"] == 0)
    styles = {
        "zigzag top-k": ("tab:green", "o-"),
        "random k": ("tab:gray", "s--"),
        "last k": ("tab:orange", "^-"),
        "zigzag bottom-k": ("tab:red", "v-"),
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in (
        (axes[0], "ppl_pydoc", "held-out pydoc sentences"),
        (axes[1], "ppl_chitchat", "held-out chit-chat"),
    ):
        for name, (colour, fmt) in styles.items():
            rs = sorted((r for r in rows if r["which"].startswith(name)), key=lambda r: r["k"])
            ks = [r["k"] for r in rs]
            ys = [r[key]["mean"] for r in rs]
            ax.plot(
                ks,
                ys,
                fmt,
                color=colour,
                label=name + (" (mean of 5 draws; range)" if "random" in name else ""),
            )
            if "random" in name:
                ax.fill_between(
                    ks, [r[key]["lo"] for r in rs], [r[key]["hi"] for r in rs], color=colour, alpha=0.2
                )
        ax.axhline(full[key]["mean"], color="k", lw=0.8, ls=":", label="full model")
        ax.set_yscale("log")
        ax.set_xticks([1, 2, 4])
        ax.set_xlabel("decoder blocks dropped (k)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "Claim 5: SmolLM2-135M-Instruct, blocks dropped by zigzag persistence similarity (docs/PRUNING.md)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pruning-md", default=PRUNING_MD)
    a = p.parse_args(argv)
    with open(a.pruning_md, encoding="utf-8") as fh:
        rows = parse_pruning_table(fh.read())
    os.makedirs(IMG, exist_ok=True)
    png = os.path.join(IMG, "claim5_pruning.png")
    figure(rows, png)
    summary = {"source": "docs/PRUNING.md", "rows": rows}
    write_json("claim5_summary.json", summary, False)
    print(f"figure: {png}")
    for r in rows:
        print(
            f"{r['which']:<40} k={r['k']}  pydoc {r['ppl_pydoc']['mean']:>12.2f}  "
            f"chitchat {r['ppl_chitchat']['mean']:>12.2f}"
        )
    return summary


if __name__ == "__main__":
    main()
