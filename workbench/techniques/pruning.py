"""Pruning: a copy of the model with attention heads and FFN neurons really removed, or weights zeroed.

``method=structured`` (the default) removes whole attention heads and FFN neurons by their importance
on the calibration split (never the timed inputs), slicing the weights into genuinely smaller
``nn.Linear`` / ``Conv1D`` layers on a deep copy, so dense kernels do less work:

- a head's importance is the mean norm (over calibration tokens, padding excluded) of its slice of the
  attention output after the output projection, ``|| x_h W_o[:, h] ||``; with grouped key/value heads
  (Llama, SmolLM2: 9 query heads over 3 KV heads) the unit removed is a whole KV group with its query
  heads (importance summed over them), so ``num_key_value_groups`` stays what the forward reads;
- an FFN neuron's importance is its mean ``|activation|`` times the norm of its column of the down /
  output projection.

Removal is **uniform per layer**: every layer loses the same number of its least important units
(``round(fraction x units)``, at least one head or KV group and one neuron kept), chosen by importance
within the layer. Global ranking would make some layers lose far more; uniform counts keep every layer's
shapes alike, so the KV cache (HF's ``DynamicCache``, one entry per layer) and every attention kernel see
ordinary shapes. transformers 5 no longer has ``prune_heads`` (checked: 5.24 keeps only
``pytorch_utils.prune_linear_layer``, which makes float32 layers whatever the model's dtype), so the slicing
here is its own and keeps the dtype. The forward passes of every supported family reshape with ``-1``
heads, so only the sliced layers and the per-module head counts (``split_size``, ``num_heads``,
``all_head_size``, ``n_heads``) change; the copy's config still describes the unpruned model, and the
report says what was removed.

``method=magnitude`` is the honest contrast: the smallest ``|w|`` of every linear layer in the blocks are
zeroed (``torch.nn.utils.prune.l1_unstructured``, per layer, then made permanent) in the *same dense
shapes*: dense kernels multiply the zeros too, so it saves no time, and the report gives the bytes a
sparse format would take (torch's CSR: values + int64 column indices + row pointers, and the same with
int32 indices) beside the dense bytes as stored.

An optional short recovery fine-tune (``recovery_steps``) trains the pruned copy on the calibration split
(LM loss for causal LMs, cross-entropy on the calibration labels for classifiers); magnitude pruning keeps
its zeros through it. The calibration split comes from the timed inputs' own distribution, so after
recovery the perplexity on the timed text can fall below the unpruned model's (adaptation to the
workload, not a better model); the next-token KL still measures how far the copy moved from the
original. Quality beside speed: perplexity change and next-token KL on the timed inputs' text (LMs),
accuracy (the standard comparison) and label KL (classifiers).

Example:
    >>> from workbench.techniques.pruning import Pruning
    >>> Pruning(heads_fraction=0.5).config["method"]
    'structured'
    >>> Pruning.display_name({"method": "magnitude"})
    'magnitude pruning (50% of weights)'
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from workbench import quality
from workbench.measure import CallOutput
from workbench.models.loading import describe_module
from workbench.techniques._execute import classify, generate
from workbench.techniques.base import (Facts, Metric, Outcome, Param, Technique, TechniqueParamError, TechniqueReport,
                                       Trial, register)

METHODS = ("structured", "magnitude")


@dataclass(frozen=True)
class Layout:
    """Where one family keeps its heads and FFN neurons, relative to a block (checked against transformers 5.24).

    An in-projection is ``(path, unit_shape, unit_axis)``: its output features viewed as ``unit_shape`` have
    one attention unit (head, or KV group) per index of ``unit_axis``; GPT-2's fused ``c_attn`` (3H) is
    ``(3, units, -1)`` on axis 1, GPT-NeoX's per-head interleaved ``query_key_value`` is ``(units, -1)``.
    """

    attention: str  # the module whose head-count attributes the forward reads
    q: str  # query in-projection, its heads grouped by KV unit ("" where q, k, v are fused)
    in_projections: tuple[tuple[str, tuple[int, ...], int], ...]  # key/value (or fused qkv) in-projections
    out_projection: str  # attention output projection, sliced on its inputs (heads in order)
    ffn_in: tuple[str, ...]  # FFN in-projections (gate, up / c_fc / intermediate), sliced on their outputs
    ffn_out: str  # FFN out-projection (down / c_proj / output.dense), sliced on its inputs


_LLAMA = Layout("self_attn", "self_attn.q_proj",
                (("self_attn.k_proj", (-1,), 0), ("self_attn.v_proj", (-1,), 0)), "self_attn.o_proj",
                ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")
_BERT = Layout("attention.self", "attention.self.query",
               (("attention.self.key", (-1,), 0), ("attention.self.value", (-1,), 0)), "attention.output.dense",
               ("intermediate.dense",), "output.dense")
#: family (config model_type) -> its layout; every other family is refused at plan time
LAYOUTS: dict[str, Layout] = {
    "gpt2": Layout("attn", "", (("attn.c_attn", (3, -1), 1),), "attn.c_proj", ("mlp.c_fc",), "mlp.c_proj"),
    "llama": _LLAMA, "qwen2": _LLAMA, "mistral": _LLAMA, "gemma": _LLAMA,
    "opt": Layout("self_attn", "self_attn.q_proj",
                  (("self_attn.k_proj", (-1,), 0), ("self_attn.v_proj", (-1,), 0)), "self_attn.out_proj",
                  ("fc1",), "fc2"),
    "gpt_neox": Layout("attention", "", (("attention.query_key_value", (-1,), 0),), "attention.dense",
                       ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),
    "bert": _BERT, "roberta": _BERT, "electra": _BERT,
    "distilbert": Layout("attention", "attention.q_lin",
                         (("attention.k_lin", (-1,), 0), ("attention.v_lin", (-1,), 0)), "attention.out_lin",
                         ("ffn.lin1",), "ffn.lin2"),
}
#: why the families people ask about most are refused
NOT_SUPPORTED = {
    "phi3": "its fused qkv_proj is split by the config's head counts in the forward",
    "albert": "one layer's weights are shared by every layer",
}
_HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads")  # query heads a module's forward may read
_BLOCK_PATHS = ("h", "layers", "decoder.layers", "encoder.layer", "transformer.layer")  # under base_model


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (``base_model.h``, ``.layers``, ``.encoder.layer`` ...)."""
    base = model.base_model
    for path in _BLOCK_PATHS:
        try:
            found = base.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return found
    raise TechniqueParamError(f"pruning finds no block list in {type(model).__name__} (looked under base_model at "
                              f"{', '.join(_BLOCK_PATHS)})")


def _head_counts(config: Any) -> tuple[int, int]:
    """(query heads, key/value heads) from the config."""
    heads = next(getattr(config, k) for k in ("num_attention_heads", "n_head", "n_heads") if hasattr(config, k))
    kv = getattr(config, "num_key_value_heads", None) or heads
    return int(heads), int(kv)


def _weight_in_out(layer: nn.Module) -> torch.Tensor:
    """The weight as (in, out) whatever the layer kind (Conv1D stores it so; nn.Linear as (out, in))."""
    return layer.weight if isinstance(layer, Conv1D) else layer.weight.T


def slice_layer(layer: nn.Module, keep: torch.Tensor, side: str) -> nn.Module:
    """A new, smaller layer of the same kind and dtype keeping features ``keep`` (sorted indices) of its
    outputs (``side="out"``, bias sliced too) or inputs (``side="in"``)."""
    weight = _weight_in_out(layer).detach()  # (in, out)
    bias = None if layer.bias is None else layer.bias.detach()
    keep = keep.to(weight.device)
    if side == "out":
        weight = weight.index_select(1, keep)
        bias = None if bias is None else bias.index_select(0, keep)
    else:
        weight = weight.index_select(0, keep)
    n_in, n_out = weight.shape
    if isinstance(layer, Conv1D):
        new = Conv1D(n_out, n_in)
        new.weight = nn.Parameter(weight.clone().contiguous(), requires_grad=False)
        new.bias = nn.Parameter(bias.clone() if bias is not None else torch.zeros(n_out, dtype=weight.dtype,
                                                                                   device=weight.device),
                                requires_grad=False)
        return new
    new = nn.Linear(n_in, n_out, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight = nn.Parameter(weight.T.clone().contiguous(), requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return new


def _set(block: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, name, module)


def _units_index(n_features: int, units: int, unit_shape: tuple[int, ...], unit_axis: int,
                 kept_units: torch.Tensor) -> torch.Tensor:
    """Feature indices of the kept units: features viewed as ``unit_shape`` (with ``units`` inserted at
    ``unit_axis``), the kept units selected on that axis, flattened back in order."""
    shape = list(unit_shape)
    shape.insert(unit_axis, units)
    return torch.arange(n_features).view(*shape).index_select(unit_axis, kept_units).flatten()


# ----------------------------------------------------------------------------------------------------
# importance on the calibration split (untimed)
# ----------------------------------------------------------------------------------------------------


def importance(model: nn.Module, layout: Layout, batches: list[Any]) -> list[dict[str, torch.Tensor]]:
    """Per block: ``heads`` (query heads,) = mean over calibration tokens of ``|| x_h W_o[:, h] ||`` and
    ``neurons`` (FFN width,) = mean ``|a_j|`` x ``|| W_out[j, :] ||``, padding tokens excluded.

    Runs forward passes of ``model`` on ``batches`` with hooks on each block's two out-projections.
    """
    heads, _ = _head_counts(model.config)
    blocks = _blocks(model)
    sums = [{"heads": torch.zeros(heads), "neurons": None, "tokens": 0.0} for _ in blocks]
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def token_weights(x: torch.Tensor) -> torch.Tensor:  # (B, T) 1 for real tokens
        mask = state["mask"]
        return torch.ones(x.shape[:-1], device=x.device) if mask is None or mask.shape != x.shape[:-1] \
            else mask.to(x.device, torch.float32)

    def on_attention(i: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].float()  # (B, T, heads * head_dim)
            w = _weight_in_out(module).float()  # (heads * head_dim, H)
            per_head = torch.einsum("btnd,ndh->btnh", x.view(*x.shape[:-1], heads, -1), w.view(heads, -1, w.shape[1]))
            weights = token_weights(x)
            sums[i]["heads"] += (per_head.norm(dim=-1) * weights[..., None]).sum((0, 1)).cpu()
            sums[i]["tokens"] += float(weights.sum())
        return hook

    def on_ffn(i: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            a = args[0].float()  # (B, T, I)
            column_norm = _weight_in_out(module).float().norm(dim=1)  # (I,)
            score = (a.abs() * token_weights(a)[..., None]).sum((0, 1)) * column_norm
            sums[i]["neurons"] = score.cpu() if sums[i]["neurons"] is None else sums[i]["neurons"] + score.cpu()
        return hook

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.get_submodule(layout.out_projection).register_forward_pre_hook(on_attention(i)))
        handles.append(block.get_submodule(layout.ffn_out).register_forward_pre_hook(on_ffn(i)))
    try:
        with torch.inference_mode():
            for batch in batches:
                state["mask"] = batch.inputs.get("attention_mask")
                model(**batch.inputs)
    finally:
        for handle in handles:
            handle.remove()
    tokens = [max(s["tokens"], 1.0) for s in sums]
    return [{"heads": s["heads"] / t, "neurons": s["neurons"] / t} for s, t in zip(sums, tokens)]


# ----------------------------------------------------------------------------------------------------
# the two methods, each on a deep copy
# ----------------------------------------------------------------------------------------------------


def prune_structured(model: nn.Module, family: str, scores: list[dict[str, torch.Tensor]], heads_fraction: float,
                     neurons_fraction: float) -> tuple[nn.Module, dict[str, Any]]:
    """A deep copy of ``model`` with the least important heads (KV groups) and FFN neurons of every block removed.

    Returns the copy and what was removed: units and neurons per layer, totals, parameters before and after.
    """
    # 1. How many units go per layer (uniform: the same count everywhere, at least one kept).
    layout = LAYOUTS[family]
    pruned = copy.deepcopy(model).eval()
    heads, kv_heads = _head_counts(model.config)
    group = heads // kv_heads  # query heads per KV unit
    remove_units = min(round(heads_fraction * kv_heads), kv_heads - 1)
    blocks = _blocks(pruned)
    per_layer = []
    for index, block in enumerate(blocks):
        # 2. The kept units (KV groups with their query heads) and neurons of this block, by importance.
        unit_scores = scores[index]["heads"].view(kv_heads, group).sum(1)
        kept_units = torch.sort(torch.topk(unit_scores, kv_heads - remove_units).indices).values
        neuron_scores = scores[index]["neurons"]
        width = neuron_scores.numel()
        remove_neurons = min(round(neurons_fraction * width), width - 1)
        kept_neurons = torch.sort(torch.topk(neuron_scores, width - remove_neurons).indices).values
        # 3. Slice the attention: query rows by KV unit, key/value (or fused) rows, output columns.
        out = block.get_submodule(layout.out_projection)
        n_q = _weight_in_out(out).shape[0]
        kept_queries = _units_index(n_q, kv_heads, (-1,), 0, kept_units)
        if remove_units:
            if layout.q:
                _set(block, layout.q, slice_layer(block.get_submodule(layout.q), kept_queries, "out"))
            for path, shape, axis in layout.in_projections:
                layer = block.get_submodule(path)
                keep = _units_index(_weight_in_out(layer).shape[1], kv_heads, shape, axis, kept_units)
                _set(block, path, slice_layer(layer, keep, "out"))
            _set(block, layout.out_projection, slice_layer(out, kept_queries, "in"))
            _set_head_counts(block.get_submodule(layout.attention), (kv_heads - remove_units) * group,
                             kv_heads - remove_units, n_q // heads)
        # 4. Slice the FFN: in-projections' rows, the out-projection's columns.
        if remove_neurons:
            for path in layout.ffn_in:
                _set(block, path, slice_layer(block.get_submodule(path), kept_neurons, "out"))
            _set(block, layout.ffn_out, slice_layer(block.get_submodule(layout.ffn_out), kept_neurons, "in"))
        per_layer.append({"layer": index, "heads_kept": int(len(kept_units) * group), "neurons_kept": len(kept_neurons),
                          "removed_head_importance_share": _share_removed(scores[index]["heads"].view(kv_heads, group)
                                                                          .sum(1), kept_units),
                          "removed_neuron_importance_share": _share_removed(neuron_scores, kept_neurons)})
    # 5. What changed.
    pruned.requires_grad_(False)
    widths = [s["neurons"].numel() for s in scores]
    before, after = describe_module(model), describe_module(pruned)
    return pruned, {
        "heads_total": heads * len(blocks), "heads_removed": remove_units * group * len(blocks),
        "kv_heads_per_layer": kv_heads, "query_heads_per_kv_head": group,
        "heads_removed_per_layer": remove_units * group,
        "neurons_total": sum(widths), "neurons_removed": sum(widths) - sum(p["neurons_kept"] for p in per_layer),
        "parameters_before": before["parameters"], "parameters_after": after["parameters"],
        "parameters_kept_fraction": after["parameters"] / before["parameters"],
        "bytes_before": before["model_bytes"], "bytes_after": after["model_bytes"], "per_layer": per_layer,
    }


def _share_removed(scores: torch.Tensor, kept: torch.Tensor) -> float:
    """Share of a layer's total importance held by the removed units."""
    total = float(scores.sum())
    return 0.0 if total <= 0 else 1.0 - float(scores[kept].sum()) / total


def _set_head_counts(attention: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    """The per-module counts a forward reads (GPT-2 ``split_size``, OPT ``num_heads``, BERT ``all_head_size``)."""
    for name in _HEAD_COUNT_ATTRS:
        if hasattr(attention, name):
            setattr(attention, name, heads)
    if hasattr(attention, "num_key_value_heads"):
        attention.num_key_value_heads = kv_heads
    for name in ("split_size", "all_head_size"):
        if hasattr(attention, name):
            setattr(attention, name, heads * head_dim)


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every nn.Linear / Conv1D inside the blocks (embeddings, LM head and task head stay dense and whole)."""
    return [(name, module) for name, module in _blocks(model).named_modules()
            if isinstance(module, (nn.Linear, Conv1D))]


def prune_magnitude(model: nn.Module, sparsity: float) -> tuple[nn.Module, dict[str, Any]]:
    """A deep copy with the smallest ``|w|`` of every block linear layer zeroed (per layer), same dense shapes.

    Returns the copy and: layers, weights and zeros in them, the dense bytes of those weights as stored and the
    bytes torch's CSR would take (int64 indices, as ``to_sparse_csr`` stores them; and with int32 indices).
    """
    from torch.nn.utils import prune

    pruned = copy.deepcopy(model).eval()
    layers = _linear_layers(pruned)
    weights = zeros = dense = csr = csr32 = 0
    for _, layer in layers:
        prune.l1_unstructured(layer, "weight", amount=sparsity)
        prune.remove(layer, "weight")
        w = layer.weight.detach()
        with warnings.catch_warnings():  # torch calls its sparse CSR support beta on every conversion
            warnings.simplefilter("ignore", UserWarning)
            sparse = w.to_sparse_csr()
        weights += w.numel()
        zeros += int((w == 0).sum())
        dense += w.numel() * w.element_size()
        csr += sum(t.numel() * t.element_size() for t in (sparse.values(), sparse.col_indices(), sparse.crow_indices()))
        csr32 += sparse.values().numel() * (w.element_size() + 4) + sparse.crow_indices().numel() * 4
    pruned.requires_grad_(False)
    after = describe_module(pruned)
    return pruned, {
        "linear_layers": len(layers), "weights_in_pruned_layers": weights, "zeros": zeros,
        "sparsity_achieved": zeros / weights if weights else 0.0,
        "model_zero_share": zeros / after["parameters"],
        "pruned_layers_dense_bytes": dense, "pruned_layers_csr_bytes": csr, "pruned_layers_csr_int32_bytes": csr32,
        "parameters_before": after["parameters"], "parameters_after": after["parameters"],
        "parameters_kept_fraction": 1.0, "bytes_before": after["model_bytes"], "bytes_after": after["model_bytes"],
    }


def recover(model: nn.Module, kind: str, batches: list[Any], steps: int, learning_rate: float,
            pad_token_id: int | None) -> dict[str, Any]:
    """A short fine-tune of the pruned copy on the calibration batches (one batch per AdamW step, cycling):
    LM loss for causal LMs, cross-entropy on the labels for classifiers. Zeros stay zero (magnitude).

    Returns steps, the mean calibration loss before and after, and the seconds it took.
    """
    import time

    start_s = time.perf_counter()
    masks = {name: layer.weight != 0 for name, layer in _linear_layers(model)}
    sparse = any(not bool(m.all()) for m in masks.values())

    def loss_of(batch: Any) -> torch.Tensor:
        inputs = dict(batch.inputs)
        if kind == "causal_lm":
            labels = inputs["input_ids"].clone()
            if "attention_mask" in inputs:
                labels[inputs["attention_mask"] == 0] = -100
        else:
            labels = torch.tensor(batch.labels, device=inputs["input_ids"].device)
        return model(**inputs, labels=labels).loss

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_of(b)) for b in batches) / len(batches)

    before = mean_loss()
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.is_floating_point()], lr=learning_rate)
    model.train()
    try:
        with torch.enable_grad():
            for step in range(steps):
                loss = loss_of(batches[step % len(batches)])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if sparse:
                    with torch.no_grad():
                        for name, layer in _linear_layers(model):
                            layer.weight.mul_(masks[name])
    finally:
        model.eval()
        model.requires_grad_(False)
    return {"steps": steps, "loss_before": before, "loss_after": mean_loss(), "items": sum(b.size for b in batches),
            "learning_rate": learning_rate, "seconds": time.perf_counter() - start_s,
            "loss": "LM loss" if kind == "causal_lm" else "cross-entropy on the calibration labels"}


# ----------------------------------------------------------------------------------------------------
# the technique
# ----------------------------------------------------------------------------------------------------


def _fraction(value: float, name: str) -> None:
    if not 0.0 <= value < 1.0:
        raise TechniqueParamError(f"pruning parameter {name}={value!r} is not in [0, 1): give the share removed, "
                                  "e.g. 0.25")


@register
class Pruning(Technique):
    """Structured pruning (heads and FFN neurons removed: smaller matrices) or magnitude (zeros, same shapes)."""

    name = "pruning"
    applies_to = ("causal_lm", "classifier")
    title = "pruning"
    description = ("remove attention heads and FFN neurons by calibration importance (smaller dense matrices); "
                   "or zero the smallest weights (magnitude: same dense work)")
    examples = (
        {"model": "zoo:code-target", "workload": "code-prompts",
         "params": {"heads_fraction": 0.25, "neurons_fraction": 0.25, "quality_tokens": 64}},
        {"model": "zoo:code-classifier", "workload": "code-snippets",
         "params": {"method": "magnitude", "magnitude_sparsity": 0.5}},
    )
    params = {
        "method": Param(str, "structured", "structured: remove heads and FFN neurons (smaller matrices, real "
                        "speedup on dense kernels); magnitude: zero the smallest weights (same dense work, fewer "
                        "bytes only in a sparse format)", choices=METHODS),
        "heads_fraction": Param(float, 0.25, "structured: share of attention heads removed in every layer (whole KV "
                                "groups under grouped attention, rounded, one kept); more is faster and costs "
                                "quality", minimum=0.0),
        "neurons_fraction": Param(float, 0.25, "structured: share of FFN neurons removed in every layer; more is "
                                  "faster and costs quality", minimum=0.0),
        "magnitude_sparsity": Param(float, 0.5, "magnitude: share of each block linear layer's weights zeroed",
                                    minimum=0.0),
        "recovery_steps": Param(int, 0, "AdamW steps fine-tuning the pruned copy on the calibration split (LM "
                                "loss / calibration labels); recovers quality, lengthens prepare", minimum=0),
        "recovery_learning_rate": Param(float, 5e-5, "recovery fine-tune learning rate", minimum=1e-10),
        "quality_tokens": Param(int, 2048, "causal LMs: tokens of the workload's text scored for perplexity and KL "
                                "(untimed); more is steadier and slower", minimum=16),
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        for name in ("heads_fraction", "neurons_fraction", "magnitude_sparsity"):
            _fraction(self.config[name], name)

    @classmethod
    def settings_words(cls, params: dict[str, Any]) -> list[str]:
        """``["25% heads", "25% neurons"]`` / ``["50% of weights"]``, then other non-default settings."""
        config = {key: p.default for key, p in cls.params.items()} | {k: v for k, v in params.items() if v is not None}
        if config["method"] == "magnitude":
            words = [f"{100 * float(config['magnitude_sparsity']):.0f}% of weights"]
        else:
            words = [f"{100 * float(config['heads_fraction']):.0f}% heads",
                     f"{100 * float(config['neurons_fraction']):.0f}% neurons"]
        shown = {"method", "heads_fraction", "neurons_fraction", "magnitude_sparsity"}
        return words + super().settings_words({k: v for k, v in params.items() if k not in shown})

    @classmethod
    def display_name(cls, params: dict[str, Any], draft: str | None = None) -> str:
        """``structured pruning (25% heads, 25% neurons)`` / ``magnitude pruning (50% of weights)``."""
        method = params.get("method") or cls.params["method"].default
        return f"{method} pruning ({', '.join(cls.settings_words(params))})"

    def check(self, facts: Facts, spec: Any) -> str | None:
        reason = super().check(facts, spec)
        if reason:
            return reason
        model = facts.model
        family, arch = model.family, model.architecture or model.family
        if family not in LAYOUTS:
            why = f" ({NOT_SUPPORTED[family]})" if family in NOT_SUPPORTED else ""
            return (f"pruning does not know where {arch} ({family}) keeps its heads and FFN neurons{why}: supported "
                    f"families are {', '.join(LAYOUTS)}")
        needs = self.config["method"] == "structured" or self.config["recovery_steps"] > 0
        if needs and facts.calibration_items < 1:
            return (f"pruning ranks heads and neurons (or fine-tunes) on calibration inputs that are never timed, and "
                    f"the workload {spec.workload.name!r} has none to spare: lower max_items or add lines to the file")
        return None

    # -- prepare (untimed) ----------------------------------------------------------------------
    def prepare(self, trial: Trial) -> None:
        # 1. The pruned copy (the shared model is only read).
        model, cfg = trial.model, self.config
        self._model, self._spec = model, trial.spec
        family = getattr(model.model.config, "model_type", None)
        if family not in LAYOUTS:
            raise TechniqueParamError(f"pruning has no layout for {type(model.model).__name__} ({family})")
        self._scores = None
        if cfg["method"] == "structured":
            self._scores = importance(model.model, LAYOUTS[family], trial.calibration)
            self._pruned, self._done = prune_structured(model.model, family, self._scores, cfg["heads_fraction"],
                                                        cfg["neurons_fraction"])
        else:
            self._pruned, self._done = prune_magnitude(model.model, cfg["magnitude_sparsity"])
        # 2. The optional recovery fine-tune on the calibration split.
        self._recovery = None
        if cfg["recovery_steps"] > 0:
            if model.kind == "classifier" and any(b.labels is None for b in trial.calibration):
                raise TechniqueParamError("pruning recovery_steps on a classifier needs labelled calibration inputs, "
                                          "and this workload has none: set recovery_steps=0")
            self._recovery = recover(self._pruned, model.kind, trial.calibration, cfg["recovery_steps"],
                                     cfg["recovery_learning_rate"], model.tokenizer.pad_token_id)
        # 3. Quality needing both models side by side (untimed), on the timed inputs' text.
        self._quality = quality.copy_quality(model, self._pruned, trial.texts, trial.spec.device,
                                             cfg["quality_tokens"])

    def run(self, batch: Any) -> CallOutput:
        if self._model.kind == "causal_lm":
            return generate(self._pruned, self._model.tokenizer, batch, self._spec.workload.max_new_tokens)
        return classify(self._pruned, batch)

    # -- report ---------------------------------------------------------------------------------
    def report(self, outcome: Outcome) -> TechniqueReport:
        done, q = self._done, self._quality
        internals: dict[str, Any] = {"method": self.config["method"], **done, "recovery": self._recovery}
        if self._scores is not None:
            internals["importance"] = _importance_summary(self._scores)
            internals["selection"] = ("uniform per layer: each layer's least important units removed, ranked on the "
                                      "calibration split (never the timed inputs)")
        metrics = quality.copy_quality_metrics(q)
        metrics.append(Metric("parameters_kept_percent", 100.0 * done["parameters_kept_fraction"], "%", None,
                              "parameters kept", headline=False))
        return TechniqueReport(lossless=False, model_bytes=done["bytes_after"],
                               bytes_read_per_token=done["bytes_after"], quality=metrics, internals=internals,
                               features=self.features(self.config, self._model.info, None), headline=self._headline())

    def _headline(self) -> str:
        done = self._done
        if self.config["method"] == "magnitude":
            return (f"{100 * done['sparsity_achieved']:.0f}% of block weights zeroed in the same dense shapes: dense "
                    f"kernels do the same work (CSR would take {done['pruned_layers_csr_bytes'] / 1e6:.2f} MB, "
                    f"{done['pruned_layers_csr_int32_bytes'] / 1e6:.2f} MB with int32 indices, against "
                    f"{done['pruned_layers_dense_bytes'] / 1e6:.2f} MB dense)")
        recovered = (f"; {self._recovery['steps']} recovery steps, calibration loss {self._recovery['loss_before']:.3f}"
                     f" -> {self._recovery['loss_after']:.3f}") if self._recovery else ""
        return (f"removed {done['heads_removed']} of {done['heads_total']} heads and {done['neurons_removed']} of "
                f"{done['neurons_total']} FFN neurons: {100 * done['parameters_kept_fraction']:.1f}% of parameters "
                f"kept, smaller dense matrices" + recovered)

    @classmethod
    def features(cls, params: dict[str, Any], model: dict[str, Any], draft: dict[str, Any] | None) -> dict[str, Any]:
        """compute_fraction: parameters kept / parameters, estimated from the model's size alone (blocks of
        12 H^2: 4 H^2 attention, 8 H^2 FFN; the rest of the parameters, embeddings standing for the LM head's
        work, untouched); 1.0 for magnitude pruning, whose dense kernels do all the work."""
        config = {key: p.default for key, p in cls.params.items()} | {k: v for k, v in params.items() if v is not None}
        if config["method"] == "magnitude":
            return {"compute_fraction": 1.0}
        heads, neurons = float(config["heads_fraction"]), float(config["neurons_fraction"])
        layers, hidden, total = (model or {}).get("layers"), (model or {}).get("hidden_size"), (model or {}).get(
            "parameters")
        if layers and hidden and total:
            removed = layers * hidden ** 2 * (4 * heads + 8 * neurons)
            return {"compute_fraction": max(0.0, 1.0 - removed / total)}
        return {"compute_fraction": 1.0 - heads / 3 - 2 * neurons / 3}

    def release(self) -> None:
        self._pruned = None


def _importance_summary(scores: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Per kind (heads, neurons): min, mean and max importance over every layer's units."""
    out = {}
    for kind in ("heads", "neurons"):
        values = torch.cat([s[kind].flatten() for s in scores])
        out[kind] = {"min": float(values.min()), "mean": float(values.mean()), "max": float(values.max()),
                     "per_layer_mean": [float(s[kind].mean()) for s in scores]}
    return out
