"""The checks behind :class:`~topomon.config.MonitorConfig`: one per field, each naming the field.

Every wrong value raises :class:`ConfigError` naming the field, the value and what is allowed,
before training starts (:func:`check_fields`, run by the config's constructor). The config itself,
its YAML and its presets are in :mod:`topomon.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import urllib.parse
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from topomon._validate import check_int, check_number, check_str
from topomon.sinks.registry import TRACKERS

#: MonitorConfig fields that shape the probe set, so mode 'probe' only
PROBE_SET_OPTIONS = ("probes", "probe_field", "max_probes", "max_length", "probe_batch_size", "pooling")

__all__ = ["CHOICES", "TRACKERS", "ConfigError", "check_fields"]


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and what is allowed."""


ConfigError.__module__ = "topomon.config"  # its public home: tracebacks and pickles name it there

CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("probe", "passive"),
    "pooling": ("all", "last", "mean"),
    "schedule": ("log", "every", "steps"),
    "worker": ("process", "thread", "sync"),
    "topology_engine": ("auto", "ripser", "giotto"),
    "massive_treatment": ("robust", "cut", "robust_dims", "dims"),
    "worker_priority": ("idle", "low", "normal"),
}


def _family_switches() -> tuple[str, ...]:
    """The config fields that switch topomon's own metric families on and off (their declarations)."""
    from topomon.metrics.builtin_families import BUILTIN

    return tuple(f.switch for f in BUILTIN if f.switch is not None and f.switch in f.options)


def _check_family_options(value: Any) -> None:
    """``family_options`` is ``{family name: {option name: value}}`` (names are checked at set-up)."""
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Mapping) and all(isinstance(o, str) for o in v)
        for k, v in value.items()
    ):
        raise ConfigError(
            "`family_options` must be a mapping of family name -> mapping of option name -> value, "
            f"got {value!r}"
        )


def check_fields(c: Any) -> None:
    """Check every field of a :class:`~topomon.config.MonitorConfig` (``c``), normalising ``trackers``.

    The config's own ``__post_init__`` calls it: a config that exists is valid.

    Raises:
        ConfigError: the first wrong field, named with its value and what is allowed.
    """
    for name, choices in CHOICES.items():
        value = getattr(c, name)
        if value not in choices:
            raise ConfigError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}")
    _require_str("stage", c.stage)
    if (
        not c.stage
        or any(ch in c.stage for ch in "/\\")
        or c.stage in (".", "..")
        or not c.stage.isprintable()
    ):
        raise ConfigError(
            f"`stage` must be a non-empty name without slashes or control characters, "
            f"other than '.' and '..', got {c.stage!r}"
        )
    for name in ("run_dir", "logging_dir"):
        v = getattr(c, name)
        if v is not None and not isinstance(v, (str, os.PathLike)):
            raise ConfigError(f"`{name}` must be a path or None, got {type(v).__name__}")
    for name in (
        "tensorboard",
        "final_norm",
        "exclude_first",
        "normalize",
        *_family_switches(),
    ):
        if not isinstance(getattr(c, name), bool):
            raise ConfigError(f"`{name}` must be true or false, got {getattr(c, name)!r}")
    for name, low in (
        ("max_probes", 1),
        ("max_length", 2),
        ("probe_batch_size", 1),
        ("max_points", 3),
        ("every_n_steps", 1),
        ("topology_points", 3),
        ("queue_size", 1),
        ("worker_threads", 1),
        ("figures_every", 0),
    ):
        _require_int(name, getattr(c, name), low)
    _require_int("seed", c.seed, 0)
    if c.seed > 2**32 - 1:
        raise ConfigError(f"`seed` must be an int in [0, 2**32 - 1], got {c.seed!r}")
    if c.step_offset is not None:
        _require_int("step_offset", c.step_offset, 0)
    from topomon.alerts import DETECTORS

    detectors = ["default", *DETECTORS]
    listed = isinstance(c.alerts, (list, tuple))
    if not (c.alerts is None or c.alerts in detectors or listed):
        raise ConfigError(
            f"`alerts` must be 'default', a detector of topomon.alerts.DETECTORS ({list(DETECTORS)}), "
            f"a list of rules (mappings, or those names) or None, got {c.alerts!r}"
        )
    if listed:
        from topomon.alerts import rules_from_config

        for i, item in enumerate(c.alerts):
            if isinstance(item, str) and item not in detectors:
                raise ConfigError(
                    f"`alerts[{i}]`: a name in a list of rules must be one of {detectors}, got {item!r}"
                )
        try:
            rules_from_config([a for a in c.alerts if not isinstance(a, str)])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"`alerts`: {e}") from None
    if not isinstance(c.actions, tuple) or not all(isinstance(a, Mapping) for a in c.actions):
        raise ConfigError(f"`actions` must be a list of mappings (action specs), got {c.actions!r}")
    from topomon.interventions.actions import ActionSpec

    for i, spec in enumerate(c.actions):
        try:
            ActionSpec.from_dict(spec)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"`actions[{i}]`: {e}") from None
    if not isinstance(c.diversity, Mapping):
        raise ConfigError(f"`diversity` must be a mapping of regulariser options, got {c.diversity!r}")
    _check_intervention_options(c)
    if c.webhook_url is not None:
        _check_webhook_url(c.webhook_url)
    if c.trackers is not None:
        object.__setattr__(c, "trackers", _check_trackers(c.trackers))
    for name in ("pca_dim", "n_landmarks"):
        v = getattr(c, name)
        if v is not None:
            _require_int(name, v, 2)
    if c.outlier_factor is not None:
        _require_number("outlier_factor", c.outlier_factor, 1.0)
    _require_number("task_timeout", c.task_timeout, 0.001)
    _require_number("max_snapshot_mb", c.max_snapshot_mb, 0.001)
    _require_number("flush_timeout", c.flush_timeout, 0.0)
    b = c.overhead_budget
    if b is not None and b != "auto":
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 < b <= 1.0:
            raise ConfigError(
                f"`overhead_budget` must be 'auto', a fraction in (0, 1] (0.01 = 1% of the training "
                f"time) or None (capture exactly on schedule), got {b!r}"
            )
    if c.layers != "auto":
        if isinstance(c.layers, (str, bytes)) or not isinstance(c.layers, Sequence) or not c.layers:
            raise ConfigError(f"`layers` must be 'auto' or a non-empty list of ints, got {c.layers!r}")
        for i in c.layers:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ConfigError(f"`layers` must hold ints (negative counts from the end), got {i!r}")
    if c.topology_layers is not None and c.topology_layers != "all":
        tl = c.topology_layers
        if not isinstance(tl, Sequence) or isinstance(tl, (str, bytes)):
            raise ConfigError(
                f"`topology_layers` must be None (the last captured layer), 'all', or a list of "
                f"ints / 'final_norm', got {c.topology_layers!r}"
            )
        for i in c.topology_layers:
            if not (i == "final_norm" or (isinstance(i, int) and not isinstance(i, bool))):
                raise ConfigError(f"`topology_layers` items must be ints or 'final_norm', got {i!r}")
    if c.schedule == "steps" and not c.steps:
        raise ConfigError("`steps` must list at least one step when `schedule` is 'steps'")
    if not isinstance(c.steps, tuple) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in c.steps
    ):
        raise ConfigError(f"`steps` must be a list of non-negative ints, got {c.steps!r}")
    w = c.alpha_window
    if (
        not isinstance(w, tuple)
        or len(w) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in w)
        or not 1 <= w[0] < w[1]
        or w[1] - w[0] < 2
    ):
        raise ConfigError(f"`alpha_window` must be two ints 1 <= lo < hi with hi - lo >= 2, got {w!r}")
    if not isinstance(c.probe_field, str) or not c.probe_field:
        raise ConfigError(f"`probe_field` must be a non-empty string, got {c.probe_field!r}")
    _check_family_options(c.family_options)
    if not isinstance(c.custom_metrics, Mapping):
        raise ConfigError(f"`custom_metrics` must map names to 'module:function', got {c.custom_metrics!r}")
    for k, v in c.custom_metrics.items():
        if not isinstance(k, str) or not k or not isinstance(v, str) or v.count(":") != 1:
            raise ConfigError(f"`custom_metrics` entries must be name: 'module:function', got {k!r}: {v!r}")
    if not isinstance(c.families, tuple) or not all(
        isinstance(v, str) and v.count(":") == 1 for v in c.families
    ):
        raise ConfigError(
            f"`families` must be a list of 'module:OBJECT' (a MetricFamily), got {c.families!r}"
        )
    if c.mode == "passive":
        # passive mode captures the training batch's tokens: the probe-set options would do nothing
        defaults = {f.name: f.default for f in dataclasses.fields(c)}
        changed = [n for n in PROBE_SET_OPTIONS if getattr(c, n) != defaults[n]]
        if changed:
            names = ", ".join(f"`{n}`" for n in changed)
            raise ConfigError(
                f"{names} {'is' if len(changed) == 1 else 'are'} only used in mode 'probe': passive mode "
                "captures the training batch's tokens (every counted one, subsampled to `max_points`); "
                "remove it or set mode='probe'"
            )


def _require_str(name: str, value: Any) -> None:
    check_str(name, value, empty=True, error=ConfigError)


def _require_int(name: str, value: Any, low: int) -> None:
    check_int(name, value, low, error=ConfigError, plain=True)


def _require_number(name: str, value: Any, low: float) -> None:
    check_number(name, value, low, error=ConfigError, plain=True, expected=f"a number >= {low} (finite)")


def _check_trackers(value: Any) -> tuple[str, ...]:
    """``trackers`` as a tuple of known names (a list from YAML is fine)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(
            f"`trackers` must be None (follow the trainer's report_to), [] or a list of "
            f"{', '.join(map(repr, TRACKERS))}, got {value!r}"
        )
    for name in value:
        if name not in TRACKERS:
            close = difflib.get_close_matches(str(name), TRACKERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"`trackers` has unknown tracker {name!r}{hint}; allowed: {', '.join(map(repr, TRACKERS))}"
                + (" (TensorBoard is the `tensorboard` field)" if str(name).lower() == "tensorboard" else "")
            )
    return tuple(dict.fromkeys(value))


def _check_webhook_url(url: Any) -> None:
    """An http(s) URL with a host; the error message never shows its credentials or query."""
    if not isinstance(url, str):
        raise ConfigError(f"`webhook_url` must be an http(s):// URL (a str), got {type(url).__name__}")
    try:
        parts = urllib.parse.urlsplit(url.strip())
        host = parts.hostname
    except ValueError:
        raise ConfigError("`webhook_url` must be an http:// or https:// URL, got a malformed URL") from None
    if parts.scheme.lower() not in ("http", "https") or not host:
        shown = f"{parts.scheme}://{'***@' if '@' in parts.netloc else ''}{parts.netloc.rsplit('@', 1)[-1]}"
        shown += parts.path + ("?***" if parts.query else "")
        raise ConfigError(f"`webhook_url` must be an http:// or https:// URL with a host, got {shown!r}")
    if parts.path.endswith("/***"):
        raise ConfigError(
            "`webhook_url` is a redacted URL as run.json stores it (only its host is kept); "
            "give the real URL to send alerts"
        )


def _check_intervention_options(c: Any) -> None:
    """``intervention_options`` and its shorthand ``diversity``: each kind's options, checked by its class."""
    from topomon.interventions import INTERVENTIONS  # the registry, with the built-in kinds

    field = "intervention_options"
    opts = c.intervention_options
    if not isinstance(opts, Mapping) or not all(isinstance(v, Mapping) for v in opts.values()):
        raise ConfigError(
            f"`{field}` must map action kinds to mappings of their options, e.g. "
            f"{{'lora_decorrelation': {{'one_sided': 0.0}}}}, got {opts!r}"
        )
    unknown = sorted((k for k in opts if k not in INTERVENTIONS), key=repr)
    if unknown:
        raise ConfigError(
            f"`{field}` names unknown action kind(s) {unknown}; registered: {list(INTERVENTIONS)}"
        )
    for name, kind, given in [(f"{field}[{k!r}]", k, v) for k, v in opts.items()] + [
        ("diversity", "diversity", c.diversity)
    ]:
        try:
            INTERVENTIONS[kind].check_options(given)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"`{name}`: {e}") from None
    both = sorted(set(c.diversity) & set(opts.get("diversity", {})), key=repr)
    if both:
        raise ConfigError(
            f"`{field}['diversity']` and `diversity` both set {both}: give the diversity options in "
            "one of them"
        )
    acting = {a.get("kind") for a in c.actions}
    unused = sorted(k for k, v in opts.items() if v and k not in acting)
    if unused:
        warnings.warn(
            f"`{field}` sets options of {unused} but no action of that kind is configured: they are unused",
            UserWarning,
            stacklevel=5,
        )
