"""Rendering: papermill executes the report notebook on a fresh kernel, nbconvert turns it into one
self-contained HTML file (no code, plotly.js inlined once), and the files are swapped into place atomically."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.report.params import (_OFFLINE_TEMPLATE, KERNEL_NAME, PLOTLY_BUNDLE, PLOTLY_MARKER, REPORT_NOTEBOOK,
                                     ReportParams, check_filters, check_store)


def render_report(params: ReportParams, out: str | Path, cell_timeout_s: float = 300.0,
                  total_timeout_s: float = 900.0, notebook: str | Path = REPORT_NOTEBOOK) -> dict[str, Any]:
    """Execute the report notebook, convert it, and put ``out`` (HTML) and ``out``.ipynb in place.

    Both files are written to a temporary folder beside ``out`` and renamed into place only when
    everything succeeded, so a failure never replaces an earlier good report.

    Returns:
        ``{"html": Path, "notebook": Path, "html_bytes": int, "seconds": float}``

    Example:
        >>> render_report(ReportParams(), "reports/weekly.html")  # doctest: +SKIP
    """
    import time

    # 1. Validate before any long work.
    started = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() != ".html":
        raise WorkbenchError(f"--out {str(out)!r} must end in .html, e.g. reports/weekly.html")
    if not Path(notebook).exists():
        raise WorkbenchError(f"report notebook {notebook} is missing: reinstall workbench from its repository")
    check_store(params.store_url)
    check_filters(params)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.stem}-", dir=out.parent))
    try:
        # 2. Execute in a child process with a private kernelspec (this interpreter); kill it on timeout.
        executed = work / f"{out.stem}.ipynb"
        kernels = work / "jupyter" / "kernels" / KERNEL_NAME
        kernels.mkdir(parents=True)
        (kernels / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "workbench report", "language": "python"}))
        job = {"notebook": str(notebook), "executed": str(executed), "parameters": params.notebook_parameters(),
               "cell_timeout_s": cell_timeout_s, "cwd": str(Path.cwd())}
        env = dict(os.environ, JUPYTER_PATH=str(work / "jupyter"), PYTHONWARNINGS="ignore")
        _run_child([sys.executable, "-m", "workbench.report", json.dumps(job)], env, total_timeout_s)
        # 3. Convert, then rename both files into place (the HTML last: it is what readers open).
        page = to_html(executed, title=params.title)
        tmp_html = work / f"{out.stem}.html"
        tmp_html.write_text(page, encoding="utf-8")
        os.replace(executed, out.with_suffix(".ipynb"))
        os.replace(tmp_html, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"html": out, "notebook": out.with_suffix(".ipynb"), "html_bytes": out.stat().st_size,
            "seconds": time.perf_counter() - started}


def _run_child(command: list[str], env: dict[str, str], timeout_s: float) -> None:
    """Run the executing child in its own process group; its stderr's last line becomes the error."""
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        _, err = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child and its kernel
        child.communicate()
        raise WorkbenchError(f"the report took longer than {timeout_s:.0f}s and was stopped: raise --timeout "
                             "or narrow --since / the filters") from None
    except BaseException:  # Ctrl-C or SIGTERM here: the child runs in its own session, so stop it too
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise
    if child.returncode != 0:
        lines = [line for line in (err or "").strip().splitlines() if line.strip()]
        raise WorkbenchError(lines[-1].removeprefix("error: ") if lines else
                             f"executing the report notebook failed (exit {child.returncode})")


def to_html(executed: str | Path, title: str) -> str:
    """nbconvert an executed notebook: no input cells, no prompts, no stderr, nothing from the network, and
    plotly.js's partial bundle inlined once (the executed notebook's figures do not carry it)."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(executed), as_version=4)
    for cell in nb.cells:
        if cell.get("cell_type") == "code":
            cell.outputs = [o for o in cell.outputs
                            if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
    nb.metadata["title"] = title
    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True, extra_loaders=[jinja2.DictLoader({"wb.j2": _OFFLINE_TEMPLATE})],
                            template_file="wb.j2")
    body, _ = exporter.from_notebook_node(nb)
    # plotly.js once, in the head, before any figure's script (figures are written without it).
    script = "<script>" + PLOTLY_BUNDLE.read_text(encoding="utf-8").replace("</script", "<\\/script") + "</script>"
    return body.replace(PLOTLY_MARKER, script if "Plotly.newPlot" in body else "", 1)


def _execute(job: dict[str, Any]) -> int:
    """Child side of :func:`render_report`: papermill on a fresh kernel; one line on stderr on failure."""
    import logging

    import papermill

    logging.getLogger("papermill").setLevel(logging.ERROR)
    try:
        papermill.execute_notebook(job["notebook"], job["executed"], parameters=job["parameters"],
                                   kernel_name=KERNEL_NAME, execution_timeout=job["cell_timeout_s"],
                                   progress_bar=False, log_output=False, cwd=job["cwd"])
    except papermill.PapermillExecutionError as err:
        value = str(err.evalue).strip().splitlines()[0] if str(err.evalue).strip() else ""
        print(f"error: report cell {err.exec_count} failed: {err.ename}: {value}", file=sys.stderr)
        return 1
    except Exception as err:  # a kernel that dies, a cell timeout: still one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"error: executing the report failed: {type(err).__name__}: {first}", file=sys.stderr)
        return 1
    return 0
