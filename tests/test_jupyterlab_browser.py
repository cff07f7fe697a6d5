"""A real browser: JupyterLab on loopback, headless chromium opens 01_compare.ipynb, runs all cells,
clicks the panel's Run button and sees the results table (screenshot under test-artifacts/).

Skipped when chromium or playwright is missing. Run it alone: ``pytest -m browser tests/test_jupyterlab_browser.py``.
"""

from __future__ import annotations

import json
import os
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
    (folder / "01_compare.ipynb").write_text(json.dumps(nb))


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
                run = page.locator(".widget-button", has_text="Run").first
                run.wait_for(timeout=90_000)
                run.click()
                table = page.locator("table.workbench-run-table")
                table.wait_for(timeout=180_000)
                text = table.inner_text()
                page.screenshot(path=str(artifacts / "jupyterlab_compare.png"), full_page=True)
            except Exception:
                page.screenshot(path=str(artifacts / "jupyterlab_compare_failure.png"), full_page=True)
                raise
            finally:
                browser.close()
        assert "baseline" in text and "quantization" in text and "latency_median_ms" in text
    finally:
        lab.terminate()
        try:
            lab.wait(20)
        except subprocess.TimeoutExpired:
            lab.kill()
        log.close()
