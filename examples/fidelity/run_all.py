"""Train every run of claims 1-3 (results under ``results/``), in one or two parallel parts.

``--part helpful``: the shared LoRA SFT(+DPO) runs on real replies (claims 1, 2, 3); ``others``: the
refusal and mixed SFT runs (claim 2), interleaved by seed; ``high_lr``: SFT at lr 8e-4 (claim 3);
``full``: full fine-tuning (claim 1). Run parts in parallel processes, then the claim scripts with
``--no-train`` (or run the claim scripts directly: they train what is missing, one run at a time).

    for p in helpful others high_lr full; do python examples/fidelity/run_all.py --part $p & done; wait
"""

from __future__ import annotations

import argparse

from claim1_transient import full_ft_spec
from claim2_objectives import objective_spec
from claim3_entropy import high_lr_spec
from common import Spec, add_common_arguments, helpful_spec, run

__all__ = ["specs", "main"]


def specs(part: str, seeds: list[int], smoke: bool) -> list[Spec]:
    """The runs of one part, in the order they are trained."""
    if part == "helpful":
        return [helpful_spec(s, smoke) for s in seeds]
    if part == "high_lr":
        return [high_lr_spec(s, smoke) for s in seeds]
    if part == "full":
        return [full_ft_spec(s, smoke) for s in seeds]
    out = []
    for s in seeds:
        out += [
            objective_spec("refusal", s, smoke),
            objective_spec("mixed", s, smoke),
        ]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p)
    p.add_argument("--part", choices=("helpful", "others", "high_lr", "full", "all"), default="all")
    a = p.parse_args(argv)
    parts = ("helpful", "others", "high_lr", "full") if a.part == "all" else (a.part,)
    for part in parts:
        for spec in specs(part, a.seeds, a.smoke):
            run(spec, a.work, force=a.force)


if __name__ == "__main__":
    main()
