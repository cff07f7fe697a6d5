"""The ``workbench`` command line.

Exit codes: 0 success; 1 a run was measured but failed (stored with its reason); 2 bad input (one
line on stderr naming the bad value and the fix, before any long work).

Example:
    $ workbench zoo build --quick
    $ workbench run --model zoo:code-target --technique speculative --draft zoo:code-draft \\
        --workload code-prompts --repeats 3
    $ workbench runs --since 7d             # key columns, 100 characters a line; --wide: every column
    $ workbench runs --since 7d --format csv
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any, Optional

import typer

from workbench.errors import WorkbenchError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Measure inference-acceleration techniques against their baseline, quality beside speed.")
zoo_app = typer.Typer(no_args_is_help=True, help="The offline tiny model zoo, trained on this machine.")
app.add_typer(zoo_app, name="zoo")
draft_app = typer.Typer(no_args_is_help=True, help="Draft models built here for a target, for speculative decoding.")
app.add_typer(draft_app, name="draft")


def _dump(value: Any) -> str:
    """Strict JSON: NaN and infinity become null (the store's own conversion)."""
    from workbench.store import json_safe

    return json.dumps(json_safe(value), indent=2, default=str, allow_nan=False)


def _open_store(url: Optional[str], read: bool = False) -> Any:
    """The store at ``url`` (default: data/'s SQLite file). ``read``: a store named by URL must exist already,
    so a typo'd path is an error, not an empty store."""
    from workbench.store import Store

    return Store(url, create=not read or url is None)


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
    names: Optional[list[str]] = typer.Argument(None, help="Models to build (default: the seven of the demo); "
                                                "smollm2-135m is a real pretrained model, converted from a pip wheel."),
    quick: bool = typer.Option(False, "--quick", help="Tiny configs and few steps (under a minute): for tests."),
    force: bool = typer.Option(False, "--force", help="Retrain models that are already built."),
    extra: bool = typer.Option(False, "--extra", help="Also the seed siblings (code-tall, code-mid, "
                               "code-classifier-deep; about 10 more minutes) that the seed data was measured on."),
) -> None:
    """Train the offline zoo on this machine (about 5-8 minutes on 2 cores; --quick under one)."""
    from workbench.models import zoo

    wanted = list(names) if names else None
    if extra:
        wanted = [*(wanted or zoo.DEFAULT_NAMES), *zoo.EXTRA_NAMES]
    for record in zoo.build(quick=quick, force=force, names=wanted):
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


@draft_app.command("build")
def draft_build(
    target: str = typer.Option(..., "--target", help="The causal LM to draft for: Hugging Face id, folder or zoo:NAME."),
    layers: int = typer.Option(4, "--layers", help="The target's first K layers the draft keeps."),
    steps: int = typer.Option(120, "--steps", help="Distillation steps (on 2 cores, 1-2 s each for K=2 of a 135M target when the machine is quiet)."),
    workload: str = typer.Option("code-prompts", "--workload", "-w", help="Prompts of the domain (its first 16 are never trained on)."),
    prompts: int = typer.Option(48, "--prompts", help="Training prompts the target continues (a quarter held out)."),
    new_tokens: int = typer.Option(48, "--new-tokens", help="Greedy tokens the target writes after each prompt."),
    learning_rate: float = typer.Option(1e-3, "--learning-rate", help="AdamW peak learning rate (warm-up, then cosine)."),
    draft_vocab: Optional[int] = typer.Option(None, "--draft-vocab", help="Propose among the domain's N likeliest tokens (FR-Spec); 0: full vocabulary; default 4096 where the vocabulary is larger."),
    out: Optional[str] = typer.Option(None, "--out", help="Folder to write (default: data/cache/drafts/...)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: the cores other processes leave free)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Build a draft for --target by distillation on the workload's domain; print its folder for --draft."""
    from workbench.models.draft import DraftRecipe, build_draft

    recipe = DraftRecipe(layers=layers, steps=steps, prompts=prompts, new_tokens=new_tokens, draft_vocab=draft_vocab,
                         learning_rate=learning_rate)
    record = build_draft(target, recipe, workload=workload, out=out, progress=not quiet, threads=threads)
    m = record.metrics
    typer.echo(f"draft for {record.target}: {record.layers} of {record.target_layers} layers, "
               f"{record.parameter_count:,} params, proposes among {record.draft_vocab_size:,} of "
               f"{record.vocab_size:,} tokens; {record.steps} steps in {record.train_seconds:.0f} s")
    typer.echo(f"held-out KL {m['heldout_kl_at_init']:.3f} -> {m['heldout_kl']:.3f} (train {m['train_kl']:.3f}); "
               f"held-out greedy agreement {m['heldout_agreement_at_init']:.1%} -> {m['heldout_agreement']:.1%} "
               f"(vocabulary covers {m['heldout_vocab_coverage']:.1%}); draft step {m['draft_step_ms']:.1f} ms = "
               f"{m['draft_cost_ratio']:.3f} of a target step ({m['target_step_ms']:.1f} ms)")
    needed = m.get("acceptance_needed_for_1.3x")
    typer.echo(f"theory at 4 draft tokens, verification {m['verify_cost_ratio']:.2f} target steps: 1.3x needs "
               + (f"acceptance >= {needed:.0%}" if needed is not None else "more than this draft can give (even 100%)"))
    typer.echo(f"use it: workbench run --model {target} --technique speculative --draft {record.path} "
               f"--workload {workload}")
    typer.echo(record.path)


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
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: the cores other processes leave free)."),
    margin: float = typer.Option(2.0, "--margin", help="Equivalence band in percent: a speedup within it is 'no practical difference'."),
    wait_quiet: float = typer.Option(0.0, "--wait-quiet", help="Wait up to this many seconds for other processes to leave the cores first."),
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
        margin_percent=margin,
    )
    _check_wait(wait_quiet)
    results_store = _open_store(store)
    planned = runner.plan(spec)
    # 2. Measure, store, show.
    try:
        result = runner.execute(planned, progress=not quiet and not as_json, wait_quiet_s=wait_quiet)
    except KeyboardInterrupt:  # typer would turn it into a silent exit 130
        typer.echo(f"interrupted: this run did not finish and nothing of it was stored; {results_store.url} is "
                   "as it was", err=True)
        raise typer.Exit(130) from None
    results_store.append(result.to_row())
    typer.echo(_dump(result.to_json()) if as_json else run_text(result))
    if result.status != "ok":
        raise typer.Exit(1)


def _check_wait(seconds: float) -> None:
    if not seconds >= 0:
        raise WorkbenchError(f"--wait-quiet {seconds!r} is invalid: use seconds >= 0, e.g. --wait-quiet 300")


@app.command()
def calibrate(
    model: str = typer.Option("zoo:code-classifier", "--model", "-m", help="Model to time against itself."),
    workload: str = typer.Option("code-snippets", "--workload", "-w", help="Built-in workload name or a .jsonl file."),
    times: int = typer.Option(20, "--times", help="A/A runs (the baseline against itself)."),
    repeats: int = typer.Option(5, "--repeats", help="Timed passes per run."),
    max_items: int = typer.Option(16, "--max-items", help="Inputs taken from the workload."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Tokens generated per prompt (LMs)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Inputs per call."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: the free cores)."),
    margin: float = typer.Option(2.0, "--margin", help="Equivalence band in percent."),
    wait_quiet: float = typer.Option(0.0, "--wait-quiet", help="Wait up to this many seconds for quiet before each run."),
    store: Optional[str] = typer.Option(None, "--store", help="Also record the A/A runs here (default: not recorded)."),
) -> None:
    """Time the baseline against itself --times times; print how often the verdict is 'no practical
    difference' (it should be >= 95% on a quiet machine). Exit 1 below that."""
    from workbench.calibration import calibrate as calibrate_
    from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec

    spec = RunSpec(ModelSpec(model), WorkloadSpec(workload, max_items=max_items, max_new_tokens=max_new_tokens,
                                                  batch_size=batch_size),
                   TechniqueSpec("baseline"), device=device, repeats=repeats, threads=threads, margin_percent=margin)
    _check_wait(wait_quiet)
    results_store = _open_store(store) if store else None
    result = calibrate_(spec, times=times, store=results_store, wait_quiet_s=wait_quiet,
                        on_run=lambda i, r: typer.echo(f"A/A run {i + 1}/{times}: {r['verdict'] or r['status']}",
                                                       err=True))
    typer.echo(result.text())
    if not result.passed:
        raise typer.Exit(1)


@app.command()
def sweep(
    sweep_file: str = typer.Argument(..., help="YAML sweep file: models, workloads, techniques with grids."),
    store: Optional[str] = typer.Option(None, "--store", help="SQLAlchemy URL (default: SQLite under data/)."),
    resume: bool = typer.Option(False, "--resume", help="Skip runs already stored with status ok."),
    timeout_per_run: Optional[float] = typer.Option(
        None, "--timeout-per-run", help="Seconds per run, worker start-up included (overrides the file)."),
    max_memory: Optional[float] = typer.Option(
        None, "--max-memory", help="GB of address space per run's worker (overrides the file)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check and list the runs; run nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ray: Optional[str] = typer.Option(
        None, "--ray", help="Run on a Ray cluster: auto (the one started on this machine) or HEAD:PORT; each run "
                            "on a node of its `hardware:` label, rows written by the nodes to --store."),
) -> None:
    """Run a sweep file, each run in its own worker process; a crash or timeout fails one run only.

    The format is described in `workbench.sweep`; `--ray` and the cluster set-up in `workbench.cluster`.
    Exit codes: 0 all runs ok or skipped, 1 some run failed (stored with its reason), 2 bad input,
    130 interrupted (finished runs are stored).
    """
    import signal

    from workbench import sweep as sweeps
    from workbench.worker import WorkerLimits

    # 1. Everything checked before the first run: the file, the limits, the store, every run's plan.
    parsed = sweeps.read_sweep(sweep_file)
    limits = WorkerLimits(timeout_per_run if timeout_per_run is not None else parsed.timeout_per_run_s,
                          max_memory if max_memory is not None else parsed.max_memory_gb)
    if ray is None and any(spec.hardware is not None for spec in parsed.specs):
        raise WorkbenchError(f"{parsed.source}: `hardware:` labels choose nodes of a Ray cluster: add --ray auto "
                             "(or --ray HEAD:PORT), or remove `hardware:` to run here")
    results_store = _open_store(store) if not dry_run or resume else None
    planned = sweeps.plan_sweep(parsed, here=ray is None)
    done = sweeps.done_keys(results_store, parsed.specs) if resume else set()
    skipped = sum(p.skip_reason is not None for p in planned)
    typer.echo(f"{parsed.source}: {len(planned)} runs, {skipped} not applicable here (stored as skipped), "
               f"{len(done)} already stored", err=True)
    if dry_run:
        for item in planned:
            state = "stored" if item.spec.key() in done else f"skip: {item.skip_reason}" if item.skip_reason else "run"
            typer.echo(f"{item.index:>5}  {item.spec.key()[:12]}  {sweeps.describe(item.spec)}  [{state}]")
        return
    # 2. Run; SIGTERM (a scheduler stopping the job) ends the sweep as cleanly as Ctrl-C.
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and a sweep must still stop on it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if ray is not None:
        from workbench.cluster import run_sweep_on_ray

        outcome = run_sweep_on_ray(parsed, results_store, address=ray, resume=resume, limits=limits,
                                   progress=not quiet, planned=planned)
    else:
        outcome = sweeps.run_sweep(parsed, results_store, resume=resume, limits=limits, progress=not quiet,
                                   planned=planned)
    elsewhere = f"{outcome.elsewhere} left to another sweep running them, " if outcome.elsewhere else ""
    typer.echo(f"{outcome.ok} ok, {outcome.failed} failed, {outcome.skipped} skipped, "
               f"{outcome.already_done} already stored, {elsewhere}{outcome.missing} not run; "
               f"{outcome.wall_s:.0f} s; store {results_store.url}")
    if outcome.interrupted:
        typer.echo(f"interrupted: {outcome.missing} runs not done; finished runs are stored, rerun with --resume",
                   err=True)
        raise typer.Exit(130)
    if outcome.failed:
        raise typer.Exit(1)


@app.command()
def runs(
    store: Optional[str] = typer.Option(None, "--store", help="SQLAlchemy URL (default: SQLite under data/)."),
    since: Optional[str] = typer.Option(None, "--since", help="Only runs newer than this: 7d, 12h, 30m or a date."),
    model: Optional[str] = typer.Option(None, "--model", help="Only this model."),
    technique: Optional[str] = typer.Option(None, "--technique", help="Only this technique."),
    fmt: str = typer.Option("table", "--format", help="table, csv or json."),
    wide: bool = typer.Option(False, "--wide", help="The table with every column, nothing cut (default: key columns within 100 characters a line)."),
) -> None:
    """Stored runs, newest last."""
    import pandas as pd

    from workbench.display import run_list_text
    from workbench.terminal import printable

    if fmt not in ("table", "csv", "json"):
        raise WorkbenchError(f"--format {fmt!r} is unknown: use table, csv or json")
    frame = _open_store(store, read=True).runs(since=since, model=model, technique=technique)
    view = _runs_view(frame)
    if fmt == "json":
        typer.echo(_dump(view.to_dict(orient="records")))
    elif fmt == "csv":  # text cells as a terminal shows them: stored strings never carry escape sequences out
        typer.echo(view.map(lambda v: printable(v) if isinstance(v, str) else v).to_csv(index=False), nl=False)
    elif view.empty:
        typer.echo("no runs stored" + (f" since {since}" if since else "") + ": try `workbench run ...` first")
    elif wide:
        with pd.option_context("display.width", None, "display.max_columns", None, "display.max_colwidth", None):
            typer.echo(view.map(lambda v: printable(v) if isinstance(v, str) else v).to_string(index=False))
    else:
        typer.echo(run_list_text(frame))


def _runs_view(frame: Any) -> Any:
    import pandas as pd

    from workbench.display import quality_text
    from workbench.measure import verdict_of
    from workbench.noise import summary_text

    columns = ["created_at", "run_id", "status", "model", "technique", "draft", "workload", "device",
               "speedup", "speedup_ci_low", "speedup_ci_high", "verdict", "quality", "machine", "failure_reason",
               "params"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    view = frame.copy()
    view["run_id"] = view["run_id"].str[:12]
    view["created_at"] = view["created_at"].dt.strftime("%Y-%m-%d %H:%M:%S")
    metrics = view["quality_metrics"] if "quality_metrics" in view else [None] * len(view)
    lossless = view["lossless"] if "lossless" in view else [None] * len(view)
    view["quality"] = [quality_text(q, m, l if isinstance(l, bool) else None) if q else ""
                       for q, m, l in zip(view["quality"], metrics, lossless)]
    view["verdict"] = [verdict_of((s or {}).get("comparison")) if (s or {}).get("comparison") else ""
                       for s in view["summary"]]
    noise = view["noise"] if "noise" in view else [None] * len(view)
    view["machine"] = ["noisy machine" if summary_text(n) else ("quiet" if n else "not measured") for n in noise]
    for col in ("speedup", "speedup_ci_low", "speedup_ci_high"):
        view[col] = view[col].round(3)
    view["params"] = [",".join(f"{k}={v}" for k, v in sorted((p or {}).items())) for p in view["params"]]
    return view[columns]


# -- meta-learner and pooling (workbench.meta, workbench.exchange) ----------------------------------


@app.command()
def learn(
    store: Optional[str] = typer.Option(None, "--store", help="SQLAlchemy URL (default: SQLite under data/)."),
    out: Optional[str] = typer.Option(None, "--out", help="Where to save the learner (default: beside the store, e.g. data/workbench.learner.skops)."),
    learner: str = typer.Option("boosting", "--learner", help="boosting (default) or tree (the glass box)."),
    budget: str = typer.Option("perplexity<=2%,accuracy<=1,ssim>=0.9", "--budget", help="Quality budget of the evaluation: lossless, any, or clauses perplexity<=X% (LMs), accuracy<=X (classifiers, points), ssim>=X (images)."),
    since: Optional[str] = typer.Option(None, "--since", help="Only runs newer than this: 7d, 12h or a date."),
) -> None:
    """Train the meta-learner on stored runs; print the leave-one-group-out evaluation table."""
    from workbench.meta.commands import learn as learn_

    typer.echo(learn_(store, out, learner=learner, budget=budget, since=since)["text"])


@app.command()
def recommend(
    model: str = typer.Option(..., "--model", "-m", help="Hugging Face id, local folder, or zoo:NAME."),
    workload: str = typer.Option(..., "--workload", "-w", help="Built-in workload name or a .jsonl file."),
    budget: str = typer.Option("perplexity<=2%,accuracy<=1,ssim>=0.9", "--budget", help="lossless, any, or clauses perplexity<=X% (LMs), accuracy<=X (classifiers, points), ssim>=X (images)."),
    learner_path: Optional[str] = typer.Option(None, "--learner-path", help="A saved learner (default: the default store's, data/workbench.learner.skops)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens generated per prompt."),
    batch_size: int = typer.Option(1, "--batch-size", help="Inputs per call."),
    steps: int = typer.Option(50, "--steps", help="Diffusion steps, for diffusion models."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    max_items: Optional[int] = typer.Option(None, "--max-items", help="Inputs of the workload to use (default: all)."),
    plan: Optional[str] = typer.Option(None, "--plan", help="Write the runs that would decide between overlapping candidates to this sweep file (for `workbench sweep`)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    wide: bool = typer.Option(False, "--wide", help="Lines unwrapped and the full candidate table (default: 100 characters a line)."),
) -> None:
    """Recommend a technique for a model and workload on this machine, with reasons, a counterfactual and what to measure next."""
    from workbench.meta.commands import recommend_for
    from workbench.terminal import TERMINAL_WIDTH

    result = recommend_for(model, workload, budget, learner_path, device=device, dtype=dtype,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, steps=steps, threads=threads,
                           max_items=max_items, plan=plan)
    typer.echo(_dump(result.to_dict()) if as_json else result.text(width=None if wide else TERMINAL_WIDTH))


@app.command()
def explain(
    learner_path: Optional[str] = typer.Option(None, "--learner-path", help="A saved learner (default: the default store's, data/workbench.learner.skops)."),
    html: Optional[str] = typer.Option(None, "--html", help="Also write the plotly figures to this HTML file."),
) -> None:
    """Global explanation of the meta-learner: importances, partial dependence, rules."""
    from workbench.meta.commands import explain_learner

    typer.echo(explain_learner(learner_path, html)["text"])


@app.command("export")
def export_command(
    out: str = typer.Option(..., "--out", help="The parquet bundle to write, e.g. runs.parquet."),
    store: Optional[str] = typer.Option(None, "--store", help="SQLAlchemy URL (default: SQLite under data/)."),
    since: Optional[str] = typer.Option(None, "--since", help="Only runs newer than this: 7d, 12h or a date."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle even with no runs."),
) -> None:
    """Export stored runs to a parquet bundle, to pool results across machines."""
    from workbench.exchange import export_runs

    source = _open_store(store, read=True)
    count = export_runs(source, out, since=since, replace_with_empty=force)
    typer.echo(f"exported {count} runs from {source.url} to {out}")


@app.command("import")
def import_command(
    bundle: str = typer.Argument(..., help="A parquet bundle written by `workbench export`."),
    store: Optional[str] = typer.Option(None, "--store", help="SQLAlchemy URL (default: SQLite under data/)."),
) -> None:
    """Import a parquet bundle into a store; runs already stored (same run_id) are skipped."""
    from workbench.exchange import import_runs

    target = _open_store(store)
    counts = import_runs(bundle, target)
    typer.echo(f"imported {counts['added']} of {counts['read']} runs into {target.url} "
               f"({counts['already_stored']} already stored)")


@app.command()
def report(
    out: str = typer.Option(..., "--out", help="The HTML to write, e.g. reports/weekly.html (the executed .ipynb goes beside it)."),
    store: Optional[str] = typer.Option(None, "--store", help="SQLAlchemy URL (default: SQLite under data/)."),
    since: str = typer.Option("7d", "--since", help="The window: 7d, 12h, 30m or a date."),
    param: list[str] = typer.Option([], "--param", "-p", help="key=value: models, machines, techniques (comma-separated), budget, title, audience."),
    cell_timeout: float = typer.Option(300.0, "--cell-timeout", help="Seconds one notebook cell may run."),
    timeout: float = typer.Option(900.0, "--timeout", help="Seconds the whole report may take."),
) -> None:
    """Render the scheduled report (papermill + nbconvert): one self-contained, offline HTML file."""
    from workbench.report import ReportParams, render_report

    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's stop cleans up like Ctrl-C
    params = ReportParams.from_pairs(param, store_url=store, since=since)
    for flag, seconds in (("--cell-timeout", cell_timeout), ("--timeout", timeout)):
        if not 0 < seconds < float("inf"):
            raise WorkbenchError(f"{flag} {seconds:g} is invalid: give a positive number of seconds, e.g. {flag} 300")
    try:
        result = render_report(params, out, cell_timeout_s=cell_timeout, total_timeout_s=timeout)
    except KeyboardInterrupt:  # the notebook's process is stopped and its temporary folder gone by now
        typer.echo(f"interrupted: the report was not written; {out} is as it was", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"wrote {result['html']} ({result['html_bytes'] / 1e6:.1f} MB) and {result['notebook']} "
               f"in {result['seconds']:.0f}s")


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, deprecation notes) would bury the table."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    original = warnings.showwarning

    def one_line(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if category.__module__.startswith("workbench"):  # ours are written for people: one line, no source
            typer.echo(f"warning: {message}", err=True)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:  # typer 0.2x carries its own copy of click; older releases use click itself
        from typer._click.exceptions import ClickException, UsageError
    except ImportError:
        from click.exceptions import ClickException, UsageError

    try:
        _quiet_libraries()
        code = app(standalone_mode=False, prog_name="workbench")  # usage errors come back to us, not a boxed page
        sys.exit(code if isinstance(code, int) else 0)
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `workbench`: the help page, as before
            exc.show()
            sys.exit(2)
        command = exc.ctx.command_path if exc.ctx is not None else "workbench"
        typer.echo(f"error: {exc.format_message().rstrip('.')}; see `{command} --help`", err=True)
        sys.exit(2)
    except ClickException as exc:
        typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("interrupted: runs finished before the interrupt are stored", err=True)
        sys.exit(130)
    except WorkbenchError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: runs finished before the interrupt are stored", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
