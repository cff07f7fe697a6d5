"""The ``workbench`` command line.

Exit codes: 0 success; 1 a run was measured but failed (stored with its reason); 2 bad input (one
line on stderr naming the bad value and the fix, before any long work).

Example:
    $ workbench zoo build --quick
    $ workbench run --model zoo:code-target --technique speculative --draft zoo:code-draft \\
        --workload code-prompts --repeats 3
    $ workbench runs --since 7d --format csv
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer

from workbench.errors import WorkbenchError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Measure inference-acceleration techniques against their baseline, quality beside speed.")
zoo_app = typer.Typer(no_args_is_help=True, help="The offline tiny model zoo, trained on this machine.")
app.add_typer(zoo_app, name="zoo")


def _dump(value: Any) -> str:
    """Strict JSON: NaN and infinity become null (the store's own conversion)."""
    from workbench.store import json_safe

    return json.dumps(json_safe(value), indent=2, default=str, allow_nan=False)


def _open_store(url: Optional[str]) -> Any:
    from workbench.store import Store

    return Store(url)


@app.command()
def env(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    no_bandwidth: bool = typer.Option(False, "--no-bandwidth", help="Skip the memory-bandwidth probe."),
) -> None:
    """The hardware and software fingerprint stored with every run."""
    from workbench.environment import fingerprint

    info = fingerprint(measure_bandwidth=not no_bandwidth)
    if as_json:
        typer.echo(_dump(info))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key.endswith("bytes_per_s") and value:
            value = f"{value / 1e9:.1f} GB/s"
        elif key.endswith("_bytes") and value:
            value = f"{value / 2**30:.1f} GiB"
        typer.echo(f"{key:<{width}}  {value}")


@app.command()
def techniques() -> None:
    """The registered techniques, the model kinds they apply to, and their parameters."""
    from workbench import techniques as registry

    for name in registry.names():
        cls = registry.get(name)
        typer.echo(f"{name}: {cls.description} [applies to: {', '.join(cls.applies_to)}]")
        for key, param in cls.params.items():
            typer.echo(f"    --param {key}=<{param.type.__name__}> (default {param.default}): {param.help}")


@zoo_app.command("build")
def zoo_build(
    quick: bool = typer.Option(False, "--quick", help="Tiny configs and few steps (under a minute): for tests."),
    force: bool = typer.Option(False, "--force", help="Retrain models that are already built."),
) -> None:
    """Train the offline zoo on this machine (about 5-8 minutes on 2 cores; --quick under one)."""
    from workbench.models import zoo

    for record in zoo.build(quick=quick, force=force):
        typer.echo(_zoo_line(record))


@zoo_app.command("list")
def zoo_list() -> None:
    """The zoo models built here, with how each was trained."""
    from workbench.models import zoo

    records = zoo.list_models()
    if not records:
        typer.echo("no zoo model is built yet: run `workbench zoo build` (or `--quick`)")
    for record in records:
        typer.echo(_zoo_line(record))


def _zoo_line(record: Any) -> str:
    loss = "n/a" if record.final_loss is None else f"{record.final_loss:.3f}"
    return (f"zoo:{record.name:<17} {record.kind:<10} {record.parameter_count:>11,} params  "
            f"{'quick' if record.quick else 'full '}  {record.steps:>5} steps  final loss {loss}  "
            f"{record.train_seconds:5.0f} s  {record.description}")


@app.command("run")
def run_command(
    model: str = typer.Option(..., "--model", "-m", help="Hugging Face id, local folder, or zoo:NAME."),
    technique: str = typer.Option(..., "--technique", "-t", help="A registered technique (see `workbench techniques`)."),
    workload: str = typer.Option(..., "--workload", "-w", help="Built-in workload name or a .jsonl file."),
    draft: Optional[str] = typer.Option(None, "--draft", help="Draft model for speculative decoding."),
    param: list[str] = typer.Option([], "--param", "-p", help="Technique parameter key=value (repeatable)."),
    repeats: int = typer.Option(5, "--repeats", help="Timed passes over the workload."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed passes first."),
    max_items: int = typer.Option(8, "--max-items", help="Inputs taken from the workload."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens generated per prompt."),
    batch_size: int = typer.Option(1, "--batch-size", help="Inputs per call."),
    steps: int = typer.Option(50, "--steps", help="Diffusion steps, for diffusion models."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
    seed: int = typer.Option(0, "--seed", help="Seed for input selection and sampling."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    store: Optional[str] = typer.Option(None, "--store", help="SQLAlchemy URL (default: SQLite under data/)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run the baseline and a technique side by side, print the comparison, store the run."""
    from workbench import runner
    from workbench.display import run_text
    from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec, parse_param

    # 1. Everything checked before anything heavy: specs, store, plan.
    spec = RunSpec(
        model=ModelSpec(model),
        workload=WorkloadSpec(workload, max_items=max_items, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, num_inference_steps=steps, seed=seed),
        technique=TechniqueSpec(technique, dict(parse_param(p) for p in param),
                                ModelSpec(draft) if draft else None),
        device=device, dtype=dtype, seed=seed, repeats=repeats, warmup=warmup, threads=threads,
    )
    results_store = _open_store(store)
    planned = runner.plan(spec)
    # 2. Measure, store, show.
    result = runner.execute(planned, progress=not quiet and not as_json)
    results_store.append(result.to_row())
    typer.echo(_dump(result.to_json()) if as_json else run_text(result))
    if result.status != "ok":
        raise typer.Exit(1)


@app.command()
def runs(
    store: Optional[str] = typer.Option(None, "--store", help="SQLAlchemy URL (default: SQLite under data/)."),
    since: Optional[str] = typer.Option(None, "--since", help="Only runs newer than this: 7d, 12h, 30m or a date."),
    model: Optional[str] = typer.Option(None, "--model", help="Only this model."),
    technique: Optional[str] = typer.Option(None, "--technique", help="Only this technique."),
    fmt: str = typer.Option("table", "--format", help="table, csv or json."),
) -> None:
    """Stored runs, newest last."""
    import pandas as pd

    if fmt not in ("table", "csv", "json"):
        raise WorkbenchError(f"--format {fmt!r} is unknown: use table, csv or json")
    frame = _open_store(store).runs(since=since, model=model, technique=technique)
    view = _runs_view(frame)
    if fmt == "json":
        typer.echo(_dump(view.to_dict(orient="records")))
    elif fmt == "csv":
        typer.echo(view.to_csv(index=False), nl=False)
    elif view.empty:
        typer.echo("no runs stored" + (f" since {since}" if since else "") + ": try `workbench run ...` first")
    else:
        with pd.option_context("display.width", 220, "display.max_columns", 20, "display.max_colwidth", 60):
            typer.echo(view.to_string(index=False))


def _runs_view(frame: Any) -> Any:
    import pandas as pd

    from workbench.display import quality_text

    columns = ["created_at", "run_id", "status", "model", "technique", "draft", "workload", "device",
               "speedup", "speedup_ci_low", "speedup_ci_high", "quality", "failure_reason"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    view = frame.copy()
    view["run_id"] = view["run_id"].str[:12]
    view["created_at"] = view["created_at"].dt.strftime("%Y-%m-%d %H:%M:%S")
    view["quality"] = [quality_text(q) if q else "" for q in view["quality"]]
    for col in ("speedup", "speedup_ci_low", "speedup_ci_high"):
        view[col] = view[col].round(3)
    return view[columns]


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, deprecation notes) would bury the table."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        _quiet_libraries()
        app()
    except WorkbenchError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: runs finished before the interrupt are stored", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
