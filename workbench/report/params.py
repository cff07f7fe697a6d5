"""Report parameters: what a scheduled job asked for, validated fast (one line on bad input)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from workbench.errors import WorkbenchError


#: The parameterized notebook that ``workbench report`` executes.
REPORT_NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "report.ipynb"
AUDIENCES = ("manager", "engineer")  # manager: summary-first, fewer tables; engineer: every run listed
PARAM_KEYS = ("store_url", "since", "models", "machines", "techniques", "budget", "title", "audience", "learner")
KERNEL_NAME = "workbench-report"  # a private kernelspec that points at this interpreter

# A template on top of JupyterLab's that loads nothing from the network (no require.js, MathJax, mermaid)
# and carries only the little CSS the report's outputs need (JupyterLab's theme CSS is ~250 KB).
_OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}<!-- workbench:plotly.js -->{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block notebook_css -%}<style>
body {margin: 0; background: #fff; color: #222}
.jp-Notebook {padding: 12px 24px}
.jp-Cell, .jp-OutputArea-output {padding: 0; margin: 0}
.jp-OutputArea-prompt, .jp-InputArea {display: none}
</style>{%- endblock notebook_css -%}
"""
#: Where ``to_html`` puts the one inlined copy of plotly.js.
PLOTLY_MARKER = "<!-- workbench:plotly.js -->"
PLOTLY_BUNDLE = Path(__file__).resolve().parent / "vendor" / "plotly-basic.min.js"

_CSS = """<style>
.wb-report {font-family: system-ui, sans-serif; max-width: 1100px; font-size: 14px; line-height: 1.4}
.wb-report h1 {font-size: 24px; margin: 8px 0 2px} .wb-report h2 {font-size: 19px; margin: 10px 0 6px}
.wb-report h3 {font-size: 15px; margin: 12px 0 4px}
.wb-report table {border-collapse: collapse; font-size: 13px; margin: 6px 0 10px; max-width: 100%}
.wb-report .scroll {overflow-x: auto; max-width: 100%}
.wb-report th, .wb-report td {border: 1px solid #ccc; padding: 3px 6px; text-align: left !important;
  vertical-align: top; max-width: 24em; overflow-wrap: anywhere}
.wb-report td.num {white-space: nowrap}
.wb-report th {background: #f3f3f3}
.wb-report .note {color: #555}
.wb-report .slower {color: #a33}
.wb-decision {border: 2px solid #2a6; border-radius: 6px; padding: 4px 14px 8px; background: #f6fcf8}
.wb-decision table {width: 100%}
.wb-glossary {border: 1px solid #ccd; border-radius: 6px; padding: 8px 14px; margin: 10px 0; background: #f8f8fc;
  font-size: 13px; color: #333}
.wb-section {border-top: 1px solid #ddd; padding: 4px 0}
.wb-section > summary {cursor: pointer; font-size: 16px; font-weight: 600; padding: 6px 0}
.wb-report pre {white-space: pre-wrap; font-size: 12px}
</style>
<script>document.addEventListener("toggle", function () { window.dispatchEvent(new Event("resize")); }, true);</script>"""


def _names(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """A comma-separated string or a list -> a tuple of non-empty names."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(item).strip() for item in items if str(item).strip())


@dataclass(frozen=True)
class ReportParams:
    """What one report covers; validated on creation (the error names the bad value and the fix).

    Example:
        >>> ReportParams(since="7d", techniques="speculative,quantization").techniques
        ('speculative', 'quantization')
        >>> ReportParams(since="yesterday")
        Traceback (most recent call last):
        ...
        workbench.store.StoreError: cannot read the time 'yesterday': use a duration back from now such as 7d, 12h, 30m or 2w, or an ISO date such as 2024-05-01
    """

    store_url: str | None = None  # SQLAlchemy URL; None: the default SQLite store under data/
    since: str = "7d"  # the window: a duration back from now (7d, 12h) or an ISO date
    models: tuple[str, ...] = ()  # only these models (empty: all)
    machines: tuple[str, ...] = ()  # only these machine ids (empty: all)
    techniques: tuple[str, ...] = ()  # only these techniques (empty: all)
    budget: str = "perplexity<=2%,accuracy<=1,ssim>=0.9"  # quality budget: lossless, any, or perplexity<=X%, accuracy<=X (points), ssim>=X
    title: str = "Inference acceleration report"  # the heading of the page
    audience: str = "manager"  # manager (summary first, fewer tables) or engineer (every run listed)
    learner: str = "boosting"  # the meta-learner the report trains and evaluates: boosting or tree

    def __post_init__(self) -> None:
        from workbench.meta.learner import Budget
        from workbench.store import parse_since

        for name in ("models", "machines", "techniques"):
            object.__setattr__(self, name, _names(getattr(self, name)))
        object.__setattr__(self, "store_url", self.store_url or None)
        parse_since(self.since)  # raises StoreError naming the bad value
        Budget.parse(self.budget)
        if self.audience not in AUDIENCES:
            raise WorkbenchError(f"audience {self.audience!r} is unknown: use one of {', '.join(AUDIENCES)}")
        if self.learner not in ("boosting", "tree"):
            raise WorkbenchError(f"learner {self.learner!r} is unknown: use boosting or tree, e.g. -p learner=tree")
        if not str(self.title).strip():
            raise WorkbenchError("title is empty: pass a title such as --param title='Weekly report'")

    @classmethod
    def from_pairs(cls, pairs: Sequence[str] = (), **given: Any) -> ReportParams:
        """Build from ``key=value`` strings (the CLI's ``--param``) on top of keyword values.

        Example:
            >>> ReportParams.from_pairs(["budget=lossless", "models=zoo:a,zoo:b"]).models
            ('zoo:a', 'zoo:b')
        """
        values = {k: v for k, v in given.items() if v is not None}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in PARAM_KEYS:
                raise WorkbenchError(f"--param {pair!r} is not key=value with a known key: use one of "
                                     f"{', '.join(PARAM_KEYS)}, e.g. --param budget=lossless")
            values[key] = value.strip()
        return cls(**values)

    def notebook_parameters(self) -> dict[str, Any]:
        """The values papermill injects (lists as comma-separated strings, the notebook's types)."""
        values = asdict(self)
        for name in ("models", "machines", "techniques"):
            values[name] = ",".join(values[name])
        values["store_url"] = values["store_url"] or ""
        return values


def check_store(url: str | None) -> str:
    """Open the store once (fast) and return its display URL; a missing SQLite file is an error here,
    because a report must never create an empty store by accident.

    Example:
        >>> check_store("sqlite:////nonexistent/x.sqlite")
        Traceback (most recent call last):
        ...
        workbench.errors.WorkbenchError: store file /nonexistent/x.sqlite does not exist: pass --store with an existing store URL (e.g. sqlite:///data/store.sqlite) or run `workbench run ...` first
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from workbench import paths
    from workbench.store import Store

    text = url or paths.default_store_url()
    try:
        parsed = make_url(text)
    except ArgumentError:
        raise WorkbenchError(f"store URL {text!r} cannot be read: use a SQLAlchemy URL such as "
                             "sqlite:///data/store.sqlite or postgresql://user@host/db") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:" \
            and not parsed.database.startswith("file:") and not Path(parsed.database).exists():
        raise WorkbenchError(f"store file {parsed.database} does not exist: pass --store with an existing store "
                             "URL (e.g. sqlite:///data/store.sqlite) or run `workbench run ...` first")
    store = Store(text, create=False)  # a reader: refuses a missing store, reads one on read-only media
    store.close()
    return store.url


_FILTER_COLUMNS = {"models": "model", "machines": "machine_id", "techniques": "technique"}


def check_filters(params: ReportParams) -> None:
    """Every filter value must match some stored run (any time): a typo is one line naming the filter and
    the nearest stored value, never an empty report that exits 0.

    Example:
        >>> check_filters(ReportParams(store_url="sqlite:///:memory:", models="zoo:code-wdie"))
        Traceback (most recent call last):
        ...
        workbench.errors.WorkbenchError: filter models=zoo:code-wdie matches no stored run: the store holds no runs yet
    """
    import difflib

    from workbench.store import Store

    wanted = {name: getattr(params, name) for name in _FILTER_COLUMNS if getattr(params, name)}
    if not wanted:
        return
    store = Store(params.store_url, create=params.store_url is None)
    try:
        for name, values in wanted.items():
            column = _FILTER_COLUMNS[name]
            stored = sorted({str(v) for v in store.runs(columns=[column])[column].dropna()})
            for value in values:
                if value in stored:
                    continue
                if not stored:
                    raise WorkbenchError(f"filter {name}={value} matches no stored run: the store holds no runs yet")
                near = difflib.get_close_matches(value, stored, n=1, cutoff=0.5)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                shown = ", ".join(stored[:8]) + (", ..." if len(stored) > 8 else "")
                raise WorkbenchError(f"filter {name}={value} matches no stored run{hint}: stored {name} are {shown}")
    finally:
        store.close()
