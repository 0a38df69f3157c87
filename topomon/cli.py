"""The ``topomon`` command: ``demo``, ``probe``, ``report``, ``alerts``, ``layers``, TRL's ``sft``, ..."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from topomon import __version__

__all__ = ["main", "build_parser"]

DESCRIPTION = """\
topomon watches the geometry and topology of a language model's hidden states while it is
fine-tuned (Trainer, TRL, PEFT). In a training script:

    from topomon import TopoMonitor
    TopoMonitor(stage="sft").attach(trainer)      # or callbacks=[TopoMonitor()]

This command runs the demo and works on run directories offline.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``topomon`` command."""
    p = argparse.ArgumentParser(
        prog="topomon", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"topomon {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    from topomon.demo.run import add_arguments

    d = sub.add_parser(
        "demo",
        help="three-stage post-training of SmolLM2-135M (SFT -> DPO -> narrow), monitored; builds the report",
        description="A real sequential post-training on 2 CPU cores in a few minutes, with alerts and an "
        "intervention; prints where the TensorBoard logs and the HTML report are.",
    )
    add_arguments(d)

    r = sub.add_parser(
        "report",
        help="build the HTML report of a run directory",
        description="Build "
        "RUN_DIR/report.html (figures embedded; PNGs in RUN_DIR/report/) from the run directory alone.",
    )
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument(
        "--out",
        default=None,
        help="where to write the HTML (default RUN_DIR/report.html); its PNGs go beside it (r.html -> r/)",
    )
    r.add_argument("--title", default=None)

    al = sub.add_parser(
        "alerts",
        help="the alerts and actions of a run directory (a table, or JSON lines with --json)",
        description="Print the alerts that fired and the actions they caused, from RUN_DIR/alerts.jsonl "
        "(metrics.jsonl is not read, so it is cheap to poll during training). Without --json: two "
        "aligned tables, alerts (stage, step, rule, level/reason, metric@layer, message) and actions "
        "(stage, step, action, what it did, the rule that caused it). With --json: JSON Lines on "
        'stdout, one object per alert or action ordered by global step, with the key "kind" '
        '("alert" or "action"); alerts: stage, step, rule, severity, reason, metric, layer, value, '
        "reference, message, time; actions: stage, step, action, params, revert, cause (the rule), "
        "message, spec, time; non-finite numbers are null; nothing is printed when there is none. "
        "Notes (torn lines skipped) go to stderr with --json. Exit status 0, also without alerts; 2 "
        "when RUN_DIR is not a run directory.",
    )
    al.add_argument("run_dir", metavar="RUN_DIR")
    al.add_argument("--json", action="store_true", help="JSON Lines for scripts (one object per line)")

    pr = sub.add_parser(
        "probe",
        help="the monitor's metrics for saved checkpoints (a dense checkpoint analysis)",
        description="Load each checkpoint, run the run's probe set through it as the live monitor does, and "
        "write the metrics into RUN_DIR like a live stage.",
    )
    pr.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="model folders, in step order")
    pr.add_argument(
        "--run-dir", required=True, help="the run directory to write into (its probes are reused)"
    )
    pr.add_argument("--stage", default="probe", help="stage name of the records (default: probe)")
    pr.add_argument("--like", default=None, help="copy the monitor config of this live stage of the run")
    pr.add_argument("--config", default=None, help="a monitor config YAML (instead of --like)")
    pr.add_argument("--base-model", default=None, help="base model folder, for PEFT adapter checkpoints")
    pr.add_argument("--steps", default=None, help="comma-separated global steps (default: from checkpoint-N)")

    ly = sub.add_parser(
        "layers",
        help="zigzag persistence similarity across layers: which blocks are redundant (pruning hints)",
        description="Capture the last-token state of every decoder block for a fixed text set, compute "
        "zigzag "
        "barcodes across depth and the layer x layer persistence similarity (Gardinazzi et al.); write "
        "layers.json and layer_similarity.png into RUN_DIR and print the ranked pruning candidates.",
    )
    ly.add_argument(
        "model", metavar="MODEL", help="a model folder, or 'smollm2' for the packaged SmolLM2-135M"
    )
    ly.add_argument("--run-dir", required=True, help="where to write layers.json and layer_similarity.png")
    ly.add_argument("--probes", default=None, help="texts (.txt / .jsonl); default: 256 Python-doc sentences")
    ly.add_argument("--n-texts", type=int, default=256, help="how many default texts (default 256)")
    ly.add_argument("--k", type=int, default=10, help="neighbours of the kNN complexes (default 10)")
    ly.add_argument("--top-k", type=int, default=4, help="pruning candidates to print (default 4)")
    _add_trl_commands(sub)
    return p


def _add_trl_commands(sub: argparse._SubParsersAction) -> None:
    """``topomon sft|dpo|...`` (TRL's scripts, monitored; they parse their own arguments) and helpers."""
    from topomon.trl_cli import COMMANDS

    for name in COMMANDS:
        sub.add_parser(
            name,
            add_help=False,
            help=f"`trl {name} --config recipe.yaml`, monitored (topomon {name} --help)",
        )
    dd = sub.add_parser(
        "demo-data",
        help="write the demo's data as JSONL (and link SmolLM2) for the recipes in recipes/demo",
    )
    dd.add_argument("--out", default="demo_data", help="folder to write (default: demo_data)")
    dd.add_argument("--seed", type=int, default=0)
    dd.add_argument("--no-model", action="store_true", help="only the data, no SmolLM2 model folder")
    ml = sub.add_parser(
        "merge-lora",
        help="merge a LoRA adapter (a `use_peft` run's output_dir) into its base model",
        description="Save base model + adapter as one plain model: the input of the next recipe "
        "(SFT -> DPO).",
    )
    ml.add_argument("adapter", metavar="ADAPTER_DIR")
    ml.add_argument("--out", required=True, help="folder for the merged model")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    from topomon.trl_cli import COMMANDS

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:  # TRL's parser reads these arguments, not argparse here
        from topomon.trl_cli import launch

        return launch(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 0
    if args.command == "demo":
        from topomon.demo.run import DemoSettings, run_demo

        run_demo(
            DemoSettings(
                out=args.out,
                sft_steps=args.sft_steps,
                dpo_steps=args.dpo_steps,
                narrow_steps=args.narrow_steps,
                seed=args.seed,
                quick=args.quick,
            )
        )
        return 0
    if args.command == "report":
        from topomon.report.html import build_report

        try:
            path = build_report(args.run_dir, args.out, title=args.title)
        except (FileNotFoundError, ValueError) as e:
            print(f"topomon report: {e}", file=sys.stderr)
            return 2
        print(path)
        return 0
    if args.command == "alerts":
        return _alerts(args)
    if args.command == "probe":
        from topomon.config import ConfigError, MonitorConfig
        from topomon.offline import probe_checkpoints

        try:
            config = MonitorConfig.from_yaml(args.config) if args.config else None
            steps = [int(x) for x in args.steps.split(",")] if args.steps else None
            records = probe_checkpoints(
                args.checkpoints,
                args.run_dir,
                stage=args.stage,
                config=config,
                like=args.like,
                steps=steps,
                base_model=args.base_model,
            )
        except (ConfigError, FileNotFoundError, ValueError) as e:
            print(f"topomon probe: {e}", file=sys.stderr)
            return 2
        print(f"wrote {len(records)} records into {args.run_dir}/metrics.jsonl")
        return 0
    if args.command == "demo-data":
        from topomon.trl_cli import write_demo_data

        for name, path in write_demo_data(args.out, seed=args.seed, model=not args.no_model).items():
            print(f"{name}: {path}")
        return 0
    if args.command == "merge-lora":
        from topomon.trl_cli import merge_lora

        try:
            print(merge_lora(args.adapter, args.out))
        except FileNotFoundError as e:
            print(f"topomon merge-lora: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "layers":
        return _layers(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


def _alerts(args: argparse.Namespace) -> int:
    from topomon.report.alert_log import format_table, json_lines
    from topomon.report.load import load_alert_log

    try:
        run = load_alert_log(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"topomon alerts: {e}", file=sys.stderr)
        return 2
    if not args.json:
        print(format_table(run))
        return 0
    for line in json_lines(run):
        print(line)
    for note in run.notes:
        print(f"topomon alerts: note: {note}", file=sys.stderr)
    return 0


def _layers(args: argparse.Namespace) -> int:
    from topomon.capture.probes import ProbeError, load_probes
    from topomon.layers import analyze_layers

    try:
        if args.probes:
            texts = load_probes(args.probes)
        else:
            from topomon.testing import sample_texts

            texts = sample_texts(args.n_texts)
    except (ProbeError, ValueError) as e:
        print(f"topomon layers: {e}", file=sys.stderr)
        return 2
    if args.model == "smollm2":
        from topomon.models import load_smollm2

        model, tok = load_smollm2()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(args.model)
            tok = AutoTokenizer.from_pretrained(args.model)
        except OSError as e:
            print(f"topomon layers: cannot load {args.model!r}: {e}", file=sys.stderr)
            return 2
    analysis = analyze_layers(model, tok, texts, k=args.k)
    analysis.save(args.run_dir, top_k=args.top_k)
    print(f"pruning candidates (most redundant first): {analysis.prune_candidates(args.top_k)}")
    print(f"wrote {args.run_dir}/layers.json and {args.run_dir}/layer_similarity.png")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
