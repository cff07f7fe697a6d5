"""The technique contract and the registry.

A technique is one file: a :class:`Technique` subclass registered by name with :func:`register`. The
runner builds it from its parameters and then, in this order:

1. :meth:`Technique.check` ``(facts, spec)`` at plan time, before any weight loads: a reason it cannot
   apply (architecture, tokenizer, batch size, device), or None. A refusal is one line: exit 2 for
   ``workbench run``, a *skipped* row in a sweep, never retried by ``--resume``.
2. :meth:`Technique.prepare` ``(trial)`` once, untimed. The :class:`Trial` holds everything built
   for the run: the spec, the loaded target (and draft), the exact batches that will be timed, a
   calibration split disjoint from them (exit heads, step predictors, calibration), and the facts.
   No technique loads a workload again.
3. :meth:`Technique.run` ``(batch)`` once per timed call.
4. :meth:`Technique.report` ``(outcome)`` with the timed calls' internals and outputs: a typed
   :class:`TechniqueReport` (lossless, bytes used and read per token, quality as named
   :class:`Metric` objects with unit and direction, internals, the technique's meta-learner features
   and a one-line headline). The store writes its fields as columns; display, figures and the
   meta-learner read those fields and never branch on technique names.
5. :meth:`Technique.release`, even after a failure, so no shared model is left altered.

A technique that samples says so with :meth:`Technique.sampling` (read before ``prepare``): the
baseline then samples with the same settings and seeds (``Trial.sampling``), and the standard quality
comparison becomes a distributional one over many samples per input (:mod:`workbench.sampled_quality`)
instead of token identity.

Two class-level hooks serve the meta-learner without running anything: :meth:`Technique.features`
(the configuration's descriptors for a model) and :meth:`Technique.expert_rules` (rules of thumb,
the "expert" baseline a learner must beat).

Techniques outside this package register the same way: a module or ``.py`` file named in the
``WORKBENCH_TECHNIQUES`` environment variable (comma-separated), or an entry point in the
``workbench.techniques`` group, is imported with the registry, in every process (the CLI, sweep
workers, report kernels).

Example:
    >>> from workbench.techniques import get
    >>> get("baseline")().name
    'baseline'
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from workbench.errors import WorkbenchError
from workbench.measure import CallOutput

if TYPE_CHECKING:
    import pandas as pd

    from workbench.models.facts import ModelFacts
    from workbench.models.loading import LoadedModel
    from workbench.specs import RunSpec
    from workbench.workloads import Batch, Workload

PLUGINS_ENV = "WORKBENCH_TECHNIQUES"  # comma-separated modules or .py files holding more techniques
ENTRY_POINT_GROUP = "workbench.techniques"


class UnknownTechniqueError(WorkbenchError):
    """The technique name is not registered; the message lists the registered ones."""


class TechniqueParamError(WorkbenchError):
    """A technique parameter is unknown or has a bad value; the message names it and the fix."""


@dataclass(frozen=True)
class Param:
    """One technique parameter: its type, default and a one-line help on its trade-off."""

    type: type  # int, float, bool or str
    default: Any  # used when the spec does not set it
    help: str  # what it changes and what it costs
    choices: tuple[Any, ...] | None = None  # allowed values, when the set is closed
    minimum: float | None = None  # smallest allowed number, when bounded


# ----------------------------------------------------------------------------------------------------
# what goes in: facts at plan time, the trial at prepare time, the outcome at report time
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """What the files say about the target and the draft, and where the run goes (nothing loaded)."""

    model: ModelFacts  # the target
    draft: ModelFacts | None  # the draft model, when the spec names one
    device: str  # "cpu", "cuda", "cuda:1"
    calibration_items: int  # inputs available for the calibration split (disjoint from the timed ones)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "draft": None if self.draft is None else self.draft.to_dict(),
                "device": self.device, "calibration_items": self.calibration_items}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Facts:
        from workbench.models.facts import ModelFacts

        return cls(ModelFacts.from_dict(data["model"]),
                   None if data.get("draft") is None else ModelFacts.from_dict(data["draft"]),
                   data["device"], int(data.get("calibration_items") or 0))


@dataclass
class Trial:
    """Everything the runner built for one run, handed to :meth:`Technique.prepare`.

    ``batches`` are exactly the inputs that will be timed, in order; ``calibration`` is a split of the
    same workload that shares no input with them (empty when the workload has no items to spare).
    """

    spec: RunSpec  # what is being run
    facts: Facts  # what the model files say (the same object check() saw)
    model: LoadedModel  # the target, shared with the baseline: never modify it in place
    draft: LoadedModel | None  # the draft model, when the spec names one
    workload: Workload  # the timed inputs as items (modality, description)
    batches: list[Batch]  # the timed inputs, model-ready
    calibration: list[Batch] = field(default_factory=list)  # disjoint inputs for training or calibration
    sampling: dict[str, Any] | None = None  # the technique's sampling settings (Technique.sampling), which the
    # baseline then samples with too; None: greedy

    @property
    def texts(self) -> list[str]:
        """Every timed input's text (prompts, texts or "class k"), in order."""
        return [text for batch in self.batches for text in batch.texts]


@dataclass
class Outcome:
    """What the timed calls produced, handed to :meth:`Technique.report`."""

    per_call: list[dict[str, Any]]  # CallOutput.internals of every timed technique call (warm-up excluded)
    baseline_outputs: list[Any]  # per batch: the baseline's CallOutput.output in the first timed pass
    technique_outputs: list[Any]  # per batch: the technique's, same pass
    standard_quality: dict[str, Any]  # quality.compare(...) of the two: agreement, accuracy, PSNR


# ----------------------------------------------------------------------------------------------------
# what comes out: the typed report
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One named quality figure with its unit and direction.

    Example:
        >>> Metric("perplexity_change_percent", 0.4, "%", higher_is_better=False).text()
        'perplexity change +0.4 %'
    """

    name: str  # snake_case key, unit in the name where there is one: perplexity_change_percent
    value: float | None  # None when it could not be measured
    unit: str  # "%", "points", "nats", "dB", "SSIM", "steps", "" for plain ratios and counts
    higher_is_better: bool | None  # None: descriptive (neither direction is better)
    label: str = ""  # human-readable name; default: the name without its unit suffix
    headline: bool = True  # shown in the one-line quality text (False: tables and details only)

    def text(self) -> str:
        """'label value unit', signed for changes (see :func:`workbench.display.metric_text`)."""
        from workbench.display import metric_text

        return metric_text(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TechniqueReport:
    """What a technique says about its own timed calls; the store writes each field as a column."""

    lossless: bool  # outputs must equal the baseline's token for token (a mismatch fails the run)
    model_bytes: int | None = None  # bytes of the weights actually used (target + draft, quantized ...)
    bytes_read_per_token: float | None = None  # weight bytes read per generated token (roofline); None: model_bytes
    quality: list[Metric] = field(default_factory=list)  # the technique's own quality figures
    internals: dict[str, Any] = field(default_factory=dict)  # what it did (acceptance, exit layers, steps)
    features: dict[str, Any] = field(default_factory=dict)  # its meta-learner descriptors (see Technique.features)
    headline: str = ""  # one line: what it did, e.g. "acceptance 61%, theory predicts 1.88x"

    def to_dict(self) -> dict[str, Any]:
        return {"lossless": self.lossless, "model_bytes": self.model_bytes,
                "bytes_read_per_token": self.bytes_read_per_token,
                "quality": [m.to_dict() for m in self.quality], "internals": self.internals,
                "features": self.features, "headline": self.headline}


# ----------------------------------------------------------------------------------------------------
# the contract
# ----------------------------------------------------------------------------------------------------


class Technique(ABC):
    """The contract every technique follows.

    Subclasses set ``name``, ``applies_to`` (model kinds), ``params`` (name -> :class:`Param`),
    ``description`` and ``examples``, and implement :meth:`prepare`, :meth:`run` and :meth:`report`;
    :meth:`check` refuses what cannot apply, before any weight loads.
    """

    name: ClassVar[str]  # registry key, used on the command line and in the store
    applies_to: ClassVar[tuple[str, ...]]  # model kinds: causal_lm, classifier, diffusion
    params: ClassVar[dict[str, Param]] = {}  # accepted parameters
    takes_draft: ClassVar[bool] = False  # True when a draft model may be given with --draft
    description: ClassVar[str] = ""  # one line for `workbench techniques` and for reports' labels
    title: ClassVar[str] = ""  # the human name in reports and panels ("" -> the name with spaces)
    examples: ClassVar[tuple[dict[str, Any], ...]] = ()  # runnable settings on the zoo: model, workload,
    # draft, params; the contract test runs each one end to end, and docs show them

    def __init__(self, **params: Any) -> None:
        self.config = self.check_params(params)

    # -- naming ------------------------------------------------------------------------------
    @classmethod
    def display_name(cls, params: dict[str, Any], draft: str | None = None) -> str:
        """A configuration's name for people: the title, then its non-default settings in words.

        Techniques override it for their key settings (prompt lookup (6 tokens)); the default needs none.

        Example:
            >>> from workbench.techniques import get
            >>> get("early_exit").display_name({"threshold": 0.9})
            'early exit (threshold 0.9)'
        """
        parts = ([f"draft {draft}"] if draft else []) + cls.settings_words(params)
        title = cls.title or cls.name.replace("_", " ")
        return f"{title} ({', '.join(parts)})" if parts else title

    @classmethod
    def settings_words(cls, params: dict[str, Any]) -> list[str]:
        """The settings that differ from their defaults, in words: ``["threshold 0.9"]``."""
        return [f"{key.replace('_', ' ')} {_word(value)}" for key, value in sorted(params.items())
                if value is not None and (key not in cls.params or _word(value) != _word(cls.params[key].default))]

    # -- validation --------------------------------------------------------------------------
    @classmethod
    def check_params(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in and types checked; a bad name or value raises one clear line."""
        config = {key: p.default for key, p in cls.params.items()}
        for key, value in given.items():
            if key not in cls.params:
                near = difflib.get_close_matches(key, list(cls.params), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                valid = ", ".join(cls.params) or "none"
                raise TechniqueParamError(
                    f"technique {cls.name!r} has no parameter {key!r}{hint}: valid parameters are {valid}"
                )
            config[key] = _coerce(cls.name, key, value, cls.params[key])
        return config

    @property
    def lossless(self) -> bool:
        """True when outputs must equal the baseline's token for token (a mismatch fails the run)."""
        return False

    def sampling(self) -> dict[str, Any] | None:
        """The ``generate`` settings this technique samples with (``do_sample``, ``temperature``,
        ``top_k``, ``top_p``), or None when it decodes greedily (the default).

        When it samples, the runner makes the baseline sample with the same settings and seeds, and
        judges quality by distribution (:mod:`workbench.sampled_quality`), never by token identity.
        Called before :meth:`prepare`, so it depends on the parameters alone.

        Example:
            >>> from workbench.techniques import get
            >>> get("baseline")().sampling() is None
            True
        """
        return None

    def check(self, facts: Facts, spec: RunSpec) -> str | None:
        """Why the technique cannot run with these model facts and this spec, or None when it can.

        The default refuses other model kinds, and a draft model unless ``takes_draft``; techniques
        extend it with their own refusals.
        """
        reason = self.check_kind(facts)
        if reason is None and facts.draft is not None and not self.takes_draft:
            reason = f"technique {self.name!r} takes no draft model: drop --draft"
        return reason

    def check_kind(self, facts: Facts) -> str | None:
        """The model-kind check alone."""
        if facts.model.kind not in self.applies_to:
            return (f"technique {self.name!r} applies to {', '.join(self.applies_to)} models, "
                    f"not to a {facts.model.kind} model")
        return None

    # -- execution -----------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, trial: Trial) -> None:
        """Get ready to run (attach a draft, quantize a copy, train exit heads ...). Untimed."""

    @abstractmethod
    def run(self, batch: Batch) -> CallOutput:
        """Process one batch; this call is what the harness times."""

    @abstractmethod
    def report(self, outcome: Outcome) -> TechniqueReport:
        """The typed report of the timed calls (see :class:`TechniqueReport`)."""

    def release(self) -> None:
        """Undo anything done to shared models; called even after a failure."""

    # -- for the meta-learner, without running -------------------------------------------------
    @classmethod
    def features(cls, params: dict[str, Any], model: dict[str, Any], draft: dict[str, Any] | None) -> dict[str, Any]:
        """This configuration's descriptors for the meta-learner (see ``meta.features.FEATURES``, group
        "configuration" and "pair"): e.g. ``draft_tokens``, ``weight_bits``, ``draft_cost_ratio``.

        ``model`` and ``draft`` are model descriptors (parameters, layers, hidden_size ...); features a
        technique does not set are "not applicable" (NaN, or "none" for categories).
        """
        return {}

    @classmethod
    def expert_rules(cls) -> list[ExpertRule]:
        """Rules of thumb for this technique, the hand-written baseline a meta-learner must beat."""
        return []


@dataclass(frozen=True)
class ExpertRule:
    """One rule of thumb: among a context's candidate rows of this technique, pick those where
    ``applies(rows)`` holds; rules are tried in ``priority`` order (lowest first), first match wins."""

    priority: int  # order among every registered technique's rules
    text: str  # the rule in words, for the evaluation table's notes
    applies: Callable[[pd.DataFrame], Any]  # feature rows -> boolean mask (a pandas Series)


def _word(value: Any) -> str:
    """A setting's value as written in names: booleans as stored keys spell them (true, false)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _coerce(tech: str, key: str, value: Any, param: Param) -> Any:
    expected = param.type
    try:
        if value is None:
            out = None
        elif expected is bool:
            if not isinstance(value, bool):
                raise TypeError
            out = value
        elif expected is int:
            if isinstance(value, bool) or not float(value).is_integer():
                raise TypeError
            out = int(value)
        else:
            out = expected(value)
    except (TypeError, ValueError):
        raise TechniqueParamError(
            f"{tech} parameter {key}={value!r} is not a {expected.__name__}: {param.help}"
        ) from None
    if out is not None and param.choices is not None and out not in param.choices:
        raise TechniqueParamError(
            f"{tech} parameter {key}={value!r} is not one of {', '.join(map(str, param.choices))}"
        )
    if out is not None and param.minimum is not None and out < param.minimum:
        raise TechniqueParamError(f"{tech} parameter {key}={value!r} is below its minimum {param.minimum}")
    return out


_REGISTRY: dict[str, type[Technique]] = {}


def register(cls: type[Technique]) -> type[Technique]:
    """Class decorator: make a technique available by its ``name``."""
    old = _REGISTRY.get(cls.name)
    if old is not None and old is not cls and _source_file(old) != _source_file(cls):
        raise ValueError(f"technique name {cls.name!r} is registered twice ({_source_file(old)} and "
                         f"{_source_file(cls)}): give one of them another name")
    _REGISTRY[cls.name] = cls
    return cls


def _source_file(cls: type) -> str:
    """The file a class was defined in (one file imported under two module names is one technique)."""
    module = sys.modules.get(cls.__module__)
    return str(Path(getattr(module, "__file__", "") or cls.__module__).resolve())


def get(name: str) -> type[Technique]:
    """The technique class registered under ``name``; the error lists the valid names."""
    load_plugins()
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise UnknownTechniqueError(
            f"unknown technique {name!r}{hint}: valid names are {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def names() -> list[str]:
    """Registered technique names, sorted."""
    load_plugins()
    return sorted(_REGISTRY)


def registered() -> list[type[Technique]]:
    """Every registered technique class, by name."""
    return [_REGISTRY[name] for name in names()]


_LOADED_PLUGINS: set[str] = set()


def load_plugins() -> None:
    """Import the techniques named by ``WORKBENCH_TECHNIQUES`` and the ``workbench.techniques`` entry
    points (once each); a name that cannot be imported is one clear line."""
    wanted = [part.strip() for part in os.environ.get(PLUGINS_ENV, "").split(",") if part.strip()]
    for target in wanted:
        if target in _LOADED_PLUGINS:
            continue
        _LOADED_PLUGINS.add(target)
        try:
            if target.endswith(".py"):
                path = Path(target).expanduser().resolve()
                if not path.is_file():
                    raise FileNotFoundError(str(path))
                module_name = f"workbench_plugin_{path.stem}"
                spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
                sys.modules[module_name] = module
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            else:
                importlib.import_module(target)
        except Exception as exc:
            _LOADED_PLUGINS.discard(target)
            raise WorkbenchError(f"{PLUGINS_ENV} names {target!r}, which cannot be imported "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
                                 "give a module name or an existing .py file") from None
    if "entry_points" not in _LOADED_PLUGINS:
        _LOADED_PLUGINS.add("entry_points")
        from importlib.metadata import entry_points

        for point in entry_points(group=ENTRY_POINT_GROUP):
            point.load()
