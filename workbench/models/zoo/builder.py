"""Building the zoo: what is up to date, one model at a time into a temporary folder moved into place
atomically (a killed build leaves nothing half written), and reading records back."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import torch

from workbench import paths
from workbench.models.zoo.catalogue import (DEFAULT_NAMES, DEFAULT_SEED, FORMAT_VERSION, METADATA_FILE, MODELS, ZOO_NAMES,
                                            ZooError, ZooRecord, _recipes)
from workbench.models.zoo.trainers import _TRAINERS, _BuildContext


# --------------------------------------------------------------------------- public API


def list_models(root: Path | str | None = None) -> list[ZooRecord]:
    """Records of the built zoo models under ``root`` (default :func:`paths.zoo_dir`), in zoo order."""
    root = _root(root)
    return [rec for name in ZOO_NAMES if (rec := _read_record(root / name)) is not None]


def record(name: str, root: Path | str | None = None) -> ZooRecord:
    """The :class:`ZooRecord` of a built model; :class:`ZooError` if unknown or not built."""
    return _read_record(model_dir(name, root))  # type: ignore[return-value]


def model_dir(name: str, root: Path | str | None = None) -> Path:
    """The folder of a built zoo model, ready for ``from_pretrained``.

    Raises:
        ZooError: the name is not a zoo model, or the model is not built yet.
    """
    if name not in MODELS:
        raise ZooError(f"unknown zoo model {name!r}; valid names: {', '.join(ZOO_NAMES)}")
    path = _root(root) / name
    if _read_record(path) is None:
        raise ZooError(
            f"zoo model {name!r} is not built in {path.parent}; run `workbench zoo build` "
            f"(or `workbench zoo build --quick` for tiny test models)"
        )
    return path


def build(
    quick: bool = False,
    root: Path | str | None = None,
    names: list[str] | None = None,
    force: bool = False,
    progress: bool = True,
    seed: int = DEFAULT_SEED,
) -> list[ZooRecord]:
    """Train the zoo models that are missing or stale; keep the others.

    A model is kept when it was built with the same seed and recipe version, its dependencies are
    unchanged, and it is of the requested flavour or full-size: a full model also serves a quick
    request (and a model whose dependency is a kept full model is then built full-size, as it must
    share its tokenizer or judge); a quick model is replaced by a full request. Each model is
    trained into a hidden temporary folder and renamed into place when complete, so an
    interrupted build never leaves a half model that looks finished.

    Args:
        quick: tiny configs and few steps (seconds; only exercises the code paths).
        root: zoo folder; default :func:`workbench.paths.zoo_dir` (respects ``WORKBENCH_DATA``).
        names: models to build (their dependencies come along); default :data:`DEFAULT_NAMES` (the
            seed siblings in :data:`EXTRA_NAMES` only when named).
        force: rebuild the named models even when up to date.
        progress: show tqdm progress bars.
        seed: weight init, data split and data order.

    Returns:
        The records of the requested models (and dependencies), in build order.
    """
    # 1. Check inputs before any long work
    wanted = list(DEFAULT_NAMES) if names is None else list(names)
    unknown = [n for n in wanted if n not in MODELS]
    if unknown:
        raise ZooError(f"unknown zoo model(s) {unknown}; valid names: {', '.join(ZOO_NAMES)}")
    root = _root(root)
    root.mkdir(parents=True, exist_ok=True)
    order = _with_dependencies(wanted)
    _remove_abandoned_folders(root)

    # 2. Build in dependency order; a model built on a kept full-size dependency is built full-size
    contexts = {q: _BuildContext(quick=q, seed=seed, root=root, progress=progress, recipes=_recipes(q))
                for q in (True, False)}
    records: dict[str, ZooRecord] = {}
    with _library_progress_bars(enabled=False):  # our own bars only; no "Loading weights" noise
        for name in order:
            current = _read_record(root / name)
            deps = {d: records[d].built_at for d in MODELS[name].depends_on}
            if current is not None and not (force and name in wanted) and _up_to_date(current, quick, seed, deps):
                records[name] = current
                continue
            flavour = quick and all(records[d].quick for d in deps)
            records[name] = _build_one(name, contexts[flavour], deps)
    return [records[n] for n in order]


# --------------------------------------------------------------------------- build machinery


def _root(root: Path | str | None) -> Path:
    return Path(root).expanduser() if root is not None else paths.zoo_dir()


def _read_record(path: Path) -> ZooRecord | None:
    meta = path / METADATA_FILE
    if not meta.is_file():
        return None
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
        return ZooRecord.from_dict({**data, "path": str(path.resolve())})
    except (json.JSONDecodeError, TypeError) as exc:
        raise ZooError(f"{meta} is unreadable ({exc}); rebuild with `workbench zoo build --force`") from exc


def _with_dependencies(names: list[str]) -> list[str]:
    needed: set[str] = set()

    def add(name: str) -> None:
        if name not in needed:
            needed.add(name)
            for dep in MODELS[name].depends_on:
                add(dep)

    for n in names:
        add(n)
    return [n for n in ZOO_NAMES if n in needed]  # ZOO_NAMES lists dependencies first


def _up_to_date(rec: ZooRecord, quick: bool, seed: int, deps: dict[str, str]) -> bool:
    flavour_ok = rec.quick == quick or (quick and not rec.quick)
    return flavour_ok and rec.seed == seed and rec.format_version == FORMAT_VERSION and rec.depends_on == deps


def _build_one(name: str, ctx: _BuildContext, deps: dict[str, str]) -> ZooRecord:
    """Train ``name`` into a temporary folder, write its record, then move it into place."""
    start = time.perf_counter()
    final = ctx.root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{name}-{os.getpid()}-", dir=ctx.root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished model is as readable as its files
    try:
        torch.manual_seed(ctx.seed)
        trained = _TRAINERS[name](ctx, tmp)
        rec = ZooRecord(
            name=name, kind=MODELS[name].kind, path=str(final.resolve()), quick=ctx.quick, seed=ctx.seed,
            description=MODELS[name].description, data=trained.data, steps=trained.steps,
            final_loss=None if math.isnan(trained.final_loss) else round(float(trained.final_loss), 5), train_seconds=round(time.perf_counter() - start, 2),
            parameter_count=int(trained.parameter_count), bytes=_folder_bytes(tmp),
            metrics={k: round(float(v), 5) for k, v in trained.metrics.items()}, config=trained.config,
            versions=_versions(), built_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            depends_on=deps,
        )
        (tmp / METADATA_FILE).write_text(json.dumps(rec.to_dict(), indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, final)
        return rec
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_abandoned_folders(root: Path) -> None:
    """Delete temporary folders left by builds that were killed (their process no longer exists)."""
    for path in [*root.glob(".building-*"), *root.glob(".old-*")]:
        parts = path.name.split("-")  # .building-<name>-<pid>-<random>; mkdtemp's random has no "-"
        pid = int(parts[-2]) if len(parts) >= 4 and parts[-2].isdigit() else None
        if pid is not None and pid != os.getpid() and not _process_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _move_into_place(tmp: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-{os.getpid()}-", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _library_progress_bars(enabled: bool) -> Iterator[None]:
    """Switch transformers' and diffusers' own progress bars on or off, restoring them after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(m, m.is_progress_bar_enabled()) for m in (transformers_logging, diffusers_logging)]
    for module, _ in saved:
        module.enable_progress_bar() if enabled else module.disable_progress_bar()
    try:
        yield
    finally:
        for module, was in saved:
            module.enable_progress_bar() if was else module.disable_progress_bar()


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _versions() -> dict[str, str]:
    import diffusers
    import safetensors
    import sklearn
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "diffusers": diffusers.__version__, "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__, "scikit-learn": sklearn.__version__,
    }
