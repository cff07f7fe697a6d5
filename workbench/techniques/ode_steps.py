"""ODE steps: a parameter-shared model's one layer applied fewer times, each step larger.

A model that applies one shared layer N times with residual connections (ALBERT, or a GPT-2 whose blocks are
one set of weights) is an explicit Euler solver of a neural ODE, ``x_{k+1} = x_k + h * f(x_k)`` with step
size h = 1 (Chen et al., "Boosting Inference Efficiency: Unleashing the Power of Parameter-Shared Pre-trained
Language Models", EMNLP Findings 2023, arXiv 2310.12818). At inference it can integrate the same time with
fewer, larger steps: M < N iterations with every residual branch's output multiplied by h = N / M. Per token the
model then does M / N of its layer work (``compute_fraction``); quality falls by how well the shared layer's
vector field tolerates the larger steps, which the zoo's ``code-shared`` was pre-trained for (a random number
of iterations per batch with the matching step size, see :mod:`workbench.models.zoo.trainers`) and its
``code-shared-plain`` sibling was not.

What runs: a copy of the model (never the shared one) that applies its layer M times, with forward hooks that
scale the residual branches' last projections by h:

- GPT-2 marked ``"parameter_shared": true`` in config.json (the zoo's ``code-shared``; its N blocks are
  identical copies on disk, checked with ``torch.equal`` in prepare): the copy keeps M blocks and
  ``config.n_layer = M``; hooks on each block's ``attn.c_proj`` and ``mlp.c_proj`` (pre-LayerNorm: exactly
  ``x + h * f(x)``);
- ALBERT (one layer group, one layer in it): the copy's ``config.num_hidden_layers = M``; hooks on the layer's
  ``attention.dense`` and ``ffn_output`` (ALBERT is post-LayerNorm, ``LayerNorm(x + h * branch(x))``, so the
  step is Euler's up to the normalisation).

``steps`` M equal to N reproduces the model's outputs exactly (h = 1, no hook); ``check`` refuses M >= N at plan
time, as there is nothing to gain.

Example:
    >>> from workbench.techniques.ode_steps import OdeSteps, steps_taken
    >>> OdeSteps(steps=4).config["steps"], steps_taken(0, 8), steps_taken(3, 8)
    (4, 4, 3)
    >>> OdeSteps.display_name({"steps": 4})
    'ODE steps (4)'
    >>> OdeSteps.features({"steps": 2}, {"layers": 8}, None)["compute_fraction"]
    0.25
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench import quality
from workbench.errors import NotApplicableError
from workbench.measure import CallOutput
from workbench.models.loading import describe_module
from workbench.techniques._execute import classify, generate
from workbench.techniques.base import Facts, Metric, Outcome, Param, Technique, TechniqueReport, Trial, register

SHARED_MARKER = "parameter_shared"  # config.json key a parameter-shared GPT-2 carries (the zoo writes it)
PRETRAINING_MARKER = "ode_pretraining"  # config.json key: "random-steps" (trained for larger steps) or "none"
ITERATIONS_MARKER = "shared_iterations"  # config.json key: N, the iterations the shared layer was trained with
WORKS_ON = "ALBERT, or zoo:code-shared"


def steps_taken(steps: int | None, trained: int) -> int:
    """The iterations M to run: ``steps``, or half the ``trained`` ones (rounded down, at least 1) for 0/None."""
    return int(steps) if steps else max(1, trained // 2)


# ----------------------------------------------------------------------------------------------------
# plan time: which files describe one shared layer applied N times
# ----------------------------------------------------------------------------------------------------


def shared_iterations(config: dict[str, Any], architecture: str) -> tuple[int | None, str | None]:
    """(N, None) when config.json describes one shared layer applied N times, else (None, why not in one line).

    ``architecture`` (e.g. ``GPT2LMHeadModel``) names the model in the refusal.

    Example:
        >>> shared_iterations({"model_type": "albert", "num_hidden_layers": 12}, "AlbertForSequenceClassification")
        (12, None)
        >>> shared_iterations({"model_type": "gpt2", "n_layer": 4}, "GPT2LMHeadModel")[1][:46]
        "GPT2LMHeadModel's 4 layers each have their own"
    """
    family = config.get("model_type")
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    if family == "albert":
        groups, inner = int(config.get("num_hidden_groups", 1)), int(config.get("inner_group_num", 1))
        if groups > 1 or inner > 1:
            return None, (f"{architecture} has num_hidden_groups={groups} and inner_group_num={inner}: ode_steps "
                          "needs one shared layer (num_hidden_groups=1, inner_group_num=1), as in albert-base-v2")
        return int(layers), None
    if config.get(SHARED_MARKER) is True:
        if family != "gpt2":
            return None, (f"{architecture} ({family}) is marked parameter_shared, but ode_steps runs shared "
                          f"layers of GPT-2 and ALBERT only: use {WORKS_ON}")
        return int(config.get(ITERATIONS_MARKER) or layers), None
    return None, (f"{architecture}'s {layers} layers each have their own weights: ode_steps needs one shared layer "
                  f"applied repeatedly ({WORKS_ON})")


def _config_json(location: str) -> dict[str, Any]:
    path = Path(location) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# ----------------------------------------------------------------------------------------------------
# the fewer-steps copy
# ----------------------------------------------------------------------------------------------------


def residual_branches(model: nn.Module) -> list[nn.Module]:
    """The last projection of every residual branch, each module once (a shared block is listed once).

    GPT-2: each block's ``attn.c_proj`` and ``mlp.c_proj``; ALBERT: each layer's ``attention.dense`` and
    ``ffn_output``. Their outputs are what a step size h multiplies.
    """
    if hasattr(model, "albert"):
        modules = [m for group in model.albert.encoder.albert_layer_groups for layer in group.albert_layers
                   for m in (layer.attention.dense, layer.ffn_output)]
    elif hasattr(getattr(model, "transformer", None), "h"):
        modules = [m for block in model.transformer.h for m in (block.attn.c_proj, block.mlp.c_proj)]
    else:
        raise NotApplicableError(f"{type(model).__name__} has no GPT-2 or ALBERT residual branches: use {WORKS_ON}")
    return list({id(m): m for m in modules}.values())


class ResidualScale:
    """Forward hooks that multiply the outputs of ``modules`` by ``h`` (settable between calls).

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> scale = ResidualScale([layer], h=2.0)
        >>> bool(torch.allclose(layer(torch.ones(1, 2)), 2 * torch.nn.functional.linear(torch.ones(1, 2),
        ...                                                                            layer.weight, layer.bias)))
        True
        >>> scale.remove()
    """

    def __init__(self, modules: list[nn.Module], h: float = 1.0) -> None:
        self.h = h  # the step size: residual branch outputs are multiplied by it
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output if self.h == 1.0 else output * self.h

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def trained_iterations(model: nn.Module) -> int:
    """N: how many times the model applies its shared layer (ALBERT's config, GPT-2's block count)."""
    if hasattr(model, "albert"):
        return int(model.config.num_hidden_layers)
    return len(model.transformer.h)


def blocks_identical(model: nn.Module) -> bool:
    """True when every GPT-2 block holds exactly block 0's weights (the untied copies of one shared block)."""
    blocks = list(model.transformer.h)
    first = blocks[0].state_dict()
    return all(all(torch.equal(first[k], v) for k, v in block.state_dict().items()) for block in blocks[1:])


def ode_copy(model: nn.Module, steps: int) -> tuple[nn.Module, ResidualScale | None]:
    """A copy of a parameter-shared model that applies its layer ``steps`` (M) times with step size h = N / M.

    The original is not touched: the copy has its own modules and config and reads the original's weight tensors
    (never writing them). GPT-2: the copy keeps blocks 0 .. M-1 (identical weights) and ``config.n_layer = M``;
    ALBERT: the copy's ``config.num_hidden_layers = M``. For M < N forward hooks scale
    the residual branches by h (:class:`ResidualScale`, returned so a caller can remove them); M = N returns an
    exact copy and no hooks.
    """
    trained = trained_iterations(model)
    if not 1 <= steps <= trained:
        raise ValueError(f"steps={steps} must be between 1 and {trained} (the iterations the model was trained with)")
    # 1. New modules and config, the same weight tensors (read only): no memory for a second set of weights, and
    # the same memory layout, so M = N gives bit-identical outputs (a copied tensor's alignment can change the
    # kernels' rounding).
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, memo=tensors)
    # 2. M iterations of the shared layer, each step h = N / M.
    if hasattr(twin, "albert"):
        twin.config.num_hidden_layers = steps  # the encoder reads the same config object
        if twin.albert.encoder.config is not twin.config:
            twin.albert.encoder.config.num_hidden_layers = steps
    else:
        twin.transformer.h = nn.ModuleList(list(twin.transformer.h)[:steps])
        twin.config.n_layer = steps
    if steps == trained:
        return twin, None
    return twin, ResidualScale(residual_branches(twin), h=trained / steps)


# ----------------------------------------------------------------------------------------------------
# the technique
# ----------------------------------------------------------------------------------------------------


@register
class OdeSteps(Technique):
    """Fewer, larger Euler steps of a parameter-shared model's one layer (residuals scaled by N / M)."""

    name = "ode_steps"
    applies_to = ("causal_lm", "classifier")
    title = "ODE steps"
    description = ("apply a parameter-shared model's one layer fewer times with larger steps (residual branches "
                   "scaled by trained / taken iterations); ALBERT or zoo:code-shared")
    params = {
        "steps": Param(int, 0, "iterations M of the shared layer to run, below the N it was trained with (0: half, "
                       "N // 2). Fewer: less work per token (M / N of the layers), larger steps h = N / M, "
                       "lower quality", minimum=0),
        "quality_tokens": Param(int, 1024, "tokens of the workload's text scored for perplexity and KL (causal LMs); "
                                "more is steadier, longer prepare", minimum=16),
    }
    examples = ({"model": "zoo:code-shared", "workload": "code-prompts", "params": {"quality_tokens": 256}},)

    @classmethod
    def display_name(cls, params: dict[str, Any], draft: str | None = None) -> str:
        steps = params.get("steps")
        return f"{cls.title} ({steps})" if steps else f"{cls.title} (half the trained iterations)"

    def check(self, facts: Facts, spec: Any) -> str | None:
        reason = super().check(facts, spec)
        if reason:
            return reason
        model = facts.model
        trained, reason = shared_iterations({"model_type": model.family, **_config_json(model.location)},
                                            model.architecture or model.family)
        if reason:
            return reason
        steps = steps_taken(self.config["steps"], trained)
        if trained < 2:
            return f"{model.architecture} applies its shared layer once: ode_steps has no iteration to leave out"
        if not 1 <= steps < trained:
            return (f"ode_steps steps={steps} is outside 1 .. {trained - 1}: {model.architecture} applies its shared "
                    f"layer {trained} times (steps=0 takes half, {trained // 2})")
        return None

    def prepare(self, trial: Trial) -> None:
        # 1. What the files say: N, the pre-training, and (GPT-2) that the blocks really are one layer.
        loaded = trial.model
        self._model, self._spec = loaded, trial.spec
        config = _config_json(loaded.location)
        self.trained_ = trained_iterations(loaded.model)
        self.steps_ = steps_taken(self.config["steps"], self.trained_)
        self.pretraining_ = config.get(PRETRAINING_MARKER, "unknown (config.json has no ode_pretraining marker)")
        if not hasattr(loaded.model, "albert") and not blocks_identical(loaded.model):
            raise NotApplicableError(f"{loaded.info.get('architecture')} in {loaded.location} is marked "
                                     "parameter_shared but its blocks hold different weights: ode_steps needs one "
                                     "shared layer (rebuild it, e.g. workbench zoo build code-shared --force)")
        # 2. The copy that takes M steps of size h = N / M (the shared model is only read).
        self.copy_, self.scale_ = ode_copy(loaded.model, self.steps_)
        self.copy_.eval()
        # 3. Quality beside it, untimed: perplexity and KL on the timed text (LMs), label KL (classifiers).
        self.quality_ = quality.copy_quality(loaded, self.copy_, trial.texts, trial.spec.device,
                                             self.config["quality_tokens"])

    def run(self, batch: Any) -> CallOutput:
        if self._model.kind == "causal_lm":
            return generate(self.copy_, self._model.tokenizer, batch, self._spec.workload.max_new_tokens)
        return classify(self.copy_, batch)

    def report(self, outcome: Outcome) -> TechniqueReport:
        metrics = quality.copy_quality_metrics(self.quality_)
        h = self.trained_ / self.steps_
        metrics.append(Metric("step_size", h, "", None, "step size h", headline=False))
        model_bytes = describe_module(self.copy_)["model_bytes"]
        internals = {
            "iterations_trained": self.trained_, "steps_taken": self.steps_, "step_size_h": h,
            "compute_fraction": self.steps_ / self.trained_, "ode_pretraining": self.pretraining_,
            "implementation": ("GPT-2 copy keeping the first M of its identical blocks (config.n_layer = M), hooks "
                               "scaling attn.c_proj and mlp.c_proj outputs by h" if self._model.kind == "causal_lm"
                               else "ALBERT copy with config.num_hidden_layers = M, hooks scaling attention.dense "
                                    "and ffn_output outputs by h (post-LayerNorm residuals)"),
            "quality": self.quality_,
        }
        return TechniqueReport(
            lossless=False, model_bytes=model_bytes, bytes_read_per_token=model_bytes, quality=metrics,
            internals=internals, features=self.features(self.config, self._model.info, None),
            headline=(f"{self.steps_} of {self.trained_} iterations, step size h = {h:.3g} "
                      f"(ODE pre-training: {self.pretraining_})"))

    @classmethod
    def features(cls, params: dict[str, Any], model: dict[str, Any], draft: dict[str, Any] | None) -> dict[str, Any]:
        trained = model.get("layers")
        if not trained:
            return {"compute_fraction": float("nan")}
        return {"compute_fraction": steps_taken(params.get("steps"), int(trained)) / int(trained)}

    def release(self) -> None:
        if getattr(self, "scale_", None) is not None:
            self.scale_.remove()
        self.copy_, self.scale_ = None, None
