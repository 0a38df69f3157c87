"""Axolotl plugin: ``plugins: [topomon.integrations.axolotl.TopoMonPlugin]`` in an Axolotl YAML.

Axolotl adds callbacks to its trainer only through plugins. Two lines in the training YAML enable the
monitor, and an optional ``topomon:`` section configures it with the keys of a TRL recipe's
``topomon:`` section (:func:`topomon.trl_cli.monitor_spec`: the fields of
:class:`~topomon.config.MonitorConfig` plus ``preset``)::

    plugins:
      - topomon.integrations.axolotl.TopoMonPlugin
    topomon:
      preset: light          # or standard, full, or a MonitorConfig YAML file
      every_n_steps: 20

How it hooks into Axolotl (0.19 to 0.21, read from its ``axolotl/integrations/base.py``,
``integrations/config.py`` and ``core/builders``):

- ``get_input_args`` names :class:`TopoMonArgs`, a pydantic model that Axolotl mixes into its config
  schema (``merge_input_args``). Its validator builds the monitor's config from the ``topomon:``
  section, so an unknown key, a bad value or an unknown preset fails ``axolotl.cli.config.load_cfg``
  (``axolotl train cfg.yaml`` stops before the model is loaded), with the message naming the key.
- ``add_callbacks_post_trainer(cfg, trainer)`` (called by the trainer builders once the trainer exists;
  Axolotl then ``trainer.add_callback``-s what it returns) builds one
  :class:`~topomon.integrations.hf.TopoMonitor`, installs into the trainer what its actions need
  (``monitor.install(trainer)``: the ``entropy_bonus`` of a GRPO stage) and returns it. ``stage``
  defaults to the config's ``rl`` (``dpo``, ``grpo``, ...) or ``sft``; ``run_dir`` to
  ``<output_dir>/topomon``.

Not available under Axolotl: a ``replay`` action and ``replay_dataset`` (Axolotl tokenises and packs its
own data; replay examples would have to be in that form). Both are a configuration error, never ignored.

This module imports Axolotl (its ``BasePlugin``) and pydantic; it is imported by Axolotl, not by topomon.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, field_validator

from topomon.config import ConfigError
from topomon.interventions import runnable_kinds, unsupported
from topomon.trl_cli import MonitorSpec, monitor_spec

try:
    from axolotl.integrations.base import BasePlugin
except ImportError as e:  # pragma: no cover - the module is only used by Axolotl
    raise ImportError(
        "topomon.integrations.axolotl is a plugin for Axolotl and needs it (`pip install axolotl`); "
        f"importing axolotl.integrations.base failed: {e}"
    ) from e

__all__ = ["TopoMonArgs", "TopoMonPlugin", "axolotl_spec", "SECTION"]

SECTION = "topomon"
"""The key of the monitor's section in an Axolotl YAML."""

PROVIDES = frozenset({"pre_optimizer_step", "grpo_trainer"})
"""What the plugin gives an intervention (of REQUIREMENTS): the callback, and the trainer it installs into
(``monitor.install``; Axolotl's GRPO trainer is TRL's)."""

_NO_DATA = (
    "not available in the Axolotl plugin: Axolotl tokenises and packs its own data and the replay "
    "examples would have to be in that form"
)


def _check_actions(actions: Any) -> None:
    """Refuse the actions whose requirements the plugin does not provide (the registry says which)."""
    if not isinstance(actions, (list, tuple)):
        return  # the config says what is wrong with it
    works = ", ".join(runnable_kinds(PROVIDES))
    why = unsupported(
        actions,
        PROVIDES,
        {
            "trainer_data": f"it is {_NO_DATA}; remove it (the {works} actions work)",
        },
    )
    if why is not None:
        raise ConfigError(why)


def _plain(value: Any) -> Any:
    """Plain dicts and lists (Axolotl hands its ``DictDefault``, an ``addict.Dict``, down the tree)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _stage(rl: Any) -> str:
    """The default stage: Axolotl's ``rl`` (a str or a str enum such as ``RLType.DPO``), else ``sft``."""
    if rl is None or rl is False or rl == "":
        return "sft"
    return str(getattr(rl, "value", rl))


def axolotl_spec(section: Any, *, rl: Any = None) -> MonitorSpec:
    """The monitor's validated configuration from the ``topomon:`` section of an Axolotl config.

    The section is read by :func:`topomon.trl_cli.monitor_spec`, as a TRL recipe's section is: the
    same keys, presets and messages.

    Args:
        section: the ``topomon:`` mapping (None: the defaults).
        rl: Axolotl's ``rl`` setting; the default ``stage`` is its value, or ``"sft"`` without one.

    Returns:
        The spec (its ``config`` is what the monitor runs with; ``replay_datasets`` is always empty).

    Raises:
        ConfigError: the section is not a mapping, has an unknown key (named, with the closest field),
            a bad value or an unknown preset, or configures an action the plugin cannot run (one that
            requires the trainer's data, such as ``replay``).

    Example:
        >>> axolotl_spec({"preset": "light", "every_n_steps": 20}).config.every_n_steps  # doctest: +SKIP
        20
    """
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError(
            f"the `{SECTION}:` section must be a mapping of monitor settings (MonitorConfig fields and "
            f"`preset`), got {section!r}"
        )
    section = _plain(section)
    if "replay_dataset" in section:
        raise ConfigError(f"`replay_dataset` is {_NO_DATA}; remove it")
    _check_actions(section.get("actions"))
    spec = monitor_spec(section, preset=None, command=_stage(rl))
    _check_actions(spec.config.actions)  # from a preset file
    return spec


class TopoMonArgs(BaseModel):
    """The plugin's key in Axolotl's config schema: ``topomon:``, validated when Axolotl loads the YAML.

    Attributes:
        topomon: the monitor's section (see :func:`axolotl_spec`); None: the defaults.
    """

    topomon: dict[str, Any] | None = None

    @field_validator("topomon", mode="before")
    @classmethod
    def _check_section(cls, value: Any) -> Any:
        """Build the monitor's config once, so that a wrong section stops ``load_cfg``."""
        if value is None:
            return None
        axolotl_spec(value)  # ConfigError is a ValueError: pydantic reports it with the field's name
        return _plain(value)


class TopoMonPlugin(BasePlugin):
    """Adds a :class:`~topomon.integrations.hf.TopoMonitor` to the trainer Axolotl builds.

    Attributes:
        monitors: the monitors this plugin added, in order (one per trainer built).

    Example (the Axolotl YAML)::

        plugins:
          - topomon.integrations.axolotl.TopoMonPlugin
        topomon:
          preset: light
    """

    def __init__(self) -> None:
        super().__init__()
        self.monitors: list[Any] = []

    def get_input_args(self) -> str:
        """The pydantic model Axolotl merges into its config schema (by import path)."""
        return f"{__name__}.TopoMonArgs"

    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list[Any]:
        """Build the monitor from ``cfg.topomon``, install it into ``trainer``; Axolotl adds the callback.

        Raises:
            ConfigError: the ``topomon:`` section is wrong (normally already caught by the schema), or
                an action cannot be installed on this trainer (``entropy_bonus`` outside GRPO).
        """
        from topomon.integrations.hf import TopoMonitor

        spec = axolotl_spec(cfg.get(SECTION), rl=cfg.get("rl"))
        monitor = TopoMonitor(spec.config, tokenizer=getattr(trainer, "processing_class", None))
        monitor.install(trainer)
        self.monitors.append(monitor)
        return [monitor]
