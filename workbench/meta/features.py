"""Stored runs -> one feature table for the meta-learner: what was run where, and what it bought.

Every successful run becomes one row keyed by its *context* (model, workload, machine, device, dtype
and workload settings: the situation a user asks about) and its *configuration* (technique, draft and
parameters: the candidate answer, e.g. ``name[draft=zoo:code-draft,num_assistant_tokens=4]``).
Runs repeated in one context with one configuration are pooled by :func:`training_table`. A model is
one identity however it was typed: runs whose model files share a content digest share one name.

The configuration features come from each technique's own ``Technique.features`` (this module knows
no technique by name); a feature a technique does not set is "not applicable" (NaN, or "none").

``FEATURES`` is the one documented schema: each feature's name, kind (numeric or categorical), unit,
where it comes from and whether a user can act on it (counterfactuals only vary actionable ones).
Targets are ``log_speedup`` (natural log of baseline time / technique time) and
``quality_loss`` in the modality's own unit (perplexity increase %, accuracy drop in points, 1 - SSIM;
see :data:`workbench.quality.LOSS_SCALES`; NaN when the run has no figure in that unit). Runs measured
on a noisy machine (``noisy``) count with a tripled standard error and a fifth of the weight.

Example:
    >>> from workbench.store import Store
    >>> runs = Store("sqlite:///:memory:").runs()
    >>> run_features(runs).empty
    True
    >>> configuration_id("draft-then-verify", {"num_assistant_tokens": 4}, "zoo:code-draft")
    'draft-then-verify[draft=zoo:code-draft,num_assistant_tokens=4]'
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError

BASELINE_CONFIGURATION = "baseline"  # the explicit fallback: the model as it is, speedup 1.0, no loss


@dataclass(frozen=True)
class Feature:
    """One column of the feature table."""

    name: str  # column name, unit in the name where there is one
    kind: str  # "numeric" or "categorical"
    group: str  # model | workload | hardware | configuration | pair
    source: str  # where the value comes from in a stored run
    actionable: bool = False  # a user can change it (threads, draft, batch size, output length)

    def __post_init__(self) -> None:
        if self.kind not in ("numeric", "categorical"):
            raise WorkbenchError(f"feature {self.name!r} has kind {self.kind!r}: use numeric or categorical")


#: The feature schema (order is the column order of the feature table).
FEATURES: tuple[Feature, ...] = (
    # model descriptors
    Feature("model_parameters_log10", "numeric", "model", "internals.model_info.parameters (log10)"),
    Feature("model_layers", "numeric", "model", "internals.model_info.layers"),
    Feature("model_hidden_size", "numeric", "model", "internals.model_info.hidden_size"),
    Feature("model_vocab_size", "numeric", "model", "internals.model_info.vocab_size"),
    Feature("model_bytes_log10", "numeric", "model", "internals.model_info.model_bytes (log10)"),
    Feature("model_family", "categorical", "model", "internals.model_info.family (gpt2, llama, DigitsPipeline...)"),
    Feature("dtype", "categorical", "model", "run dtype"),
    # workload descriptors
    Feature("modality", "categorical", "workload", "internals.workload_info.modality"),
    Feature("batch_size", "numeric", "workload", "spec.workload.batch_size", actionable=True),
    Feature("prompt_chars_mean", "numeric", "workload", "mean characters of outputs[].input"),
    Feature("prompt_repeated_3gram_fraction", "numeric", "workload",
            "share of word 3-grams that occur more than once in a prompt (drives prompt lookup)"),
    Feature("output_tokens", "numeric", "workload", "spec.workload.max_new_tokens (text generation only)",
            actionable=True),
    Feature("diffusion_steps", "numeric", "workload", "spec.workload.num_inference_steps (image generation only)",
            actionable=True),
    # hardware, from the environment fingerprint
    Feature("device", "categorical", "hardware", "run device (cpu, cuda)"),
    Feature("cpu_cores_logical", "numeric", "hardware", "environment.cpu_cores_logical"),
    Feature("threads", "numeric", "hardware", "spec.threads or environment.torch_threads", actionable=True),
    Feature("ram_gib", "numeric", "hardware", "environment.ram_bytes / 2**30"),
    Feature("memory_bandwidth_gb_per_s", "numeric", "hardware",
            "environment.(gpu_)memory_bandwidth_bytes_per_s / 1e9 for the run's device"),
    Feature("gpu_name", "categorical", "hardware", "environment.gpu_name ('none' without a GPU)"),
    Feature("gpu_compute_capability", "numeric", "hardware", "environment.gpu_compute_capability"),
    # the candidate configuration
    Feature("technique", "categorical", "configuration", "technique"),
    Feature("configuration", "categorical", "configuration", "configuration_id(technique, params, draft)"),
    Feature("draft_tokens", "numeric", "configuration", "Technique.features: tokens drafted per target pass"),
    Feature("prompt_lookup_tokens", "numeric", "configuration", "Technique.features: tokens per n-gram lookup"),
    Feature("weight_bits", "numeric", "configuration", "Technique.features: bits per weight of a quantized model"),
    Feature("exit_threshold", "numeric", "configuration", "Technique.features: confidence threshold of an exit"),
    Feature("step_policy", "categorical", "configuration", "Technique.features: the policy parameter"),
    Feature("compute_fraction", "numeric", "configuration",
            "Technique.features: share of the model's per-token work a configuration still does (1 - sparsity, "
            "steps taken / steps trained, parameters kept / parameters), 1.0 when it skips none"),
    # pair descriptors (draft vs target)
    Feature("draft_cost_ratio", "numeric", "pair",
            "Technique.features: a priori cost of drafting relative to the target (parameters, or layers); "
            "the measured cost ratio c is an outcome, not a feature", actionable=True),
)
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
NUMERIC_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.kind == "numeric")
CATEGORICAL_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.kind == "categorical")
CONFIGURATION_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.group in ("configuration", "pair"))
CONTEXT_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.name not in CONFIGURATION_FEATURES)
TARGETS: tuple[str, ...] = ("log_speedup", "quality_loss")
NOISY_SE_FACTOR = 3.0  # a run flagged "noisy machine" pools with 3x its standard error (1/9 the weight)
COST_COLUMNS: tuple[str, ...] = ("baseline_seconds", "work_units")  # what a run cost (see run_cost)
NOISY_WEIGHT = 0.2  # sample weight of a (context, configuration) measured only on a noisy machine
#: Columns beside the features: identity and provenance of each row.
KEY_COLUMNS: tuple[str, ...] = ("context", "model", "workload", "machine_id", "lossless", "params", "draft",
                                "draft_parameters", "run_ids")
_CATEGORY_NOT_APPLICABLE = "none"  # a categorical configuration feature a technique does not set
_WORD = re.compile(r"\w+|[^\w\s]")


def schema_table() -> pd.DataFrame:
    """The feature schema as a DataFrame (name, kind, group, source, actionable)."""
    return pd.DataFrame([f.__dict__ for f in FEATURES])


# ----------------------------------------------------------------------------------------------------
# configuration identity and quality
# ----------------------------------------------------------------------------------------------------


def configuration_id(technique: str, params: Mapping[str, Any] | None = None, draft: str | None = None) -> str:
    """Canonical name of a candidate: ``technique[draft=...,key=value,...]`` with sorted keys.

    Example:
        >>> configuration_id("int8", {"scheme": "int8-dynamic"})
        'int8[scheme=int8-dynamic]'
        >>> configuration_id("baseline")
        'baseline'
    """
    parts = [f"draft={draft}"] if draft else []
    parts += [f"{key}={_param_text(value)}" for key, value in sorted((params or {}).items()) if value is not None]
    return f"{technique}[{','.join(parts)}]" if parts else technique


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def is_lossless(technique: str, params: Mapping[str, Any] | None = None) -> bool:
    """Whether the technique promises outputs identical to the baseline's (``Technique.lossless``).

    A stored run says so itself (its ``lossless`` column); this asks the technique, for runs stored
    before that column existed. An unknown technique or parameters that no longer validate count as
    lossy (never a false promise).
    """
    if technique == BASELINE_CONFIGURATION:
        return True
    from workbench import techniques

    try:
        return bool(techniques.get(technique)(**dict(params or {})).lossless)
    except Exception:  # a technique removed or renamed since the run was stored
        return False


def quality_loss(quality: Mapping[str, Any] | None, modality: str, lossless: bool = False) -> float:
    """How much quality a run gave up, in its modality's unit (perplexity %, accuracy points, 1 - SSIM);
    see :func:`workbench.quality.quality_loss`. NaN when unknown.

    Example:
        >>> quality_loss({"token_agreement": 0.97}, "text-generation")
        nan
    """
    from workbench import quality as quality_module

    return quality_module.quality_loss(quality, modality, lossless)


# ----------------------------------------------------------------------------------------------------
# runs -> features
# ----------------------------------------------------------------------------------------------------


def run_features(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per successful run: key columns, every feature of ``FEATURES`` and both targets.

    Args:
        runs: ``Store.runs()`` output (failed and skipped runs, and rows without a speedup, are dropped).

    Returns:
        A DataFrame with ``KEY_COLUMNS``, ``FEATURE_NAMES``, ``TARGETS``, ``log_speedup_se`` (from the
        run's bootstrap interval), ``noisy``, ``run_id`` and ``created_at``.
    """
    columns = ["run_id", "created_at", *KEY_COLUMNS[:-1], *FEATURE_NAMES, *TARGETS, "log_speedup_se", "noisy",
               *COST_COLUMNS]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    name_of_digest: dict[str, str] = {}  # one model, one name: the first name its files were stored under
    for run in runs.to_dict(orient="records"):
        if run.get("status") != "ok" or run.get("speedup") is None or not (run["speedup"] > 0):
            continue
        if run.get("technique") == BASELINE_CONFIGURATION:
            continue  # an A/A check of the harness, not a candidate
        digest = run.get("model_digest")
        if isinstance(digest, str) and digest:
            run = {**run, "model": name_of_digest.setdefault(digest, run["model"])}
        rows.append(_run_row(run))
    return pd.DataFrame(rows, columns=columns)


def _run_row(run: Mapping[str, Any]) -> dict[str, Any]:
    # 1. Context: model, workload, hardware.
    internals = run.get("internals") or {}
    spec = run.get("spec") or {}
    environment = run.get("environment") or {}
    model_info = internals.get("model_info") or {}
    modality = (internals.get("workload_info") or {}).get("modality") or "unknown"
    prompts = [o.get("input") for o in run.get("outputs") or [] if isinstance(o, Mapping)]
    workload = spec.get("workload") or {}
    row: dict[str, Any] = {"run_id": run["run_id"], "created_at": run.get("created_at")}
    row.update(model_features(model_info))
    row.update(workload_features(modality, [p for p in prompts if isinstance(p, str)], workload))
    row.update(hardware_features(environment, run.get("device") or "cpu", spec.get("threads")))
    row["dtype"] = run.get("dtype") or "float32"
    # 2. Configuration and the pair.
    params = dict(run.get("params") or {})
    draft = run.get("draft") if isinstance(run.get("draft"), str) and run.get("draft") else None
    draft_info = internals.get("draft_info") or {}
    row.update(configuration_features(run["technique"], params, draft,
                                      draft_info.get("parameters"), model_info))
    # 3. Keys and targets.
    row.update(model=run["model"], workload=run["workload"], machine_id=run.get("machine_id") or "unknown")
    row["context"] = context_id(row)
    row["params"] = json.dumps(params, sort_keys=True)
    row["draft"] = draft
    row["draft_parameters"] = _number(draft_info.get("parameters"))
    stored = run.get("lossless")
    row["lossless"] = bool(stored) if isinstance(stored, (bool, np.bool_)) else is_lossless(run["technique"], params)
    row["log_speedup"] = math.log(float(run["speedup"]))
    row["log_speedup_se"] = _log_standard_error(run.get("speedup_ci_low"), run.get("speedup_ci_high"))
    row["noisy"] = bool(run.get("noisy")) if isinstance(run.get("noisy"), (bool, np.bool_)) else False
    if row["noisy"]:  # a contended measurement counts less when pooled with quiet ones
        row["log_speedup_se"] *= NOISY_SE_FACTOR
    row["quality_loss"] = quality_loss(run.get("quality"), modality, row["lossless"])
    row.update(run_cost(run.get("summary") or {}, modality, workload))
    return row


def run_cost(summary: Mapping[str, Any], modality: str, workload: Mapping[str, Any]) -> dict[str, float]:
    """What one run cost, for estimating the next: ``baseline_seconds`` (the baseline's timed calls,
    mean latency x calls) and ``work_units`` (tokens generated, inputs classified, or images x steps).

    Example:
        >>> run_cost({"variants": {"baseline": {"calls": 4, "latency_s": {"mean": 0.5}, "new_tokens_total": 64}}},
        ...          "text-generation", {})
        {'baseline_seconds': 2.0, 'work_units': 64.0}
    """
    baseline = (summary.get("variants") or {}).get("baseline") or {}
    calls, latency = _number(baseline.get("calls")), _number((baseline.get("latency_s") or {}).get("mean"))
    if modality == "text-generation":
        units = _number(baseline.get("new_tokens_total"))
    elif modality == "image-generation":
        units = calls * _number(workload.get("batch_size"), 1.0) * _number(workload.get("num_inference_steps"))
    else:
        units = calls * _number(workload.get("batch_size"), 1.0)
    return {"baseline_seconds": calls * latency, "work_units": units}


def context_id(row: Mapping[str, Any]) -> str:
    """The situation a recommendation answers: model, workload, machine, device/dtype and settings."""
    settings = [f"batch={_fmt(row.get('batch_size'))}"]
    if row.get("modality") == "text-generation":
        settings.append(f"tokens={_fmt(row.get('output_tokens'))}")
    if row.get("modality") == "image-generation":
        settings.append(f"steps={_fmt(row.get('diffusion_steps'))}")
    settings.append(f"threads={_fmt(row.get('threads'))}")
    return (f"{row.get('model')} | {row.get('workload')} | {row.get('machine_id')} | "
            f"{row.get('device')}/{row.get('dtype')} | {' '.join(settings)}")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def model_features(info: Mapping[str, Any]) -> dict[str, Any]:
    """Model descriptors from ``internals.model_info`` (or :func:`describe_model_files`)."""
    def log10(value: Any) -> float:
        return math.log10(value) if isinstance(value, (int, float)) and value > 0 else float("nan")

    return {
        "model_parameters_log10": log10(info.get("parameters")),
        "model_layers": _number(info.get("layers")),
        "model_hidden_size": _number(info.get("hidden_size")),
        "model_vocab_size": _number(info.get("vocab_size")),
        "model_bytes_log10": log10(info.get("model_bytes")),
        "model_family": str(info.get("family") or "unknown"),
    }


def workload_features(modality: str, prompts: list[str], workload: Mapping[str, Any]) -> dict[str, Any]:
    """Workload descriptors: modality, batch size, prompt length and repetitiveness, output length, steps."""
    return {
        "modality": modality,
        "batch_size": _number(workload.get("batch_size"), default=1.0),
        "prompt_chars_mean": float(np.mean([len(p) for p in prompts])) if prompts else float("nan"),
        "prompt_repeated_3gram_fraction": repeated_ngram_fraction(prompts),
        "output_tokens": _number(workload.get("max_new_tokens")) if modality == "text-generation" else float("nan"),
        "diffusion_steps": (_number(workload.get("num_inference_steps")) if modality == "image-generation"
                            else float("nan")),
    }


def repeated_ngram_fraction(texts: Iterable[str], n: int = 3) -> float:
    """Mean over texts of the share of word n-grams that occur more than once in the same text.

    Example:
        >>> repeated_ngram_fraction(["a b c a b c"])
        0.5
    """
    shares = []
    for text in texts:
        words = _WORD.findall(text)
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        if not grams:
            continue
        counts = Counter(grams)
        shares.append(sum(c for c in counts.values() if c > 1) / len(grams))
    return float(np.mean(shares)) if shares else float("nan")


def hardware_features(environment: Mapping[str, Any], device: str, threads: Any = None) -> dict[str, Any]:
    """Hardware descriptors from an ``environment.fingerprint()`` dict."""
    base = device.split(":")[0]
    bandwidth = environment.get("gpu_memory_bandwidth_bytes_per_s" if base == "cuda" else
                                "memory_bandwidth_bytes_per_s")
    capability = environment.get("gpu_compute_capability")
    try:
        capability = float(capability) if capability else float("nan")
    except (TypeError, ValueError):
        capability = float("nan")
    ram = environment.get("ram_bytes")
    return {
        "device": base,
        "cpu_cores_logical": _number(environment.get("cpu_cores_logical")),
        "threads": _number(threads if threads else environment.get("torch_threads")),
        "ram_gib": ram / 2**30 if isinstance(ram, (int, float)) else float("nan"),
        "memory_bandwidth_gb_per_s": bandwidth / 1e9 if isinstance(bandwidth, (int, float)) else float("nan"),
        "gpu_name": str(environment.get("gpu_name") or "none"),
        "gpu_compute_capability": capability,
    }


def configuration_features(technique: str, params: Mapping[str, Any], draft: str | None,
                           draft_parameters: Any, model_info: Mapping[str, Any]) -> dict[str, Any]:
    """Technique, its parameters and the draft/target pair, for one candidate configuration.

    The values come from the technique's own ``Technique.features(params, model, draft)``; features it
    does not set, and every feature of a technique no longer registered, are "not applicable".
    """
    from workbench import techniques

    draft_info = {"name": draft, "parameters": draft_parameters} if draft else None
    try:
        given = techniques.get(technique).features(dict(params), dict(model_info), draft_info)
    except Exception:  # a technique removed or renamed since the run was stored
        given = {}
    row: dict[str, Any] = {"technique": technique, "configuration": configuration_id(technique, params, draft)}
    for feature in FEATURES:
        if feature.group not in ("configuration", "pair") or feature.name in row:
            continue
        value = given.get(feature.name)
        if feature.kind == "categorical":
            row[feature.name] = _CATEGORY_NOT_APPLICABLE if value is None else str(value)
        else:
            row[feature.name] = _number(value)
    return row


def _number(value: Any, default: float = float("nan")) -> float:
    if isinstance(value, bool) or value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


# ----------------------------------------------------------------------------------------------------
# pooled training table and candidates
# ----------------------------------------------------------------------------------------------------


def training_table(features: pd.DataFrame) -> pd.DataFrame:
    """Pool repeated runs: one row per (context, configuration) with the precision-weighted log speedup
    (:func:`pool_log_speedups`) and its standard error, the mean quality loss, ``n_runs`` and the
    contributing ``run_ids`` (provenance).

    Example:
        >>> training_table(run_features(pd.DataFrame())).empty
        True
    """
    if features.empty:
        return pd.DataFrame(columns=[*KEY_COLUMNS, *FEATURE_NAMES, *TARGETS, "log_speedup_se", "n_runs", "noisy",
                                     "weight"])
    grouped = features.groupby(["context", "configuration"], sort=True, dropna=False)
    first = grouped.first()
    table = first[[c for c in [*KEY_COLUMNS, *FEATURE_NAMES] if c in first.columns and c != "configuration"]].copy()
    pooled = {key: pool_log_speedups(group["log_speedup"], group["log_speedup_se"]) for key, group in grouped}
    table["log_speedup"] = [pooled[key][0] for key in table.index]
    table["log_speedup_se"] = [pooled[key][1] for key in table.index]
    table["quality_loss"] = grouped["quality_loss"].mean()  # NaN only when no run had a figure
    table["noisy"] = grouped["noisy"].all() if "noisy" in features.columns else False
    table["weight"] = np.where(table["noisy"], NOISY_WEIGHT, 1.0)  # sample weight for the learner
    for column in COST_COLUMNS:
        table[column] = grouped[column].mean() if column in features.columns else float("nan")
    table["n_runs"] = grouped.size()
    table["run_ids"] = grouped["run_id"].agg(lambda ids: sorted(ids))
    return table.reset_index()


def pool_log_speedups(values: Iterable[float], standard_errors: Iterable[float]) -> tuple[float, float]:
    """Inverse-variance (fixed-effect) pooling of repeated measurements of one log speedup.

    A run measured on a quiet machine (narrow interval) outweighs one that stalled under contention
    (wide interval). Runs without an interval count with the largest standard error among the others;
    when none has one, the median is used and the standard error is unknown (NaN).

    Example:
        >>> round(pool_log_speedups([0.0, 1.0], [0.1, 0.3])[0], 3)
        0.1
    """
    v = np.asarray(list(values), dtype=float)
    se = np.asarray(list(standard_errors), dtype=float)
    known = np.isfinite(se) & (se > 0)
    if not known.any():
        return float(np.median(v)), float("nan")
    se = np.where(known, se, se[known].max())
    weights = 1.0 / se ** 2
    return float(np.sum(weights * v) / np.sum(weights)), float(np.sqrt(1.0 / np.sum(weights)))


def _log_standard_error(ci_low: Any, ci_high: Any) -> float:
    """The standard error of a log speedup from its 95% interval (width / 2 x 1.96); NaN if unknown."""
    low, high = _number(ci_low), _number(ci_high)
    if not 0 < low < high:  # NaN compares False
        return float("nan")
    return math.log(high / low) / (2 * 1.959964)


def candidates(table: pd.DataFrame) -> pd.DataFrame:
    """The configurations seen in training, one row each, with what is needed to re-featurise them for a
    new context: technique, params, draft, draft parameters and the modality they ran on."""
    columns = ["configuration", "technique", "modality", "lossless", "params", "draft", "draft_parameters"]
    if table.empty:
        return pd.DataFrame(columns=columns)
    return table.drop_duplicates(["configuration", "modality"])[columns].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------
# a context the learner has never seen: read model files, workload and this machine
# ----------------------------------------------------------------------------------------------------


def describe_model_files(location: Path) -> dict[str, Any]:
    """Model descriptors from files only (config.json and safetensors headers; no weights loaded).

    Example:
        >>> describe_model_files(Path("data/zoo/code-target"))["family"]  # doctest: +SKIP
        'gpt2'
    """
    from workbench.models.facts import describe_files

    return describe_files(Path(location))


def context_for(model: str, workload: Any, device: str = "cpu", dtype: str = "float32", threads: int | None = None,
                environment: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Context features for a model and workload that may never have been measured.

    The model is described from its files (``resolve_location`` + config.json + safetensors headers),
    the workload from ``load_workload`` and the machine from ``environment.fingerprint()``.

    Args:
        model: a Hugging Face id (cached), a local folder or ``zoo:NAME``.
        workload: a workload name, or a ``WorkloadSpec`` (its max_new_tokens, batch size, steps count).
    """
    from workbench.models.loading import resolve_location
    from workbench.specs import ModelSpec, WorkloadSpec
    from workbench.workloads import load_workload

    # 1. Model and workload from files; the machine from its fingerprint.
    spec = workload if isinstance(workload, WorkloadSpec) else WorkloadSpec(str(workload))
    info = describe_model_files(resolve_location(ModelSpec(model)))
    loaded = load_workload(spec)
    if environment is None:
        from workbench.environment import fingerprint

        environment = fingerprint(device=device.split(":")[0])
    prompts = [str(item.get("prompt") or item.get("text") or f"class {item.get('class_label')}")
               for item in loaded.items]
    # 2. The same descriptors a stored run gets.
    row: dict[str, Any] = {"model": model, "workload": spec.name, "machine_id": environment.get("machine_id") or "unknown",
                           "dtype": dtype}
    row.update(model_features(info))
    row.update(workload_features(loaded.modality, prompts, spec.__dict__))
    row.update(hardware_features(environment, device, threads))
    row["context"] = context_id(row)
    row["workload_items"] = len(loaded.items)  # not a feature: what estimating a run's minutes needs
    return row


def candidate_rows(context: Mapping[str, Any], options: pd.DataFrame) -> pd.DataFrame:
    """One feature row per candidate configuration of ``options`` (from :func:`candidates`) that ran on
    the context's modality, re-featurised for this context (pair ratios use this model's size)."""
    model_info = {"parameters": 10 ** context["model_parameters_log10"]
                  if math.isfinite(context.get("model_parameters_log10", float("nan"))) else None,
                  "layers": context.get("model_layers")}
    rows = []
    for option in options[options["modality"] == context.get("modality")].to_dict(orient="records"):
        draft = option["draft"] if isinstance(option["draft"], str) and option["draft"] else None
        if draft is not None and draft == context.get("model"):
            continue  # a model cannot usefully draft for itself
        option["draft"] = draft
        params = json.loads(option["params"])
        layers = context.get("model_layers")
        if params.get("draft_layers") and isinstance(layers, (int, float)) and params["draft_layers"] >= layers:
            continue  # self-speculation needs fewer draft layers than the model has
        row = {name: context.get(name) for name in CONTEXT_FEATURES}
        row.update(context=context.get("context"), model=context.get("model"), workload=context.get("workload"),
                   machine_id=context.get("machine_id"), lossless=bool(option["lossless"]),
                   params=option["params"], draft=option["draft"], draft_parameters=option["draft_parameters"],
                   workload_items=context.get("workload_items"))
        row.update(configuration_features(option["technique"], params, option["draft"],
                                          option["draft_parameters"], model_info))
        if draft is not None and not (row.get("draft_cost_ratio") or 0.0) < 1.0:
            continue  # a draft no smaller than the target cannot pay
        rows.append(row)
    return pd.DataFrame(rows, columns=[*KEY_COLUMNS[:-1], *FEATURE_NAMES, "workload_items"])
