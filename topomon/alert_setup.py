"""Which alert rules a stage runs: the configured ones, checked against what the stage captures.

``alerts`` is ``"default"``, a detector's name, or a list of rule mappings and names
(:func:`alert_rules`); a name's rules follow the capture (the deepest captured layer when
``final_norm`` is not, without the any-of parts whose family is off). :func:`alert_engine` refuses,
before step 1, a rule on a metric the options never produce or a layer never captured, and an action
naming a rule that does not exist.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from typing import Any

from topomon.alerts import SHIPPED, TRAINER_LAYER, AlertEngine, default_rules, rules_from_config
from topomon.capture.layers import FINAL_NORM
from topomon.config import ConfigError, MonitorConfig
from topomon.metrics.families import MODEL_LAYER, explain_unknown, family_of, metric_names
from topomon.metrics.options import ComputeOptions

__all__ = ["alert_engine", "alert_rules", "rules_on_layers", "available_default_parts"]

logger = logging.getLogger("topomon")

_ANY_LAYER = ("*", "mean")  # rule layers that are not one captured layer


def alert_engine(
    c: MonitorConfig, options: ComputeOptions, layers: Sequence[str] | None
) -> AlertEngine | None:
    """The stage's alert engine (None with ``alerts=None``), every rule and action checked.

    Args:
        c: the monitor config (``alerts``, ``actions``).
        options: the worker's options: the rules are checked against the metrics they produce.
        layers: the captured layer names; None: not checked.

    Raises:
        ConfigError: a rule names a metric these options do not produce (naming the family and the
            config field that turns it on when the metric's family is off), or a layer that is not
            captured (naming those that are); an action names a rule no rule has, or acts with
            ``alerts=None``.
    """
    engine = None
    if c.alerts is not None:
        rules = alert_rules(c.alerts, layers, options)
        for rule in rules:
            for metric in rule.metrics:
                why = explain_unknown(metric, options)
                if why is not None:
                    raise ConfigError(f"`alerts`: rule {rule.name!r}: {why}")
            for layer, metric in rule.series:
                fam = family_of(metric)
                if (
                    fam is not None
                    and fam.layers_option is not None
                    and layer not in _ANY_LAYER
                    and not fam.computed_on(layer, options)
                ):
                    raise ConfigError(
                        f"`alerts`: rule {rule.name!r} watches {metric!r} at layer {layer!r}, where the "
                        f"{fam.name} family is not computed ({fam.layers_option}: "
                        f"{list(fam.settings(options)[fam.layers_option])}): add the layer to "
                        f"`{fam.layers_option}`, or watch one of those layers"
                    )
        try:
            engine = AlertEngine(rules, metric_names(options))
        except ValueError as e:
            raise ConfigError(f"`alerts`: {e}") from None
    _check_action_rules(c, [r.name for r in engine.rules] if engine is not None else None)
    return engine


def rules_on_layers(rules: list[Any], layers: list[str], *, default: bool) -> list[Any]:
    """The alert rules checked against the captured ``layers``: none may watch a layer never captured.

    Args:
        rules: the rules.
        layers: the captured layer names (capture order: the deepest last).
        default: ``rules`` are the default rules: those on ``final_norm`` move to the deepest captured
            layer when ``final_norm`` is not captured (one warning) instead of never firing.

    Returns:
        The rules to run.

    Raises:
        ConfigError: a rule watches a layer that is not captured (the captured layers named).
    """
    valid = {*layers, "*", "mean", MODEL_LAYER, TRAINER_LAYER}
    if default and FINAL_NORM not in layers and layers:
        configs = [_moved(r.config(), layers[-1], top=True) for r in rules]
        if configs != [r.config() for r in rules]:
            logger.warning(
                "topomon: %s is not captured; the default alert rules watch %s instead",
                FINAL_NORM,
                layers[-1],
            )
            rules = rules_from_config(configs)
    for rule in rules:
        for layer, _ in rule.series:  # a composite: every part's layer
            if layer not in valid:
                raise ConfigError(
                    f"`alerts`: rule {rule.name!r} watches layer {layer!r}, which is not captured; "
                    f"the captured layers are {layers} (or '*', 'mean', {MODEL_LAYER!r}, "
                    f"{TRAINER_LAYER!r}): change the rule's `layer`, or capture it (`layers`, `final_norm`)"
                )
    return rules


def _moved(config: dict[str, Any], layer: str, *, top: bool) -> dict[str, Any]:
    """A rule's config with every part on ``final_norm`` moved to ``layer``.

    A moved top-level rule takes its default name (which names the layer); a part keeps its own.
    """
    if "parts" in config:
        return {**config, "parts": [_moved(p, layer, top=False) for p in config["parts"]]}
    if config.get("layer") != FINAL_NORM:
        return config
    return {**config, "layer": layer, **({"name": None} if top else {})}


def available_default_parts(rules: list[Any], options: ComputeOptions) -> list[Any]:
    """The default rules without the parts of an any-of rule whose metric family is off.

    A warning names the parts left out (``logits=False`` leaves v2's geometry and loss parts). A rule
    left with one part is that part, under the rule's name; a top-level rule, or one left with no
    part, is kept as it is for :func:`alert_engine` to refuse.
    """
    out = []
    for rule in rules:
        cfg = rule.config()
        if "parts" not in cfg or cfg.get("k") != 1:
            out.append(rule)
            continue
        keep = [
            p
            for p in cfg["parts"]
            if all(explain_unknown(m, options) is None for m in rules_from_config([p])[0].metrics)
        ]
        off = [p["name"] for p in cfg["parts"] if p not in keep]
        if not off or not keep:
            out.append(rule)
            continue
        logger.warning(
            "topomon: the default alert %r runs without its part(s) %s, whose metrics are off",
            rule.name,
            off,
        )
        out.extend(
            rules_from_config([{**cfg, "parts": keep}] if len(keep) > 1 else [{**keep[0], "name": rule.name}])
        )
    return out


def alert_rules(alerts: Any, layers: Sequence[str] | None, options: ComputeOptions) -> list[Any]:
    """The rules of the ``alerts`` field, checked against the captured ``layers``.

    ``alerts`` is ``"default"``, a detector's name (:data:`topomon.alerts.DETECTORS`) or a list whose
    items are rule mappings or such names (``["default", {...}]``: the default rules and one more).
    A name's rules watch the deepest captured layer when ``final_norm`` is not captured, and lose the
    any-of parts whose family is off (:func:`rules_on_layers`, :func:`available_default_parts`); a
    rule two names share (the non-finite rule) is kept once.

    Raises:
        ConfigError: a rule on a layer that is not captured.
    """
    rules: list[Any] = []
    for item in [alerts] if isinstance(alerts, str) else list(alerts):
        named = isinstance(item, str)
        if isinstance(item, str):
            got = default_rules(SHIPPED if item == "default" else item)
        else:
            got = rules_from_config([item])
        if layers is not None:
            got = rules_on_layers(got, list(layers), default=named)
        if named:
            got = available_default_parts(got, options)
        have = [r.config() for r in rules]
        rules += [r for r in got if not (named and r.config() in have)]
    return rules


def _check_action_rules(c: MonitorConfig, names: list[str] | None) -> None:
    """Every rule an action names is one of the alert rules (an action on no rule would never act)."""
    from topomon.interventions.actions import ActionSpec

    for i, spec in enumerate(ActionSpec.from_dict(a) for a in c.actions):
        if names is None:
            raise ConfigError(
                f"`actions[{i}]` ({spec.kind!r}) acts on alerts, but `alerts` is None: no alert could "
                "trigger it; set `alerts` (e.g. 'default')"
            )
        missing = [w for w in spec.rules if w not in names]
        if missing:
            close = {w: difflib.get_close_matches(w, names, n=2) for w in missing}
            hint = "".join(f"; {w!r}: did you mean {m}?" for w, m in close.items() if m)
            raise ConfigError(
                f"`actions[{i}]` ({spec.kind!r}) names alert rule(s) {missing} that no rule has: the "
                f"alert rules are {names}{hint}"
            )
