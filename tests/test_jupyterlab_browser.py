"""A real browser: JupyterLab on loopback, headless chromium opens 01_compare.ipynb (plus an advisor cell),
runs all cells, clicks the panel's Run button and sees the results table fit the panel and the progress
count the worker's calls; a bad model name shows its error right under Run and clears that table; the
advisor with a bad budget shows its error beside Train and stays usable (screenshots under test-artifacts/).

Skipped when chromium or playwright is missing. Run it alone: ``pytest -m browser tests/test_jupyterlab_browser.py``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: the browser test needs one")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _notebook_copy(folder: Path, store: str) -> None:
    """01_compare.ipynb with its parameters set for the quick zoo and a tiny run."""
    nb = json.loads((ROOT / "notebooks" / "01_compare.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    cell["source"] = (f"store = {store!r}\nmodel = 'zoo:code-target'\nworkload = 'code-prompts'\n"
                      "technique = 'quantization'\nmax_items = 2\nmax_new_tokens = 4\nrepeats = 1\n"
                      "run_now = False\ntimeout_s = 300\n")
    nb["cells"].append({"cell_type": "code", "execution_count": None, "id": "advisor-bad-budget", "metadata": {},
                        "outputs": [], "source": "widgets.advisor(store=store, budget='perplexity<=banana')"})
    (folder / "01_compare.ipynb").write_text(json.dumps(nb))


def _gap_px(above, below) -> float:
    """Vertical distance between two elements' bounding boxes (0 when they overlap)."""
    a, b = above.bounding_box(), below.bounding_box()
    return max(0.0, b["y"] - (a["y"] + a["height"]), a["y"] - (b["y"] + b["height"]))


def test_compare_notebook_in_jupyterlab(quick_zoo: Path, data_dir: Path, tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    # 1. A copy of the notebook and a private store, served by JupyterLab on loopback.
    root = tmp_path / "lab"
    root.mkdir()
    _notebook_copy(root, f"sqlite:///{tmp_path / 'browser.sqlite'}")
    token, port = secrets.token_hex(16), _free_port()
    env = {**os.environ, "WORKBENCH_DATA": str(data_dir), "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrun")}
    log = open(tmp_path / "lab.log", "w")
    lab = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                            f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}",
                            *(["--allow-root"] if os.geteuid() == 0 else [])],
                           env=env, stdout=log, stderr=subprocess.STDOUT)
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and lab.poll() is None, (tmp_path / "lab.log").read_text()[-2000:]
                time.sleep(0.5)
        # 2. The browser: open the notebook, run all cells, click the panel's Run, see the table.
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            try:
                page.goto(f"{base}/lab/tree/01_compare.ipynb?token={token}", timeout=120_000)
                page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
                select = page.locator(".jp-Dialog button", has_text="Select")  # the kernel dialog, when shown
                try:
                    select.wait_for(timeout=20_000)
                    select.click()
                except playwright.TimeoutError:
                    pass
                page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
                page.get_by_text("Run", exact=True).first.click()
                page.get_by_text("Run All Cells", exact=True).click()
                compare = page.locator(".jp-CodeCell", has_text="workbench: compare a technique")
                run = compare.locator(".widget-button", has_text="Run").first
                run.wait_for(timeout=90_000)
                # 3. Run: the status counts the worker's calls live, ending at "N/N calls"; the table fits.
                run.click()
                table = compare.locator("table.workbench-run-table")
                status = compare.locator(".workbench-status")
                seen = []
                deadline = time.monotonic() + 180
                while not table.count() and time.monotonic() < deadline:
                    seen.append(status.inner_text())
                    time.sleep(0.1)
                text, width_px, final = table.inner_text(), table.bounding_box()["width"], status.inner_text()
                page.screenshot(path=str(artifacts / "jupyterlab_compare.png"), full_page=True)
                # 4. A bad model name: its one line right under Run, and the old table gone.
                compare.locator("input[list]").first.fill("zoo:nope")  # the model combobox
                run.click()
                error = compare.locator(".workbench-error")
                error.wait_for(timeout=60_000)
                error_text, error_gap_px = error.inner_text(), _gap_px(run, error)
                tables_left = table.count()
                page.screenshot(path=str(artifacts / "jupyterlab_compare_error.png"), full_page=True)
                # 5. The advisor's bad budget: its line beside Train, then a good budget trains (and, with one
                #    stored run, fails with its reason instead of staying on "training...").
                advisor = page.locator(".jp-CodeCell", has_text="workbench: meta-learner advisor")
                train = advisor.locator(".widget-button", has_text="Train")
                advisor_error = advisor.locator(".workbench-error")
                advisor_error.scroll_into_view_if_needed()
                budget_error, budget_gap_px = advisor_error.inner_text(), _gap_px(train, advisor_error)
                train_enabled = train.is_enabled()
                advisor.locator(".widget-text input").first.fill("lossless")
                train.click()
                advisor.locator(".workbench-error", has_text="no stored runs").wait_for(timeout=120_000)
                advisor_status, train_enabled_again = advisor.locator(".workbench-status").inner_text(), train.is_enabled()
                page.screenshot(path=str(artifacts / "jupyterlab_advisor.png"), full_page=True)
            except Exception:
                page.screenshot(path=str(artifacts / "jupyterlab_compare_failure.png"), full_page=True)
                raise
            finally:
                browser.close()
        assert "baseline" in text and "int8 dynamic quantization" in text and "latency median (ms)" in text
        assert width_px <= 900, f"the results table is {width_px:.0f} px wide"
        assert re.search(r"\b(\d+)/\1 calls\b", final), final
        assert any(s.startswith(("checking", "starting", "loading", "measuring")) for s in seen), seen
        assert "unknown zoo model 'nope'" in error_text and error_gap_px <= 200, (error_text, error_gap_px)
        assert tables_left == 0
        assert "banana" in budget_error and budget_gap_px <= 200 and train_enabled, (budget_error, budget_gap_px)
        assert "training failed" in advisor_status and train_enabled_again, advisor_status
    finally:
        lab.terminate()
        try:
            lab.wait(20)
        except subprocess.TimeoutExpired:
            lab.kill()
        log.close()
