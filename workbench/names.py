"""Names and numbers for people: what reports, panels and the CLI show instead of stored keys.

Stored keys stay exact (``speculative[prompt_lookup_num_tokens=6]``, a 16-character machine hash, a float
with eight digits); these functions turn them into what a reader can scan: ``prompt lookup (6 tokens)``,
``2-core AMD EPYC (cpu)``, ``1.04x``. Each technique names its own configurations
(:meth:`workbench.techniques.base.Technique.display_name`), so no name here branches on a technique.

Example:
    >>> configuration_name("speculative[prompt_lookup_num_tokens=6]")
    'prompt lookup (6 tokens)'
    >>> machine_name({"cpu_model": "AMD EPYC", "cpu_cores_physical": 2}, "805462a31110a7ed", "cpu")
    '2-core AMD EPYC (cpu)'
    >>> sig(0.0123456), sig(1234.5), sig(1.0423)
    ('0.0123', '1.23e+03', '1.04')
"""

from __future__ import annotations

import math
from typing import Any, Mapping


def parse_configuration(text: str) -> tuple[str, dict[str, str], str | None]:
    """``technique[draft=D,key=value,...]`` -> (technique, params as text, draft); the inverse of
    :func:`workbench.meta.features.configuration_id` (a value holding commas is kept whole).

    Example:
        >>> parse_configuration("early_exit[thresholds=0.5,0.9,train_steps=50]")
        ('early_exit', {'thresholds': '0.5,0.9', 'train_steps': '50'}, None)
    """
    text = str(text)
    technique, bracket, rest = text.partition("[")
    params: dict[str, str] = {}
    draft = None
    if bracket and rest.endswith("]"):
        key = None
        for piece in rest[:-1].split(","):
            name, sep, value = piece.partition("=")
            if sep and name.strip().isidentifier():
                key = name.strip()
                params[key] = value
            elif key is not None:  # a comma inside the previous value
                params[key] += "," + piece
        draft = params.pop("draft", None)
    return technique, params, draft


def configuration_name(text: str) -> str:
    """The human name of a stored configuration (an unknown technique keeps a readable form of its key)."""
    from workbench import techniques

    technique, params, draft = parse_configuration(text)
    try:
        cls = techniques.get(technique)
    except Exception:  # a technique not installed here: its key in words
        parts = ([f"draft {draft}"] if draft else []) + [f"{k.replace('_', ' ')} {v}" for k, v in sorted(params.items())]
        return technique.replace("_", " ") + (f" ({', '.join(parts)})" if parts else "")
    return cls.display_name(params, draft)


def configuration_parts(text: str) -> tuple[str, str]:
    """A configuration's name and its settings in words, for a table's two columns: the human name
    (:func:`configuration_name`) split before its parenthesis.

    Example:
        >>> configuration_parts("speculative[prompt_lookup_num_tokens=6]"), configuration_parts("early_exit")
        (('prompt lookup', '6 tokens'), ('early exit', ''))
    """
    name = configuration_name(text)
    head, bracket, settings = name.partition(" (")
    return (head, settings[:-1]) if bracket and settings.endswith(")") else (name, "")


def machine_name(environment: Mapping[str, Any] | None, machine_id: Any = None, device: Any = None) -> str:
    """``2-core AMD EPYC (cpu)`` or ``NVIDIA H200 (cuda)``; without a fingerprint the id's first 8 characters."""
    env = environment if isinstance(environment, Mapping) else {}
    device = str(device or "cpu")
    if device.startswith("cuda") and env.get("gpu_name"):
        return f"{env['gpu_name']} ({device})"
    cpu, cores = env.get("cpu_model"), env.get("cpu_cores_physical") or env.get("cpu_cores_logical")
    if cpu:
        return f"{cores}-core {cpu} ({device})" if cores else f"{cpu} ({device})"
    return f"{str(machine_id or 'unknown')[:8]} ({device})"


def sig(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant figures; '-' for a missing one."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "-" if value is None else str(value)
    if not math.isfinite(number):
        return "-"
    return f"{number:.{digits}g}"


def speedup_text(speedup: Any, low: Any = None, high: Any = None) -> str:
    """``1.04x (0.98-1.10)``: a speedup with its interval, 3 significant figures."""
    text = f"{sig(speedup)}x"
    if low is not None and high is not None and sig(low) != "-" and sig(high) != "-":
        text += f" ({sig(low)}-{sig(high)})"
    return text
