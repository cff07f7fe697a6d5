"""The technique contract and the registry.

A technique is one file: a :class:`Technique` subclass registered by name with :func:`register`. The
runner builds it from its parameters, asks :meth:`Technique.why_not` before loading anything it can,
calls :meth:`prepare` once, :meth:`run` once per batch (timed), :meth:`internals` with the timed
calls' internals, and :meth:`release` at the end, even after a failure, so the model is never left altered.

Example:
    >>> from workbench.techniques import get
    >>> get("baseline")().name
    'baseline'
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from workbench.errors import WorkbenchError
from workbench.measure import CallOutput

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel
    from workbench.specs import RunSpec
    from workbench.workloads import Batch


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


class Technique(ABC):
    """The contract every technique follows.

    Subclasses set ``name``, ``applies_to`` (model kinds) and ``params`` (name -> :class:`Param`),
    and implement :meth:`prepare` and :meth:`run`.
    """

    name: ClassVar[str]  # registry key, used on the command line and in the store
    applies_to: ClassVar[tuple[str, ...]]  # model kinds: causal_lm, classifier, diffusion
    params: ClassVar[dict[str, Param]] = {}  # accepted parameters
    needs_draft: ClassVar[bool] = False  # True when a draft model may be given with --draft
    description: ClassVar[str] = ""  # one line for `workbench techniques`
    examples: ClassVar[tuple[dict[str, Any], ...]] = ()  # runnable settings on the zoo: model, workload,
    # draft, params; the contract test runs each one end to end, and docs show them

    def __init__(self, **params: Any) -> None:
        self.config = self.check_params(params)

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

    def why_not(self, kind: str, spec: RunSpec) -> str | None:
        """Why the technique cannot run on this model kind and spec, or None when it can."""
        if kind not in self.applies_to:
            return (f"technique {self.name!r} applies to {', '.join(self.applies_to)} models, "
                    f"not to a {kind} model")
        return None

    def why_not_located(self, model_path: Path, draft_path: Path | None) -> str | None:
        """Checks that need the model's files but not its weights (configs, tokenizers); None when fine."""
        return None

    def why_not_loaded(self, model: LoadedModel, draft: LoadedModel | None) -> str | None:
        """Checks that need the loaded models (tokenizer match, relative size); None when fine."""
        return None

    # -- execution -----------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, model: LoadedModel, spec: RunSpec, draft: LoadedModel | None = None) -> None:
        """Get ready to run (attach a draft, quantize a copy, train exit heads ...). Untimed."""

    @abstractmethod
    def run(self, batch: Batch) -> CallOutput:
        """Process one batch; this call is what the harness times."""

    def internals(self, per_call: list[dict[str, Any]]) -> dict[str, Any]:
        """Technique internals aggregated over the timed calls (acceptance, exit layers, steps).

        ``per_call`` holds the ``CallOutput.internals`` of each timed call (warm-up calls excluded).
        """
        return {}

    def extra_quality(self, baseline: list[Any], technique: list[Any]) -> dict[str, Any]:
        """Quality figures only this technique can compute (e.g. SSIM against a 100-step reference,
        perplexity change); merged into the run's quality beside the standard comparison.

        ``baseline`` and ``technique`` hold each batch's ``CallOutput.output`` from the first timed pass.
        """
        return {}

    def release(self) -> None:
        """Undo anything done to shared models; called even after a failure."""


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
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"technique name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[Technique]:
    """The technique class registered under ``name``; the error lists the valid names."""
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise UnknownTechniqueError(
            f"unknown technique {name!r}{hint}: valid names are {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def names() -> list[str]:
    """Registered technique names, sorted."""
    return sorted(_REGISTRY)
