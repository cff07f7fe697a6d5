"""The scheduled report: data from a store of real quick-zoo runs, the CLI (papermill + nbconvert), the
rendered page in headless Chromium with the network off, escaping, failures and concurrency.

Fast iteration: WORKBENCH_TEST_DATA=/tmp/wbq .venv/bin/python -m pytest tests/test_report.py -x
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workbench import report
from workbench.errors import WorkbenchError

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"  # gitignored: screenshots of rendered reports
SCRIPT_MODEL = "<script>alert(1)</script>"  # a stored model name that must show as text, never run
CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--host-resolver-rules=MAP * ~NOTFOUND"]


def _spec(technique: str, params: dict | None = None):
    from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec

    return RunSpec(ModelSpec("zoo:code-classifier"), WorkloadSpec("code-snippets", max_items=8),
                   TechniqueSpec(technique, params or {}), repeats=2, warmup=0)


@pytest.fixture(scope="module")
def report_store(quick_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store of real runs: two techniques, a run that could not run here (failed or skipped, with its
    reason), and one real run whose model field was renamed to a script tag (tests escaping)."""
    from workbench import runner
    from workbench.store import Store
    from workbench.sweep import run_sweep

    url = f"sqlite:///{tmp_path_factory.mktemp('report') / 'runs.sqlite'}"
    store = Store(url)
    for spec in (_spec("quantization", {"scheme": "int8-dynamic"}), _spec("early_exit"),
                 _spec("quantization", {"scheme": "int8-dynamic"})):
        assert runner.run(spec, store=store, progress=False).status == "ok"
    # A real run that cannot run here (bitsandbytes int8 needs a GPU): the sweep stores it skipped, with why.
    skipped = run_sweep([_spec("quantization", {"scheme": "bnb-int8"})], store, progress=False)
    assert skipped.skipped == 1
    # Escaping: a real run, only the model field changed before it is stored.
    row = runner.run(_spec("quantization", {"scheme": "int8-dynamic"}), progress=False).to_row()
    row["model"], row["model_digest"] = SCRIPT_MODEL, None  # another model, by name and by identity
    store.append(row)
    store.close()
    return url


@pytest.fixture(scope="module")
def two_reports(report_store: str, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two reports rendered at the same time against the same store, by two `workbench report` processes."""
    folder = tmp_path_factory.mktemp("reports")
    outs = [folder / "a.html", folder / "b.html"]
    procs = [subprocess.Popen([*_cli(), "report", "--store", report_store, "--since", "1d", "--out", str(out),
                               "-p", "audience=engineer", "--timeout", "300"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for out in outs]
    results = [proc.communicate(timeout=400) + (proc.returncode,) for proc in procs]
    for stdout, stderr, code in results:
        assert code == 0, stderr
        assert "wrote" in stdout
    return outs


def _offline_page(browser, viewport: dict, blocked: list[str]):
    """A page with the network off: anything but a file:// URL is aborted and its URL kept in ``blocked``."""
    context = browser.new_context(viewport=viewport)

    def only_files(route):
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", only_files)
    return context.new_page()


def _cli() -> list[str]:
    return [sys.executable, "-m", "workbench.cli"]


# -- data -----------------------------------------------------------------------------------------


def test_report_data_from_real_runs(report_store: str) -> None:
    data = report.build_report(report.ReportParams(store_url=report_store, since="1d"))
    results = data["results"]
    assert {"quantization[scheme=int8-dynamic]", "early_exit"} <= set(results["configuration"])
    assert results[["speedup", "speedup_ci_low", "speedup_ci_high", "quality_loss"]].notna().all().all()
    assert SCRIPT_MODEL in set(results["model"])
    assert len(data["failed"]) == 1 and data["failed"]["failure_reason"].iloc[0]
    summary = " ".join(data["summary"])
    assert "use " in summary or "keep the baseline" in summary
    # escaping: the script tag appears only as text in every section
    page = "".join([report.summary_html(data), report.evidence_html(data), report.recommendations_html(data)])
    assert SCRIPT_MODEL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_params_are_checked_before_any_work() -> None:
    with pytest.raises(WorkbenchError, match="audience 'board'"):
        report.ReportParams(audience="board")
    with pytest.raises(WorkbenchError, match="--param 'x'"):
        report.ReportParams.from_pairs(["x"])
    with pytest.raises(WorkbenchError, match="does not exist"):
        report.check_store("sqlite:////nonexistent/folder/runs.sqlite")


def test_empty_window_says_so(tmp_path: Path) -> None:
    from workbench.store import Store

    url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    Store(url).close()
    data = report.build_report(report.ReportParams(store_url=url, since="1d"))
    assert data["summary"][0].startswith("No runs in this window")
    assert "The meta-learner is left out" in data["learner_note"] and not data["learner"]["evaluated"]
    result = report.render_report(report.ReportParams(store_url=url, since="1d"), tmp_path / "empty.html")
    page = result["html"].read_text(encoding="utf-8")
    assert "No runs in this window" in page and "Traceback" not in page
    assert result["notebook"].exists()


# -- the CLI ------------------------------------------------------------------------------------


def test_two_reports_at_once_both_succeed(two_reports: list[Path]) -> None:
    for out in two_reports:
        assert out.stat().st_size > 1_000_000  # plotly.js is inlined
        assert out.with_suffix(".ipynb").exists()  # the executed notebook, for audit
        assert not list(out.parent.glob(".*"))  # no temporary folder left behind


@pytest.mark.parametrize("args, why", [
    (["--store", "sqlite:////nonexistent/folder/runs.sqlite"], "does not exist"),
    (["--since", "yesterday"], "cannot read the time 'yesterday'"),
    (["-p", "budget=fast"], "budget 'fast'"),
    (["-p", "models=zoo:code-clasifier"],
     "filter models=zoo:code-clasifier matches no stored run (did you mean 'zoo:code-classifier'?)"),
    (["-p", "techniques=speculative"], "filter techniques=speculative matches no stored run"),
])
def test_a_failing_report_leaves_the_earlier_html(args: list[str], why: str, report_store: str, tmp_path: Path,
                                                  cli_env: dict) -> None:
    out = tmp_path / "weekly.html"
    out.write_text("<p>last week's good report</p>")
    done = subprocess.run([*_cli(), "report", "--store", report_store, *args, "--out", str(out)],
                          capture_output=True, text=True, env=cli_env, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0], done.stderr
    assert out.read_text() == "<p>last week's good report</p>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weekly.html"]


def test_a_failing_cell_leaves_the_earlier_html(report_store: str, tmp_path: Path) -> None:
    import nbformat

    broken = tmp_path / "broken.ipynb"
    nb = nbformat.read(str(report.REPORT_NOTEBOOK), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("raise ValueError('the chart data is broken')"))
    nbformat.write(nb, str(broken))
    out = tmp_path / "weekly.html"
    out.write_text("good")
    with pytest.raises(WorkbenchError, match="ValueError: the chart data is broken"):
        report.render_report(report.ReportParams(store_url=report_store, since="1d"), out, notebook=broken)
    assert out.read_text() == "good" and not out.with_suffix(".ipynb").exists()


# -- the page in a browser, offline ---------------------------------------------------------------


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium, or `make services`)")
def test_rendered_report_in_offline_chromium(two_reports: list[Path]) -> None:
    from playwright.sync_api import sync_playwright

    page_file = two_reports[0]
    blocked: list[str] = []
    dialogs: list[str] = []
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = _offline_page(browser, {"width": 1280, "height": 900}, blocked)
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.goto(page_file.as_uri(), wait_until="load", timeout=60_000)
            page.wait_for_selector(".main-svg", timeout=30_000)
            page.evaluate("() => document.querySelectorAll('details').forEach(d => d.open = true)")
            text = page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
            svg_count = page.locator(".main-svg").count()
        finally:
            browser.close()
    assert svg_count >= 2  # the trade-off chart at least (each plotly figure draws two .main-svg layers)
    assert "Decision" in text and "What the terms mean" in text
    assert "Failed and skipped runs (1)" in text
    assert "int8 dynamic quantization" in text or "early exit" in text  # configurations by their human names
    assert SCRIPT_MODEL in text  # shown as text ...
    assert dialogs == []  # ... and never run
    for code_sign in ("Traceback", "report.build_report", "import ", "display(HTML"):
        assert code_sign not in text
    assert blocked == []  # nothing was requested from the network


# -- the shipped seed's report, as a manager reads it at 1400 px ------------------------------------

SCREEN_PX = 900  # one screen at 1400 x 900


@pytest.fixture(scope="module")
def seed_report(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """The report of the shipped seed (data/seed/runs.parquet, 200 runs) through the CLI, as a scheduled job
    renders it; the glass-box learner keeps the held-out evaluation to seconds (boosting: ~90 s more)."""
    folder = tmp_path_factory.mktemp("seed-report")
    url = f"sqlite:///{folder / 'seed.sqlite'}"
    env = {**__import__("os").environ, "WORKBENCH_DATA": str(data_dir)}
    subprocess.run([*_cli(), "import", str(ROOT / "data" / "seed" / "runs.parquet"), "--store", url],
                   check=True, capture_output=True, env=env, timeout=300)
    out = folder / "seed.html"
    done = subprocess.run([*_cli(), "report", "--store", url, "--since", "2026-11-01", "--out", str(out),
                           "-p", "learner=tree"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


def test_seed_report_is_small_and_its_notebook_carries_no_plotly(seed_report: Path) -> None:
    assert seed_report.stat().st_size <= 1_500_000, seed_report.stat().st_size
    notebook = seed_report.with_suffix(".ipynb").read_text(encoding="utf-8")
    assert "plotly.js v" not in notebook and len(notebook) < 500_000  # figures as data, no bundle inside
    page = seed_report.read_text(encoding="utf-8")
    assert page.count("plotly.js (basic - minified)") == 1  # the partial bundle, inlined once


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium, or `make services`)")
def test_seed_report_decides_on_one_screen_at_1400px(seed_report: Path) -> None:
    from playwright.sync_api import sync_playwright

    blocked: list[str] = []
    errors: list[str] = []
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = _offline_page(browser, {"width": 1400, "height": SCREEN_PX}, blocked)
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(seed_report.as_uri(), wait_until="load", timeout=60_000)
            page.wait_for_selector(".main-svg", timeout=30_000)
            # 1. As it opens: the decision within the first 1,000 px, the whole page (sections shut) <= 4 screens.
            closed = page.evaluate("""() => ({
                decision_bottom: document.querySelector('.wb-decision').getBoundingClientRect().bottom + scrollY,
                actions: document.querySelectorAll('.wb-actions tbody tr').length,
                height: document.documentElement.scrollHeight, sections: document.querySelectorAll('details').length})""")
            page.screenshot(path=str(ARTIFACTS / "seed_report_collapsed.png"), full_page=True)
            # 2. Every section open: no table wider than the page; every figure drawn, axes titled with units.
            page.evaluate("() => document.querySelectorAll('details').forEach(d => d.open = true)")
            page.wait_for_timeout(500)
            opened = page.evaluate("""() => ({
                page_width: document.documentElement.clientWidth,
                widest_table: Math.max(...[...document.querySelectorAll('table')].map(t => t.getBoundingClientRect().right)),
                figures: [...document.querySelectorAll('.js-plotly-plot')].map(el => ({
                    drawn: el.querySelectorAll('.main-svg').length,
                    axes: Object.entries(el.layout).filter(([k]) => /^[xy]axis[0-9]*$/.test(k))
                                 .map(([k, a]) => [k, (a.title && a.title.text) || '',
                                                   !!a.matches || el._fullLayout[k].type === 'category'])}))})""")
            page.screenshot(path=str(ARTIFACTS / "seed_report_open.png"), full_page=True)
        finally:
            browser.close()
    assert closed["decision_bottom"] <= 1000, closed
    assert closed["actions"] >= 1  # the seed has techniques that win: the decision names them
    assert closed["sections"] >= 4 and closed["height"] <= 4 * SCREEN_PX, closed
    assert opened["widest_table"] <= opened["page_width"], opened
    assert len(opened["figures"]) >= 3  # trade-off, importance, partial dependence
    import re

    for figure in opened["figures"]:
        assert figure["drawn"] >= 2, figure
        titled = [title for _, title, shared in figure["axes"] if not shared]
        assert titled and all(re.search(r"\(.+\)", title) for title in titled), figure["axes"]
    assert blocked == [] and errors == []  # offline: nothing requested from the network, no script error
