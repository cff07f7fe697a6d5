"""Sweeps that survive: a YAML file of models x workloads x techniques (with parameter grids), planned in
full before anything runs, each run in its own worker process, every finished run stored at once.

The sweep file (every key but ``models``, ``workloads`` and ``techniques`` is optional)::

    name: spec-vs-quant          # a label stored with every run (labels do not change run keys)
    models:                      # hub ids, local folders or zoo:NAME; or a mapping per model
      - zoo:code-target
      - {name: gpt2, revision: main, trust_remote_code: false, allow_pickle: false}
    workloads:                   # built-in names or .jsonl paths; or a mapping with WorkloadSpec fields
      - {name: code-prompts, max_items: 4, max_new_tokens: 16}
    techniques:                  # a name, or a mapping: name, params (fixed), grid (lists), draft
      - baseline
      - {name: speculative, draft: zoo:code-draft, grid: {num_assistant_tokens: [2, 4]}}
      - {name: quantization, params: {scheme: int8-dynamic}}
    devices: [cpu]               # default [cpu]; a device not present here is recorded as skipped
    hardware: [cpu-a, cpu-b]     # with --ray: run everything on each kind of node (its label); default: any node
    dtypes: [float32]            # default [float32]
    seeds: [0, 1]                # default [0]; each seed is its own run (inputs and sampling)
    repeats: 3                   # timed passes per run (default 5)
    warmup: 1                    # untimed passes first (default 1)
    threads: null                # torch CPU threads per run (default: the cores other processes leave free)
    margin_percent: 2            # equivalence band of the verdict (default 2: within +-2% is no practical difference)
    timeout_per_run_s: 600       # per run (default 3600); --timeout-per-run overrides
    max_memory_gb: 8             # address-space cap per worker (--max-memory overrides)

The runs are the cartesian product models x workloads x techniques (each grid expanded) x devices x
hardware x dtypes x seeds, in that nesting order; a workload entry without its own ``seed`` takes the run's seed,
as ``workbench run --seed`` does. A combination that cannot run here (a technique that does not apply to
a model kind, a GPU device on a CPU machine) is stored as *skipped* with its reason. Anything else that
is wrong (YAML syntax, an unknown key, a bad value, an unknown model, a bad workload line, a duplicate
run, an impossible combination such as a workload whose inputs do not fit a model's kind or a draft for
a technique that takes none) stops the sweep before the first run, with one line naming the file, the
line and the fix; sweep models of different kinds with their workloads in separate files.

Example:
    >>> sweep = parse_sweep('''
    ... models: [zoo:code-classifier]
    ... workloads: [{name: code-snippets, max_items: 4}]
    ... techniques: [baseline, {name: quantization, grid: {scheme: [int8-dynamic]}}]
    ... seeds: [0, 1]
    ... repeats: 1
    ... ''')
    >>> len(sweep.specs)
    4
    >>> outcome = run_sweep(sweep, Store("sqlite:///runs.sqlite"), resume=True)  # doctest: +SKIP
    >>> outcome.ok, outcome.failed  # doctest: +SKIP
    (4, 0)
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import itertools
import math
import reprlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from workbench.errors import NotApplicableError, WorkbenchError
from workbench.specs import DTYPES, HARDWARE_LABEL, ModelSpec, RunSpec, SpecError, TechniqueSpec, WorkloadSpec
from workbench.worker import WorkerLimits, run_isolated

#: Top-level keys of a sweep file, and the keys of its entries.
SWEEP_KEYS = ("name", "models", "workloads", "techniques", "devices", "dtypes", "seeds", "repeats", "warmup",
              "threads", "margin_percent", "timeout_per_run_s", "max_memory_gb", "labels", "hardware")
MODEL_KEYS = ("name", "revision", "trust_remote_code", "allow_pickle")
WORKLOAD_KEYS = ("name", "max_items", "max_new_tokens", "batch_size", "num_inference_steps", "seed")
TECHNIQUE_KEYS = ("name", "params", "grid", "draft")
#: A sweep expanding to more runs than this is refused (split it, or narrow a grid).
MAX_RUNS = 10_000


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring = _REPR.maxother = 60


def _r(value: Any) -> str:
    """``repr`` bounded in depth and length: a YAML alias bomb shares one object a billion ways, and a full
    repr of it would exhaust memory before the error could be printed."""
    return _REPR.repr(value)


_REPR.repr__Map = _REPR.repr_dict  # reprlib dispatches on the type's name: the line-keeping YAML types are
_REPR.repr__Seq = _REPR.repr_list  # a dict and a list to it (else it falls back to the full repr)


class SweepError(WorkbenchError):
    """A sweep file problem, in one line naming the file, the line, the value and the fix."""


@dataclass
class Sweep:
    """A parsed sweep file: the runs it expands to, in order, and its run limits."""

    source: str  # the file it came from, for messages
    specs: list[RunSpec]  # one per run, in expansion order (the index is the position)
    origins: list[str]  # per run: the entries it came from, e.g. "models[0] (line 3), ..."
    name: str | None = None  # the sweep's name (stored as the label "sweep")
    timeout_per_run_s: float | None = None  # from the file; the CLI flag overrides it
    max_memory_gb: float | None = None  # from the file; the CLI flag overrides it


DEFAULT_TIMEOUT_PER_RUN_S = 3600.0  # when the file and the CLI give none: an hour, then the run fails


@dataclass
class PlannedRun:
    """One run of a planned sweep."""

    index: int  # position in the sweep
    spec: RunSpec  # what to run
    skip_reason: str | None = None  # why it cannot run here (stored as a skipped run), or None
    plan: Any = None  # the runner.Plan the worker receives (None when skipped)


@dataclass
class SweepOutcome:
    """What a sweep did; ``interrupted`` is True when Ctrl-C stopped it (finished runs are stored)."""

    total: int  # runs in the sweep
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # not applicable here, stored with the reason
    already_done: int = 0  # found in the store by --resume, not run again
    elsewhere: int = 0  # --resume: being run by another sweep on this machine at the time, left to it
    interrupted: bool = False
    failures: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)
    run_ids: list[str] = field(default_factory=list)  # stored rows, in order
    wall_s: float = 0.0

    @property
    def missing(self) -> int:
        """Runs neither stored now nor found stored before (an interrupted sweep's remainder)."""
        return self.total - self.ok - self.failed - self.skipped - self.already_done - self.elsewhere


# ----------------------------------------------------------------------------------------------------
# reading: YAML with line numbers
# ----------------------------------------------------------------------------------------------------


class _Map(dict):
    """A YAML mapping that remembers its line and the line of each key (1-based)."""

    line = 0
    key_lines: dict[Any, int] = {}


class _Seq(list):
    """A YAML sequence that remembers its line and the line of each item (1-based)."""

    line = 0
    item_lines: list[int] = []


class _LineLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python objects), with line numbers kept on mappings and sequences."""


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> Any:
    data = _Map()
    data.line = node.start_mark.line + 1
    yield data
    own_keys = [key_node for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge"]
    data.update(loader.construct_mapping(node))  # merge keys (<<: *anchor) are flattened here
    data.key_lines = {}
    for key_node in own_keys:
        key = loader.construct_object(key_node)
        if key in data.key_lines:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {data.key_lines[key]})", key_node.start_mark)
        data.key_lines[key] = key_node.start_mark.line + 1


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> Any:
    data = _Seq()
    data.line = node.start_mark.line + 1
    data.item_lines = [item.start_mark.line + 1 for item in node.value]
    yield data
    data.extend(loader.construct_sequence(node))


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def read_sweep(path: str | Path) -> Sweep:
    """Read and expand a sweep file; raises :class:`SweepError` (one line) on any problem."""
    path = Path(path)
    shown = str(path) if str(path).isprintable() else repr(str(path))  # one line, whatever the name holds
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SweepError(f"sweep file {shown} does not exist: give the path of a YAML sweep file") from None
    except IsADirectoryError:
        raise SweepError(f"sweep file {shown} is a folder: give the path of a YAML sweep file") from None
    except UnicodeDecodeError as err:
        raise SweepError(f"sweep file {shown} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise SweepError(f"cannot read sweep file {shown} ({getattr(err, 'strerror', None) or err}): check "
                         "the path and its permissions") from None
    return parse_sweep(text, source=shown)


def parse_sweep(text: str, source: str = "<sweep>") -> Sweep:
    """Parse and validate sweep YAML and expand it into RunSpecs (no model, workload or store is touched).

    Raises:
        SweepError: one line such as ``sweep.yaml line 7: techniques[1].grid: unknown parameter ...``.
    """
    # 1. YAML, with the position of a syntax error.
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SweepError(f"{source}{where}: invalid YAML ({problem}): fix the syntax there") from None
    except RecursionError:
        raise SweepError(f"{source}: YAML nested too deeply: a sweep file is a flat mapping") from None
    # 2. The top-level mapping and its keys.
    if data is None:
        raise SweepError(f"{source}: the sweep file is empty: give models, workloads and techniques "
                         "(see `python -c 'import workbench.sweep as s; print(s.__doc__)'`)")
    if not isinstance(data, dict):
        raise SweepError(f"{source} line {getattr(data, 'line', 1)}: the sweep file is a {_kind(data)}, not a "
                         "mapping: start with keys such as `models:`, `workloads:`, `techniques:`")
    check = _Checker(source)
    check.keys(data, SWEEP_KEYS, "", data.line)
    for required in ("models", "workloads", "techniques"):
        if required not in data:
            raise SweepError(f"{source}: the sweep file has no `{required}:` list: add one, e.g. "
                             f"{_EXAMPLES[required]}")
    # 3. Each section, checked with its line.
    models = check.entries(data, "models", check.model)
    workloads = check.entries(data, "workloads", check.workload)
    techniques = check.entries(data, "techniques", check.technique)
    devices = check.scalar_list(data, "devices", str, ["cpu"])
    for i, device in enumerate(devices):
        if device.split(":", 1)[0] not in ("cpu", "cuda"):
            raise check.error(data["devices"], i, f"devices[{i}]={device!r} is unknown: use cpu, cuda or cuda:N")
    hardware = check.scalar_list(data, "hardware", str, ["cpu-epyc"]) if "hardware" in data else [None]
    for i, label in enumerate(hardware):
        if label is not None and not HARDWARE_LABEL.fullmatch(label):
            raise check.error(data["hardware"], i, f"hardware[{i}]={label!r} is invalid: use a label of letters, "
                                                   "digits, '-', '_' or '.', e.g. cpu-epyc or gpu-h100")
    dtypes = check.scalar_list(data, "dtypes", str, ["float32"])
    for i, dtype in enumerate(dtypes):
        if dtype not in DTYPES:
            raise check.error(data["dtypes"], i, f"dtypes[{i}]={dtype!r} is unknown: use one of {', '.join(DTYPES)}")
    seeds = check.scalar_list(data, "seeds", int, [0])
    repeats = check.integer(data, "repeats", 5, minimum=1)
    warmup = check.integer(data, "warmup", 1, minimum=0)
    threads = check.integer(data, "threads", None, minimum=1)
    margin = check.number(data, "margin_percent")
    margin = 2.0 if margin is None else margin
    timeout_s = check.number(data, "timeout_per_run_s")
    if timeout_s is None:
        timeout_s = DEFAULT_TIMEOUT_PER_RUN_S  # a hung run must never stall the sweep forever
    memory_gb = check.number(data, "max_memory_gb")
    name = check.optional_str(data, "name")
    labels = check.labels(data)
    if name is not None:
        labels["sweep"] = name
    # 4. The cartesian product, counted before it is built.
    variants = [(technique, origin) for group, origin in techniques for technique in group]
    size = len(models) * len(workloads) * len(variants) * len(devices) * len(hardware) * len(dtypes) * len(seeds)
    if size > MAX_RUNS:
        raise SweepError(f"{source}: the sweep expands to {size:,} runs, more than {MAX_RUNS:,}: split it into "
                         "several files or narrow a grid")
    specs, origins, seen = [], [], {}
    for (model, m_origin), (workload, w_origin), (technique, t_origin), device, label, dtype, seed in itertools.product(
        models, workloads, variants, devices, hardware, dtypes, seeds,
    ):
        origin = f"{m_origin}, {w_origin}, {t_origin}"
        try:
            wl = WorkloadSpec(**{"seed": seed, **workload})
            spec = RunSpec(model=model, workload=wl, technique=technique, device=device, dtype=dtype, seed=seed,
                           repeats=repeats, warmup=warmup, threads=threads, margin_percent=margin,
                           labels=tuple(sorted(labels.items())), hardware=label)
        except SpecError as err:
            raise SweepError(f"{source}: {origin}: {err}") from None
        key = spec.key()
        if key in seen:
            raise SweepError(f"{source}: runs {seen[key]} and {len(specs)} are the same run ({origin}): remove the "
                             "duplicate entry or grid value")
        seen[key] = len(specs)
        specs.append(spec)
        origins.append(origin)
    return Sweep(source, specs, origins, name, timeout_s, memory_gb)


_EXAMPLES = {
    "models": "models: [zoo:code-target]",
    "workloads": "workloads: [{name: code-prompts, max_items: 4}]",
    "techniques": "techniques: [baseline, {name: speculative, draft: zoo:code-draft}]",
}


def _kind(value: Any) -> str:
    names = {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer", float: "number",
             type(None): "null"}
    for cls, name in names.items():
        if isinstance(value, cls) and not (cls is int and isinstance(value, bool)):
            return name
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    """Checks one section at a time; every error names the file, the line, the value and the fix."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, container: Any, key: Any, message: str) -> SweepError:
        line = None
        if isinstance(container, _Map):
            line = container.key_lines.get(key, container.line)
        elif isinstance(container, _Seq) and isinstance(key, int) and key < len(container.item_lines):
            line = container.item_lines[key]
        where = f" line {line}" if line else ""
        return SweepError(f"{self.source}{where}: {message}")

    def keys(self, mapping: dict, allowed: tuple[str, ...], path: str, line: int) -> None:
        for key in mapping:
            if isinstance(key, str) and key in allowed:
                continue
            near = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}?" if near else f"valid keys are {', '.join(allowed)}"
            raise self.error(mapping, key, f"unknown key {_r(key)}{' in ' + path if path else ''}: {hint}")

    def entries(self, data: dict, section: str, one: Any) -> list[Any]:
        items = data[section]
        if not isinstance(items, list) or not items:
            raise self.error(data, section, f"`{section}` is a {_kind(items)}{' (empty)' if items == [] else ''}: "
                                            f"give a non-empty list, e.g. {_EXAMPLES[section]}")
        return [one(items, i, f"{section}[{i}]") for i in range(len(items))]

    def _line_of(self, items: Any, i: int) -> int | None:
        return items.item_lines[i] if isinstance(items, _Seq) and i < len(items.item_lines) else None

    def _entry(self, items: list, i: int, path: str, allowed: tuple[str, ...]) -> dict:
        value = items[i]
        if isinstance(value, str):
            value = {"name": value}
        elif isinstance(value, dict):
            self.keys(value, allowed, path, getattr(value, "line", 0))
        else:
            raise self.error(items, i, f"{path} is a {_kind(value)}: give a name or a mapping with keys "
                                       f"{', '.join(allowed)}")
        name = value.get("name")
        if not isinstance(name, str) or not name.strip():
            raise self.error(value if "name" in value else items, "name" if "name" in value else i,
                             f"{path}.name is {_r(name)}: give a non-empty string")
        return value

    def _field(self, entry: dict, items: list, i: int, key: str, path: str, ok: bool, want: str) -> None:
        if not ok:
            container, at = (entry, key) if isinstance(entry, _Map) else (items, i)
            raise self.error(container, at, f"{path}.{key}={_r(entry[key])} is invalid: use {want}")

    def model(self, items: list, i: int, path: str) -> tuple[ModelSpec, str]:
        entry = self._entry(items, i, path, MODEL_KEYS)
        for key in ("trust_remote_code", "allow_pickle"):
            if key in entry:
                self._field(entry, items, i, key, path, isinstance(entry[key], bool), "true or false")
        if "revision" in entry:
            revision = entry["revision"]
            self._field(entry, items, i, "revision", path, revision is None or isinstance(revision, str),
                        "a branch, tag or commit string")
        try:
            spec = ModelSpec(**entry)
        except SpecError as err:
            raise self.error(items, i, f"{path}: {err}") from None
        return spec, f"{path} (line {self._line_of(items, i)})"

    def workload(self, items: list, i: int, path: str) -> tuple[dict, str]:
        entry = self._entry(items, i, path, WORKLOAD_KEYS)
        for key in WORKLOAD_KEYS[1:]:
            if key in entry:
                value = entry[key]
                ok = _is_int(value) and value >= (0 if key == "seed" else 1) or (key == "max_items" and value is None)
                self._field(entry, items, i, key, path, ok,
                            "an integer >= 0" if key == "seed" else "a positive integer" +
                            (" or null for all" if key == "max_items" else ""))
        return dict(entry), f"{path} (line {self._line_of(items, i)})"

    def technique(self, items: list, i: int, path: str) -> tuple[list[TechniqueSpec], str]:
        entry = self._entry(items, i, path, TECHNIQUE_KEYS)
        # 1. Fixed params and grid: mappings of scalars (grid values: non-empty lists of scalars).
        params = {} if entry.get("params") is None else entry["params"]
        grid = {} if entry.get("grid") is None else entry["grid"]
        for key, value in (("params", params), ("grid", grid)):
            self._field(entry, items, i, key, path, isinstance(value, dict), f"a mapping, e.g. {key}: {{name: value}}")
            for name in value:
                if not isinstance(name, str):
                    raise self.error(value, name, f"{path}.{key} has the key {_r(name)}: parameter names are strings")
        for name, value in params.items():
            if not _is_scalar(value):
                raise self.error(params, name, f"{path}.params.{name}={_r(value)} is a {_kind(value)}: give one "
                                               "string, number or boolean (put lists under grid:)")
        for name, values in grid.items():
            if not isinstance(values, list) or not values or not all(_is_scalar(v) for v in values):
                raise self.error(grid, name, f"{path}.grid.{name}={_r(values)} is invalid: give a non-empty list of "
                                             f"values, e.g. {name}: [2, 4]")
            if name in params:
                raise self.error(grid, name, f"{path}: {name} is in both params and grid: keep it in one")
        # 2. The draft model, if any.
        draft = entry.get("draft")
        if isinstance(draft, dict):
            draft = self.model([draft], 0, f"{path}.draft")[0]
        elif isinstance(draft, str):
            draft = self.model([draft], 0, f"{path}.draft")[0]
        elif draft is not None:
            self._field(entry, items, i, "draft", path, False, "a model name or mapping, e.g. draft: zoo:code-draft")
        # 3. The grid expanded (its size checked first).
        size = math.prod(len(v) for v in grid.values())
        if size > MAX_RUNS:
            raise self.error(items, i, f"{path}.grid expands to {size:,} variants, more than {MAX_RUNS:,}: narrow it")
        # 4. The technique exists, takes these parameters and (if given) a draft: checked per variant.
        from workbench import techniques as registry

        try:
            cls = registry.get(entry["name"])
        except WorkbenchError as err:
            raise self.error(items, i, f"{path}: {err}") from None
        if draft is not None and not cls.takes_draft:
            raise self.error(items, i, f"{path}: technique {cls.name!r} takes no draft model: drop `draft:`")
        names = list(grid)
        specs = []
        for values in itertools.product(*(grid[n] for n in names)):
            try:
                spec = TechniqueSpec(entry["name"], {**params, **dict(zip(names, values))}, draft)
                cls.check_params(spec.param_dict)
            except WorkbenchError as err:
                raise self.error(items, i, f"{path}: {err}") from None
            specs.append(spec)
        return specs, f"{path} (line {self._line_of(items, i)})"

    def scalar_list(self, data: dict, key: str, cls: type, default: list) -> list:
        if key not in data:
            return default
        values = data[key]
        want = "strings" if cls is str else "integers"
        if not isinstance(values, list) or not values:
            raise self.error(data, key, f"`{key}` is a {_kind(values)}: give a non-empty list of {want}, "
                                        f"e.g. {key}: {default}")
        for i, value in enumerate(values):
            if not (isinstance(value, str) if cls is str else _is_int(value) and value >= 0):
                raise self.error(values, i, f"{key}[{i}]={_r(value)} is a {_kind(value)}: give "
                                            f"{'a string' if cls is str else 'an integer >= 0'}")
        if len(set(values)) != len(values):
            raise self.error(data, key, f"`{key}` lists a value twice: remove the duplicate")
        return list(values)

    def integer(self, data: dict, key: str, default: int | None, minimum: int) -> int | None:
        value = data.get(key, default)
        if value is None and default is None:
            return None
        if not _is_int(value) or value < minimum:
            raise self.error(data, key, f"{key}={_r(value)} is invalid: use an integer >= {minimum}"
                                        + (" or null" if default is None else ""))
        return value

    def number(self, data: dict, key: str) -> float | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
            raise self.error(data, key, f"{key}={_r(value)} is invalid: use a positive number or null")
        return float(value)

    def optional_str(self, data: dict, key: str) -> str | None:
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise self.error(data, key, f"{key}={_r(value)} is invalid: use a non-empty string")
        return value

    def labels(self, data: dict) -> dict[str, str]:
        value = data.get("labels", {})
        if not isinstance(value, dict) or not all(isinstance(k, str) and _is_scalar(v) for k, v in value.items()):
            raise self.error(data, "labels", f"labels={_r(value)} is invalid: use a mapping of names to strings")
        return {k: str(v) for k, v in value.items()}


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value))


# ----------------------------------------------------------------------------------------------------
# planning: everything checked before the first run
# ----------------------------------------------------------------------------------------------------


def plan_sweep(sweep: Sweep, here: bool = True) -> list[PlannedRun]:
    """Plan every run without loading weights; a run that cannot work here is marked skipped.

    ``here=False``: the runs go to cluster nodes, which judge their own hardware (see ``runner.plan``).

    Raises:
        SweepError: the first run whose plan fails for a reason the user must fix (unknown model or
            technique parameter, bad workload line), naming the entries it came from.
    """
    from workbench import runner

    planned = []
    for index, (spec, origin) in enumerate(zip(sweep.specs, sweep.origins)):
        try:
            planned.append(PlannedRun(index, spec, plan=runner.plan(spec, here=here)))
        except NotApplicableError as err:
            planned.append(PlannedRun(index, spec, skip_reason=str(err)))
        except WorkbenchError as err:
            raise SweepError(f"{sweep.source}: run {index} ({origin}): {err}") from None
    return planned


def describe(spec: RunSpec) -> str:
    """A one-line description of a run, for progress and listings.

    Example:
        >>> describe(RunSpec(ModelSpec("zoo:code-target"), WorkloadSpec("code-prompts"),
        ...                  TechniqueSpec("speculative", {"num_assistant_tokens": 2}, "zoo:code-draft")))
        'zoo:code-target code-prompts speculative(num_assistant_tokens=2, draft=zoo:code-draft) cpu float32 seed 0'
    """
    params = [f"{k}={v}" for k, v in spec.technique.params]
    if spec.technique.draft is not None:
        params.append(f"draft={spec.technique.draft.name}")
    technique = spec.technique.name + (f"({', '.join(params)})" if params else "")
    where = spec.device if spec.hardware is None else f"{spec.device}@{spec.hardware}"
    return f"{spec.model.name} {spec.workload.name} {technique} {where} {spec.dtype} seed {spec.seed}"


# ----------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------


def prepare(sweep: Sweep | list[RunSpec], store: Any, resume: bool, limits: WorkerLimits | None,
            planned: list[PlannedRun] | None) -> tuple[WorkerLimits, SweepOutcome, list[PlannedRun]]:
    """The start of every sweep, here or on a cluster: plan (if not done), the limits, and the runs to do."""
    if not isinstance(sweep, Sweep):
        sweep = sweep_of(list(sweep))
    planned = plan_sweep(sweep) if planned is None else planned
    limits = limits or WorkerLimits(sweep.timeout_per_run_s, sweep.max_memory_gb)
    done = done_keys(store, [p.spec for p in planned]) if resume else set()
    todo = [p for p in planned if p.spec.key() not in done]
    return limits, SweepOutcome(total=len(planned), already_done=len(planned) - len(todo)), todo


def record(outcome: SweepOutcome, item: PlannedRun, row: dict[str, Any], bar: Any, store: Any = None) -> None:
    """Count one finished run (storing its row first when ``store`` is given) and show it on the bar.

    ``row`` is a store row, or what a cluster node answered after storing it (``run_id``, ``status``,
    ``failure_reason``)."""
    run_id = store.append(row) if store is not None else row["run_id"]
    if run_id is not None:  # None: a cluster node stored the row but its answer was lost
        outcome.run_ids.append(run_id)
    status = row["status"]
    setattr(outcome, status, getattr(outcome, status) + 1)
    if status == "failed":
        outcome.failures.append((item.index, row.get("failure_reason") or ""))
        bar.write(f"run {item.index} failed: {row.get('failure_reason')}  [{describe(item.spec)}]")
    bar.set_postfix(ok=outcome.ok, failed=outcome.failed, skipped=outcome.skipped)
    bar.update(1)


@contextlib.contextmanager
def _claim(store: Any, key: str, resume: bool) -> Iterator[bool]:
    """With ``resume``, an exclusive claim on one run among the sweeps of this machine that share a store
    (an advisory lock on a file under ``data/locks``, released when the run ends or its process dies);
    yields False when another sweep holds it. Without ``resume`` every run is ours: a sweep started twice
    on purpose measures twice."""
    if not resume:
        yield True
        return
    import fcntl

    from workbench import paths

    folder = paths.data_dir() / "locks"
    folder.mkdir(exist_ok=True)
    name = hashlib.sha256(f"{store.url}\n{key}".encode()).hexdigest()[:32]
    with open(folder / f"{name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _environments() -> Any:
    """``environment(spec)``: this machine's fingerprint for the spec's device kind, taken once per kind."""
    from workbench.environment import fingerprint

    taken: dict[str, dict[str, Any]] = {}

    def environment(spec: RunSpec) -> dict[str, Any]:
        device = spec.device.split(":")[0]
        if device not in taken:
            taken[device] = fingerprint(device=device)
        return taken[device]

    return environment


def done_keys(store: Any, specs: list[RunSpec]) -> set[str]:
    """Keys of runs already stored as ok (anywhere) or as skipped on this machine: ``--resume`` skips them."""
    from workbench.environment import fingerprint

    machine = fingerprint(measure_bandwidth=False)["machine_id"]
    keys = sorted({spec.key() for spec in specs})
    done: set[str] = set()
    for start in range(0, len(keys), 500):
        frame = store.runs(spec_key=keys[start:start + 500], status=["ok", "skipped"],
                           columns=["spec_key", "status", "machine_id"])
        for key, status, machine_id in zip(frame["spec_key"], frame["status"], frame["machine_id"]):
            if status == "ok" or machine_id == machine:
                done.add(key)
    return done


def sweep_of(specs: list[RunSpec], name: str | None = None, timeout_per_run_s: float = DEFAULT_TIMEOUT_PER_RUN_S,
             max_memory_gb: float | None = None) -> Sweep:
    """A sweep of specs built in code (a script, a test): the same path a sweep file takes.

    Example:
        >>> sweep_of([RunSpec(ModelSpec("zoo:code-target"), WorkloadSpec("code-prompts"),
        ...                   TechniqueSpec("baseline"))]).origins
        ['specs[0]']
    """
    return Sweep(source=name or "<specs>", specs=list(specs), origins=[f"specs[{i}]" for i in range(len(specs))],
                 name=name, timeout_per_run_s=timeout_per_run_s, max_memory_gb=max_memory_gb)


def run_sweep(sweep: Sweep | list[RunSpec], store: Any, resume: bool = False, limits: WorkerLimits | None = None,
              progress: bool = True, planned: list[PlannedRun] | None = None) -> SweepOutcome:
    """Run every planned run in its own worker and store each row as soon as it arrives.

    Args:
        sweep: from :func:`read_sweep` / :func:`parse_sweep`, or a list of specs (see :func:`sweep_of`).
        store: a :class:`workbench.store.Store`; rows are written by this process only.
        resume: skip runs already stored as ok (and those stored as skipped on this machine).
        limits: timeout and memory cap per worker; default: the sweep file's values.
        progress: a tqdm bar with counts and an ETA on stderr.
        planned: the output of :func:`plan_sweep`, when already computed.

    Returns:
        The counts; on Ctrl-C the unfinished run's worker is killed, nothing of it is stored, and the
        outcome comes back with ``interrupted=True`` (rerun with ``resume=True`` for the rest).
    """
    from tqdm.auto import tqdm

    from workbench.runner import skipped_result

    started = time.perf_counter()
    # 1. Plan all (bad input stops here), then drop what the store already has.
    limits, outcome, todo = prepare(sweep, store, resume, limits, planned)
    environment = _environments()
    # 2. One worker per run; each row stored as it arrives.
    bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=not progress, dynamic_ncols=True)
    try:
        for item in todo:
            bar.set_description(f"sweep: run {item.index}")
            with _claim(store, item.spec.key(), resume) as mine:
                if not mine:  # --resume: another sweep on this machine is running it now
                    outcome.elsewhere += 1
                    bar.update(1)
                    continue
                if resume and store.has_ok_run(item.spec.key()):  # stored by another sweep since we planned
                    outcome.already_done += 1
                    bar.update(1)
                    continue
                if item.skip_reason is not None:
                    row = skipped_result(item.spec, item.skip_reason, environment(item.spec)).to_row()
                else:
                    row = run_isolated(item.plan, limits, index=item.index, environment=environment(item.spec))
                record(outcome, item, row, bar, store)
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        bar.close()
    outcome.wall_s = time.perf_counter() - started
    return outcome
