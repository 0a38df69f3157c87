"""The monitor's configuration: one frozen dataclass, validated at construction.

Every wrong value raises a ``ValueError`` (or ``TypeError``) naming the field, the value and what
is allowed, before training starts (the checks are in :mod:`topomon.config_checks`).
``MonitorConfig.from_yaml`` reads YAML with ``safe_load`` and rejects unknown keys.

Presets: a ``preset`` key next to the fields (``MonitorConfig.from_dict`` / ``from_yaml``,
``TopoMonitor(preset=...)``, ``topomon.watch(..., preset=...)``, a recipe's ``topomon:`` section,
``topomon sft --topomon NAME``) names a starting set of fields: a preset shipped with the package
(``topomon/presets/<name>.yaml``: ``light``, ``standard``, ``full``; :func:`preset_names`) or the path
of a MonitorConfig YAML file. The preset's fields come first, the fields given next to it override
them. ``preset`` is not a field: the built config holds the resolved fields. :func:`load_preset` is
the one reader of presets (the command lines and the framework plugins use it too).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from topomon import schedules
from topomon.config_checks import TRACKERS as TRACKERS
from topomon.config_checks import ConfigError, check_fields

__all__ = ["MonitorConfig", "ConfigError", "as_config", "PRESET_KEY", "preset_names", "load_preset"]


AUTO_BUDGET = 0.01
"""``overhead_budget="auto"`` with the default "log" schedule: 1% of the training's wall time."""


@dataclass(frozen=True)
class MonitorConfig:
    """What the monitor captures, when, and what it computes.

    Built from keyword arguments, a mapping (:meth:`from_dict`) or YAML (:meth:`from_yaml`); the mapping,
    the file and the adapters also take ``preset`` (a packaged preset name or a YAML path, see
    :func:`load_preset`): its fields first, the given fields over them.

    Attributes:
        stage: name of this post-training stage ("sft", "dpo", ...), stored with every record.
        run_dir: the run directory shared by the stages of one model's post-training
            (``docs/RUN_DIR.md``); default ``<TrainingArguments.output_dir>/topomon``.
        step_offset: global step of this stage's step 0; None continues after the run's last step.
        logging_dir: TensorBoard folder; default ``$TENSORBOARD_LOGGING_DIR/topomon_<stage>`` when
            that is set, else ``<run_dir>/tensorboard/<stage>``.
        tensorboard: write TensorBoard event files.
        mode: "probe" (a fixed probe set, separate no-grad forward) or "passive" (hooks on the
            training forward at capture steps, no extra forward).
        probes: probe texts: None (the packaged default set), a list of strings, a path to a
            ``.txt`` (one text per line) or ``.jsonl`` file, or a ``datasets.Dataset``.
        probe_field: the text field of JSONL records / dataset rows.
        max_probes: at most this many probe texts are used (the first ones).
        max_length: probe texts are truncated to this many tokens.
        probe_batch_size: probe forward batch size.
        layers: "auto" (4 decoder blocks spread over depth, the last included) or block indices.
        final_norm: also capture the final norm output (the input of the LM head).
        pooling: "all" (every counted token, subsampled), "last" (last non-pad token), "mean".
        max_points: points per layer after subsampling (fixed indices for the whole run).
        exclude_first: drop the first non-pad position of each text (BOS / massive activations).
        outlier_factor: drop tokens whose norm exceeds this multiple of the median (None: keep all).
        normalize: L2-normalise each token before the metrics.
        massive_treatment: what is removed before every metric (spectral, topology): "robust"
            (default: the massive tokens, by a robust rule on log norms, median + 5 MADs and at
            least 3x the median norm, and any token above ``outlier_factor`` x the median norm),
            "cut" (only tokens above ``outlier_factor`` x the median norm: the earlier
            default), "robust_dims" / "dims" (as "robust" / "cut", and the massive feature
            dimensions, peak magnitude > 100x the median magnitude). Chosen by measurement in
            docs/METRICS.md; the counts and the variance share of the massive part are logged
            whatever the choice (``massive_tokens``, ``massive_dims``, ``massive_share``).
            ``outlier_factor=None`` keeps every finite token whatever the treatment.
        schedule: "log" (1, 2, 4, ... then every ``every_n_steps``), "every", or "steps".
        every_n_steps: the interval of "every", and the largest gap of "log".
        steps: the steps of "steps".
        spectral: compute the spectral metrics.
        topology: compute persistent homology metrics (on ``topology_layers`` only).
        logits: next-token statistics from the same forward, entropy, top-1 probability, accuracy,
            ECE, NLL (layer ``"model"``): of the probe set (probe mode), or of the training
            forward's captured tokens against its labels (passive mode).
        trajectory: token trajectories through the captured layers: consecutive-layer cosine,
            straightness, path length, adjacent-layer CKA (layer ``"model"``).
        lora_metrics: the geometry of the LoRA update of a PEFT model (effective and stable rank,
            norms, overlap with earlier stages' update subspaces), layer ``"model"``.
        topology_layers: block indices (or "final_norm" via ``None`` = last captured layer only).
        topology_points: points used for persistent homology (a fixed subsample of the layer's).
        pca_dim: project onto this many principal components before persistent homology (None: no).
        n_landmarks: greedy landmarks for ripser (None: all points).
        topology_engine: "auto", "ripser" or "giotto".
        alpha_window: rank window of the alpha-ReQ fit (1-based, inclusive).
        figures_every: draw figures (diagram, eigenspectrum) every this many captures (0: never).
        worker: "process" (default), "thread" or "sync" (debugging).
        queue_size: snapshots waiting for the worker at most; more are dropped and counted.
        max_snapshot_mb: the most one capture may ship to the worker, in MiB. A capture above it (a
            huge hidden size, many layers, a large ``max_points``) is cut to the same fixed subset of
            points per layer at every capture, with a warning once; with ``queue_size`` it bounds the
            memory held by pending captures (about ``queue_size x max_snapshot_mb``). The LoRA family's
            payload comes on top: Gram matrices (``2 r^2`` numbers per adapted module), and the
            factors projected on each earlier stage's LoRA subspace (``2 r k`` each).
        worker_threads: threads of the worker: BLAS/OpenMP, and giotto-ph's persistent homology.
        worker_priority: CPU priority of the worker process: "low" (default, nice 10: training
            keeps the cores, metrics arrive within seconds to a minute on a machine whose cores
            training saturates), "idle" (Linux ``SCHED_IDLE``: only CPU time training leaves unused;
            right for GPU training, where the CPU is mostly free, but on a CPU-saturated machine
            results and alerts arrive only at train end, bench/RESULTS.md) or "normal".
        task_timeout: seconds a single snapshot may take in the worker before it is restarted.
        flush_timeout: seconds to wait for pending results at train end and at each checkpoint save
            (so that the checkpoint's monitor state covers every capture up to its step).
        overhead_budget: the largest fraction of the training's wall time the monitor may cost it,
            counted from train begin: the time it blocks training (probe forwards and hand-over to
            the worker, the step-0 baseline included) and, for a model trained on the CPU, the
            worker's CPU time (it takes the cores training uses). A scheduled capture that would
            exceed it is deferred to the first step end where it fits (one capture waits at most;
            every scheduled step not captured on time is counted in ``captures_deferred``; on the
            CPU, no capture while the worker still computes the last one, whose CPU time is not
            known yet). "auto" (default): 0.01 with the default "log"
            schedule, so the default costs about 1% of the training time whatever the model, batch
            or machine, and none with an explicit "every"/"steps" schedule (captured exactly as
            asked). A number in (0, 1]: that budget with any schedule. None: exactly on schedule.
            Applies to probe mode on one process; under several processes every rank must make the
            same decision, so the schedule is kept.
        seed: seed of the probe subsample (fixed for the run).
        custom_metrics: your own per-layer metrics: name -> ``"module:function"``; the function
            takes the ``(n, d)`` points and returns a float or a dict of floats. It runs in the worker.
        families: your own metric families (``topomon.metrics.families.MetricFamily``), each named
            ``"module:OBJECT"`` in a module the worker process can import (not the training script):
            topomon imports and registers them in the training process and in the worker
            (docs/ARCHITECTURE.md, "Extending it").
        family_options: the options of your own metric families, ``{family name: {option: value}}``
            (the options the family declares; those not given take its defaults). topomon's own
            families take theirs from the fields above (``topology``, ``topology_points``,
            ``lora_metrics`` ...): each is the family option of the same name
            (``topomon.metrics.families.options_from_config``).
        alerts: "default" (final-norm RankMe -15% / effective rank -25% from the stage start, and
            non-finite activations), a detector of ``topomon.alerts.DETECTORS`` by name (``"v2"``,
            ``"nll+loss"``, ``"training-loss drop"`` ...: docs/EARLY_WARNING.md part 3;
            like the default, its parts on ``final_norm`` watch the deepest captured layer when
            ``final_norm`` is not captured, and an any-of part whose family is off is left out with a
            warning), a list of rule mappings (``topomon.alerts.rules_from_config``:
            ``drop`` / ``spike`` / ``mean_spike`` / ``trend`` / ``threshold`` / ``nonfinite`` /
            ``composite``; a ``layer`` of the captured ones, ``"model"`` for model-level metrics such
            as ``logit_nll``, or ``"trainer"`` for what the trainer logs, such as ``loss``) whose items
            may also be those names (``["default", {...}]``: the default rules and one more), or None
            for no alerts.
        webhook_url: POST every alert as JSON to this http(s) URL (never blocks training).
        trackers: the experiment trackers that also get every curve, figure and alert, into the run
            the trainer (or you) started: None follows the trainer's ``report_to``, ``[]`` is none,
            or a list of ``"wandb"``, ``"mlflow"``, ``"trackio"`` (a named tracker that is not
            installed or has no active run is an error before step 1; ``pip install 'topomon[trackers]'``).
        actions: what alerts trigger: mappings of ``topomon.interventions.ActionSpec`` fields, e.g.
            ``{"kind": "replay", "value": 0.5}``, ``{"kind": "diversity", "value": 0.05}``,
            ``{"kind": "lora_decorrelation", "value": 1.0}``, ``{"kind": "entropy_bonus", "value":
            0.01}`` (TRL GRPOTrainer, with ``.attach(trainer)``), ``{"kind": "checkpoint"}``,
            ``{"kind": "stop"}``. Settable kinds revert when the alert recovers. ``rules`` names the
            alert rules that trigger one (none: any); a name no rule has is an error before step 1.
        diversity: options of the diversity regulariser: ``layers`` (default ``[-1]``), ``kind``
            ("logdet", "entropy", "uniformity"), ``max_tokens`` (shorthand for
            ``intervention_options: {diversity: {...}}``).
        intervention_options: per action kind, the options of its intervention (checked against the
            kind's ``OPTIONS`` before step 1; unknown kinds and options are an error), e.g.
            ``{"lora_decorrelation": {"one_sided": 0.0}}`` (the weight of the one-sided terms: 0
            penalises only the update inside both old subspaces), ``{"diversity": {"layers": [0, -1],
            "kind": "entropy"}}``. A kind's options act
            when an action of that kind is configured (a warning says when none is).
    """

    stage: str = "train"
    run_dir: str | None = None
    step_offset: int | None = None
    logging_dir: str | None = None
    tensorboard: bool = True
    mode: str = "probe"
    probes: Any = None
    probe_field: str = "text"
    max_probes: int = 64
    max_length: int = 64
    probe_batch_size: int = 16
    layers: Any = "auto"
    final_norm: bool = True
    pooling: str = "all"
    max_points: int = 512
    exclude_first: bool = True
    outlier_factor: float | None = 10.0
    normalize: bool = False
    massive_treatment: str = "robust"
    schedule: str = "log"
    every_n_steps: int = 50
    steps: tuple[int, ...] = ()
    spectral: bool = True
    topology: bool = True
    logits: bool = True
    trajectory: bool = True
    lora_metrics: bool = True
    topology_layers: Any = None
    topology_points: int = 256
    pca_dim: int | None = 32
    n_landmarks: int | None = None
    topology_engine: str = "auto"
    alpha_window: tuple[int, int] = (6, 100)
    figures_every: int = 5
    worker: str = "process"
    queue_size: int = 4
    max_snapshot_mb: float = 64.0
    worker_threads: int = 1
    worker_priority: str = "low"
    task_timeout: float = 300.0
    flush_timeout: float = 120.0
    overhead_budget: float | str | None = "auto"
    seed: int = 0
    custom_metrics: Mapping[str, str] = dataclasses.field(default_factory=dict)
    families: tuple[str, ...] = ()
    family_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    alerts: Any = "default"
    webhook_url: str | None = dataclasses.field(default=None, repr=False)  # may hold a token
    trackers: tuple[str, ...] | None = None
    actions: tuple[Any, ...] = ()
    diversity: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    intervention_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # Normalise sequences given as lists (YAML) to tuples, so the frozen config stays hashable-ish.
        if isinstance(self.steps, list):
            object.__setattr__(self, "steps", tuple(self.steps))
        if isinstance(self.actions, list):
            object.__setattr__(self, "actions", tuple(self.actions))
        if isinstance(self.families, list):
            object.__setattr__(self, "families", tuple(self.families))
        if isinstance(self.alpha_window, list):
            object.__setattr__(self, "alpha_window", tuple(self.alpha_window))
        check_fields(self)  # every field, each error naming it (topomon.config_checks)

    # ---------------------------------------------------------------- helpers
    def make_schedule(self) -> schedules.Schedule:
        """The capture schedule this config describes (step 0, the baseline, is always captured)."""
        if self.schedule == "every":
            return schedules.every_n(self.every_n_steps)
        if self.schedule == "steps":
            return schedules.at_steps(self.steps)
        return schedules.log_spaced(self.every_n_steps)

    def budget(self) -> float | None:
        """The overhead budget in force: ``overhead_budget`` with "auto" resolved (see the field)."""
        if self.overhead_budget == "auto":
            return AUTO_BUDGET if self.schedule == "log" else None
        return None if self.overhead_budget is None else float(self.overhead_budget)

    def replace(self, **changes: Any) -> MonitorConfig:
        """A copy with some fields changed (validated again; unknown names, ``preset`` too, are an error)."""
        _check_keys(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (a probe ``Dataset`` is shown by its type name)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = dict(v)
            elif f.name == "probes" and v is not None and not isinstance(v, (str, list)):
                v = f"<{type(v).__name__}>"
            elif isinstance(v, os.PathLike):
                v = os.fspath(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MonitorConfig:
        """Build from a mapping; unknown keys are an error that suggests the closest field.

        Args:
            data: MonitorConfig fields, and optionally ``preset``: a packaged preset name
                (:func:`preset_names`) or the path of a MonitorConfig YAML file whose fields come first;
                the other keys of ``data`` override them.

        Returns:
            The validated config.

        Raises:
            ConfigError: an unknown key, a bad value, or an unknown preset (the message lists them).

        Example:
            >>> MonitorConfig.from_dict({"preset": "light", "every_n_steps": 20}).every_n_steps
            20
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a monitor config must be a mapping, got {type(data).__name__}")
        data = _apply_preset(data)
        _check_keys(data)
        try:
            return cls(**dict(data))
        except TypeError as e:  # pragma: no cover - guarded by the key check above
            raise ConfigError(str(e)) from e

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> MonitorConfig:
        """Read a YAML file (``yaml.safe_load``); a top-level ``topomon:`` section is accepted.

        The file may name a ``preset`` (as :meth:`from_dict`); a relative preset path is taken from the
        file's folder.

        Raises:
            ConfigError: the file cannot be read or is not YAML, or as :meth:`from_dict`.
        """
        data = _read_yaml_config(path)
        return cls.from_dict(_apply_preset(data, base_dir=os.path.dirname(os.path.abspath(path))))


def _read_yaml_config(path: str | os.PathLike[str]) -> Any:
    """The YAML document of a monitor config file (``topomon:`` section unwrapped; empty -> {})."""
    import yaml

    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"a monitor config path must be a str or os.PathLike, got {type(path).__name__}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"monitor config file not found: {os.fspath(path)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{os.fspath(path)} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{os.fspath(path)} is not UTF-8 text: {e}") from None
    except RecursionError:
        raise ConfigError(f"{os.fspath(path)} is nested too deeply to be a monitor config") from None
    except (OSError, ValueError) as e:  # a folder, no permission, a NUL byte or too long a name
        raise ConfigError(f"cannot read the monitor config file {os.fspath(path)!r}: {e}") from None
    if data is None:
        data = {}
    if isinstance(data, Mapping) and set(data) == {"topomon"}:
        data = data["topomon"] or {}
    return data


def _check_keys(data: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(MonitorConfig)}
    for key in data:
        if key == PRESET_KEY:
            raise ConfigError(
                "`preset` is not a field: it is read when a config is built (MonitorConfig.from_dict / "
                "from_yaml, TopoMonitor(preset=...), topomon.watch(..., preset=...)); a built "
                "MonitorConfig has all its fields already: build it with the preset, or set the fields"
            )
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown monitor config key {key!r}{hint}; known keys: {', '.join(sorted(known))}"
            )


# ------------------------------------------------------------------------------------------ presets
PRESET_KEY = "preset"
"""The key that names a preset next to MonitorConfig fields (in a mapping, a YAML file, a keyword)."""

_PRESET_FOLDER = "presets"  # topomon/presets/<name>.yaml, package data


def preset_names() -> tuple[str, ...]:
    """The names of the presets shipped with the package (``topomon/presets/<name>.yaml``), sorted.

    Returns:
        E.g. ``("full", "light", "standard")``.
    """
    from importlib import resources

    folder = resources.files("topomon").joinpath(_PRESET_FOLDER)
    return tuple(sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml")))


def load_preset(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The MonitorConfig fields of a preset: a packaged name or the path of a MonitorConfig YAML file.

    The one reader of presets: ``preset:`` in :meth:`MonitorConfig.from_dict` / ``from_yaml``, the
    adapters' ``preset=`` and the command lines' ``--topomon NAME|FILE`` all come here. A file may
    hold a top-level ``topomon:`` section, and may itself name a ``preset`` (its own fields override
    that one's; a relative path is taken from the file's folder).

    Args:
        name_or_path: a name of :func:`preset_names` (``"light"``, ``"standard"``, ``"full"``), or a
            path to a YAML file. A packaged name wins over a file of the same name in the working
            folder; give ``./light`` for the file.

    Returns:
        A new dict of MonitorConfig fields (validated: ``MonitorConfig.from_dict`` accepts it).

    Raises:
        ConfigError: an unknown name (the message lists the packaged names), a missing or unreadable
            file, a preset chain that loops, or an invalid field.

    Example:
        >>> load_preset("light")["every_n_steps"]
        200
    """
    return _load_preset(name_or_path, base_dir=None, chain=())


def _load_preset(value: Any, *, base_dir: str | None, chain: tuple[str, ...]) -> dict[str, Any]:
    names = preset_names()
    if isinstance(value, str) and value in names:
        from importlib import resources

        import yaml

        where = f"the packaged preset {value!r}"
        text = resources.files("topomon").joinpath(f"{_PRESET_FOLDER}/{value}.yaml").read_text("utf-8")
        data: Any = yaml.safe_load(text) or {}
        key = f"<package>/{value}"
        folder = None
    elif isinstance(value, os.PathLike) or (isinstance(value, str) and _looks_like_path(value, base_dir)):
        path = os.fspath(value)
        if base_dir is not None and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        where = f"the preset file {path}"
        if not os.path.exists(path):
            raise ConfigError(
                f"monitor preset file not found: {path} (the packaged presets: {', '.join(names)})"
            )
        data = _read_yaml_config(path)
        key = os.path.realpath(path)
        folder = os.path.dirname(os.path.abspath(path))
    else:
        raise ConfigError(
            f"unknown monitor preset {value!r}: give one of {', '.join(map(repr, names))} "
            "(shipped in topomon/presets/) or the path of a MonitorConfig YAML file"
        )
    if key in chain:
        raise ConfigError(f"monitor presets name each other in a loop: {' -> '.join((*chain, key))}")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where} must be a YAML mapping of MonitorConfig fields, got {type(data).__name__}"
        )
    try:
        fields = _apply_preset(data, base_dir=folder, chain=(*chain, key))
        MonitorConfig.from_dict(fields)  # validates; the fields go on as a plain dict
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return fields


def _looks_like_path(value: str, base_dir: str | None) -> bool:
    """A preset value that is meant as a file (an existing file, a separator, a .yaml/.yml suffix)."""
    if not value:
        return False
    if value.endswith((".yaml", ".yml")) or "/" in value or os.sep in value:
        return True
    return os.path.isfile(value if base_dir is None else os.path.join(base_dir, value))


def _apply_preset(data: Any, *, base_dir: str | None = None, chain: tuple[str, ...] = ()) -> Any:
    """``data`` with its ``preset`` key replaced by that preset's fields (``data``'s own fields win).

    Anything that is not a mapping, or a mapping without ``preset``, comes back unchanged; a
    ``preset`` of None means none.
    """
    if not isinstance(data, Mapping) or PRESET_KEY not in data:
        return data
    own = {k: v for k, v in data.items() if k != PRESET_KEY}
    if data[PRESET_KEY] is None:
        return own
    return {**_load_preset(data[PRESET_KEY], base_dir=base_dir, chain=chain), **own}


def as_config(
    config: MonitorConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any]
) -> MonitorConfig:
    """A config from a :class:`MonitorConfig`, a mapping of its fields or None, with field overrides.

    ``overrides`` (and a mapping ``config``) may hold ``preset``: its fields first, every field given
    in ``config`` or ``overrides`` over them (an override's ``preset`` replaces the mapping's).

    Raises:
        ConfigError: a wrong value, an unknown key or preset, ``preset`` over a built
            :class:`MonitorConfig`, or ``config`` of another type.
    """
    if config is None:
        return MonitorConfig.from_dict(overrides)
    if isinstance(config, Mapping):
        return MonitorConfig.from_dict({**config, **overrides})
    if isinstance(config, MonitorConfig):
        if PRESET_KEY in overrides:
            raise ConfigError(
                f"preset={overrides[PRESET_KEY]!r} cannot apply over a built MonitorConfig (it has every "
                "field already): pass the preset with the fields as keywords, e.g. "
                "TopoMonitor(preset='light', every_n_steps=20), or MonitorConfig.from_dict({'preset': ...})"
            )
        return config.replace(**overrides) if overrides else config
    raise ConfigError(f"config must be a MonitorConfig or a mapping, got {type(config).__name__}")
