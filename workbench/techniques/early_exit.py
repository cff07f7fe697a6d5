"""Early exit: stop the forward pass at the first layer that is sure enough.

Classifiers (DeeBERT / PABEE style): one small linear exit head per intermediate layer reads the
layer's hidden states pooled the way the model pools (:func:`exit_pooling`: the mean over non-padding
tokens for a sentence encoder whose sentence-transformers pooling config says so, else the first token
its own classification head reads); the last layer always uses the model's own head, so a threshold that never
exits reproduces the model's predictions exactly. The heads are trained in :meth:`EarlyExit.prepare`
on one half of the trial's *calibration* split (labelled inputs of the same workload that are never
timed) with the backbone frozen; their per-layer accuracy is then reported on the timed inputs' labels. A row that exits
leaves the batch at that layer, so the remaining layers run on fewer rows.

Policies: ``confidence`` exits at the first layer whose exit head's top softmax probability exceeds
``threshold``; ``patience`` (PABEE) exits once ``patience`` consecutive layers predict the same label.
:meth:`prepare` also measures a threshold curve side by side on the other half (every threshold
and the full model interleaved: accuracy, mean layers executed, latency, speedup) and picks the
operating point there: the fastest setting that loses at most ``max_accuracy_drop_points`` of accuracy
against the full model. Nothing is chosen on the inputs that are timed.

Example:
    >>> from workbench.techniques.early_exit import EarlyExit
    >>> EarlyExit(threshold=0.9).config["policy"]
    'confidence'
    >>> EarlyExit(policy="patience", patience=2).params["patience"].minimum
    1
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from workbench import quality
from workbench.errors import NotApplicableError
from workbench.measure import CallOutput, run_interleaved, summarize_samples
from workbench.techniques._execute import classify, generate
from workbench.techniques._quantize import SCHEMES, quantize_copy, why_not_scheme
from workbench.techniques._layers import (DECODER_LAYOUTS, ClassifierStack, DecoderStack, classifier_stack,
                                          decoder_stack, why_not_decoder, why_not_encoder)
from workbench.techniques.base import (ExpertRule, Facts, Metric, Outcome, Param, Technique, TechniqueParamError,
                                       TechniqueReport, Trial, register)

FULL = "full"  # name of the full-model variant in the threshold curve
#: Causal-LM families whose layer stack early exit can drive (GPT-2's absolute positions and the Llama
#: layout's rotary ones, see _layers.DECODER_LAYOUTS): checked from config.json before any weight loads.
DECODER_FAMILIES = tuple(DECODER_LAYOUTS)
MIN_CALIBRATION_ITEMS = 2  # labelled calibration inputs needed to train exit heads


def parse_thresholds(text: str) -> list[float]:
    """Comma-separated thresholds in [0, 1], sorted and deduplicated; one clear line when malformed.

    Example:
        >>> parse_thresholds("0.9, 0.5,0.9")
        [0.5, 0.9]
    """
    try:
        values = sorted({float(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        raise TechniqueParamError(f"early_exit parameter thresholds={text!r} is not a comma-separated list of "
                                  "numbers: use e.g. thresholds=0.5,0.7,0.9") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise TechniqueParamError(f"early_exit parameter thresholds={text!r} needs one or more values in [0, 1]: "
                                  "use e.g. thresholds=0.5,0.7,0.9")
    return values


class ExitHeads(nn.Module):
    """Linear exit heads, one per intermediate layer.

    Shapes: ``weight`` (L-1, C, H), ``bias`` (L-1, C) for L layers, C labels, H hidden.
    """

    def __init__(self, exits: int, labels: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(exits, labels, hidden))
        self.bias = nn.Parameter(torch.zeros(exits, labels))

    def logits(self, layer: int, pooled: torch.Tensor) -> torch.Tensor:
        """(b, C) logits of exit head ``layer`` (0-based) for pooled states (b, H)."""
        return pooled.to(self.weight.dtype) @ self.weight[layer].T + self.bias[layer]

    def all_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, L-1, C) logits of every head for features (N, L-1, H)."""
        return torch.einsum("nlh,lch->nlc", features.to(self.weight.dtype), self.weight) + self.bias


POOLINGS = ("auto", "first", "mean")  # what classifier exit heads read (see exit_pooling)
_ST_POOLING_FILE = "1_Pooling/config.json"  # sentence-transformers' pooling config, beside the weights


def pool(hidden: torch.Tensor, tokens_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """(b, T, H) hidden states -> (b, H): the first token, or the mean over non-padding tokens
    (``tokens_mask`` (b, T), 1 for a real token; None: every token is real)."""
    if pooling == "first":
        return hidden[:, 0]
    if tokens_mask is None:
        return hidden.mean(1)
    weights = tokens_mask.to(hidden.dtype)[..., None]  # (b, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def exit_pooling(location: str, family: str | None, requested: str = "auto") -> dict[str, str]:
    """How exit heads pool a layer's hidden states, decided from the model's files, and why.

    ``auto``: ``mean`` when the folder holds a sentence-transformers pooling config that mean-pools
    (``1_Pooling/config.json``, ``pooling_mode_mean_tokens``: a sentence encoder, whose first token is
    not what it was trained to summarise the input in); ``first`` when that config pools the CLS token,
    and otherwise (the first token is what the model's own classification head reads). ``first`` and
    ``mean`` are taken as given.

    Example:
        >>> exit_pooling("/nonexistent", "bert")["pooling"]
        'first'
    """
    if requested != "auto":
        return {"pooling": requested, "decided_by": f"the pooling={requested} parameter"}
    import json
    from pathlib import Path

    path = Path(location) / _ST_POOLING_FILE
    if path.is_file():
        config = json.loads(path.read_text())
        if config.get("pooling_mode_mean_tokens"):
            return {"pooling": "mean", "decided_by": f"{_ST_POOLING_FILE}: pooling_mode_mean_tokens (a sentence "
                                                     "encoder; mean over non-padding tokens)"}
        if config.get("pooling_mode_cls_token"):
            return {"pooling": "first", "decided_by": f"{_ST_POOLING_FILE}: pooling_mode_cls_token"}
    from workbench.techniques._layers import FIRST_TOKEN_HEADS

    head = FIRST_TOKEN_HEADS.get(family or "", "the first token")
    return {"pooling": "first", "decided_by": f"the model's own classification head reads the first token ({head}); "
                                              f"no sentence-transformers pooling config ({_ST_POOLING_FILE})"}


def train_exit_heads(features: torch.Tensor, labels: torch.Tensor, num_labels: int, steps: int,
                     learning_rate: float, seed: int) -> tuple[ExitHeads, dict[str, Any]]:
    """Fit the exit heads on frozen pooled features of the calibration split.

    Args:
        features: (N, L-1, H) pooled hidden states after each intermediate layer, float32.
        labels: (N,) gold label indices.
        steps: full-batch Adam steps.

    Returns:
        The heads and ``{"steps", "seconds", "items", "per_layer_train_accuracy"}``.
    """
    start_s = time.perf_counter()
    n_items, exits, hidden = features.shape
    generator = torch.Generator().manual_seed(seed)
    heads = ExitHeads(exits, num_labels, hidden)
    with torch.no_grad():
        heads.weight.normal_(0.0, 0.02, generator=generator)
    optimizer = torch.optim.Adam(heads.parameters(), lr=learning_rate, weight_decay=1e-4)
    for _ in range(steps):
        logits = heads.all_logits(features)  # (N, L-1, C)
        loss = nn.functional.cross_entropy(logits.reshape(-1, num_labels), labels.repeat_interleave(exits))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    heads.requires_grad_(False)
    with torch.no_grad():
        train_accuracy = (heads.all_logits(features).argmax(-1) == labels[:, None]).float().mean(0)
    return heads, {"steps": steps, "seconds": time.perf_counter() - start_s, "items": n_items,
                   "per_layer_train_accuracy": train_accuracy.tolist()}


def calm_generate(stack: DecoderStack, input_ids: torch.Tensor, max_new_tokens: int, threshold: float,
                  exit_layers: frozenset[int], eos_token_id: int | None, cache: Any = None) -> dict[str, Any]:
    """Greedy decoding, batch 1, with CALM-style per-token exits through the model's own LM head.

    After each layer in ``exit_layers`` (1-based, below the last) the final norm and LM head read the
    new token's hidden state; when the top probability exceeds ``threshold`` the token is emitted there.
    Its hidden state waits as the input of the next layer and is run through the deeper layers later,
    in one call together with the next token that reaches them (each layer's cache entry lags until
    then), so every cached key/value is the one the full model computes for those tokens.

    Args:
        input_ids: (1, T) prompt ids, no padding.
        cache: an empty cache to fill (``stack.new_cache()`` when None); left holding every layer's
            entries, which lag where tokens exited (a test reads them).

    Returns:
        ``tokens`` (new ids, cut after end-of-sequence), ``exit_layers`` (1-based, per new token),
        ``first_output_at`` (perf_counter seconds) and ``block_calls`` (layer forward calls made).
    """
    num_layers = stack.num_layers
    cache = stack.new_cache() if cache is None else cache
    pending: list[torch.Tensor | None] = [None] * (num_layers + 1)  # pending[j]: (1, n, H) inputs waiting for layer j
    tokens: list[int] = []
    exits: list[int] = []
    block_calls, first_output_at = 0, None
    with torch.inference_mode():
        # 1. Prefill: the prompt through every layer.
        hidden = stack.embed(input_ids, 0)  # (1, T, H)
        for index in range(num_layers):
            hidden = stack.layer(index, hidden, cache)
        block_calls += num_layers
        token, exit_layer, position = int(stack.logits(hidden[:, -1]).argmax(-1)), num_layers, input_ids.shape[1]
        while True:
            tokens.append(token)
            exits.append(exit_layer)
            if first_output_at is None:
                first_output_at = time.perf_counter()
            if len(tokens) >= max_new_tokens or token == eos_token_id:
                break
            # 2. One new token, layer by layer; waiting tokens join it at the layer they wait for.
            hidden = stack.embed(torch.tensor([[token]], device=input_ids.device), position)  # (1, 1, H)
            position += 1
            exit_layer = num_layers
            for index in range(num_layers):
                if pending[index] is not None:
                    hidden = torch.cat([pending[index], hidden], dim=1)  # (1, n+1, H), in token order
                    pending[index] = None
                hidden = stack.layer(index, hidden, cache)
                block_calls += 1
                layer = index + 1
                if layer < num_layers and layer in exit_layers:
                    # 3. Confident enough here: emit, and leave this token's state for the deeper layers.
                    probs = stack.logits(hidden[:, -1]).softmax(-1)  # (1, V)
                    top, label = probs.max(-1)
                    if float(top) > threshold:
                        exit_layer = layer
                        waiting = pending[layer]
                        pending[layer] = hidden if waiting is None else torch.cat([waiting, hidden], dim=1)
                        break
            token = int(label) if exit_layer < num_layers else int(stack.logits(hidden[:, -1]).argmax(-1))
    return {"tokens": tokens, "exit_layers": exits, "first_output_at": first_output_at, "block_calls": block_calls}


def _config_json(model: Any) -> dict[str, Any]:
    """config.json of a model's folder (plan time: nothing loaded), with the facts' family and architecture."""
    import json
    from pathlib import Path

    path = Path(model.location) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return {**config, "model_type": model.family, "architectures": [model.architecture or model.family]}


def _halves(batches: list[Any]) -> tuple[list[Any], list[Any]]:
    """Alternate batches into two disjoint halves; one batch cannot be split and serves both (said so
    in the heads' report by ``curve_items`` equal to ``items``)."""
    if len(batches) < 2:
        return batches, batches
    return batches[0::2], batches[1::2]


def exit_logits(stack: DecoderStack, input_ids: torch.Tensor, threshold: float,
                exit_layers: frozenset[int]) -> torch.Tensor:
    """Teacher-forced next-token logits (T, V) of CALM-style early exit on ``input_ids`` (1, T).

    Each position takes the logits of the first layer in ``exit_layers`` whose top probability exceeds
    ``threshold`` (through the model's own final norm and head), else the last layer's. Every cached
    key/value in :func:`calm_generate` is the full model's, so this is the distribution that decoding
    samples its greedy token from at each position (except the first new token, which decoding always
    takes from the last layer).
    """
    with torch.inference_mode():
        out = stack.model(input_ids=input_ids, output_hidden_states=True)
        chosen = out.logits[0].float().clone()  # (T, V): the last layer's
        decided = torch.zeros(input_ids.shape[1], dtype=torch.bool, device=input_ids.device)
        for layer in sorted(exit_layers):  # hidden_states[layer]: output of block `layer`, before the final norm
            logits = stack.logits(out.hidden_states[layer][0]).float()  # (T, V)
            confident = (logits.softmax(-1).max(-1).values > threshold) & ~decided
            chosen[confident] = logits[confident]
            decided |= confident
    return chosen


@register
class EarlyExit(Technique):
    """Exit heads per layer with a confidence or patience policy; threshold curve measured in prepare."""

    name = "early_exit"
    applies_to = ("classifier", "causal_lm")
    description = "stop at the first layer that is sure enough (exit heads per layer, threshold curve in prepare)"
    title = "early exit"
    examples = (
        {"model": "zoo:code-classifier", "workload": "code-snippets",
         "params": {"thresholds": "0.5,0.9", "train_steps": 50, "curve_repeats": 1}},
        {"model": "zoo:code-target", "workload": "code-prompts", "params": {"thresholds": "0.2,0.9", "curve_repeats": 1}},
    )
    params = {
        "policy": Param(str, "confidence", "confidence: exit when an exit head is sure enough; patience (PABEE): "
                        "exit when consecutive layers agree", choices=("confidence", "patience")),
        "threshold": Param(float, None, "confidence policy: exit when the top probability exceeds this (1.0 never "
                           "exits); lower exits earlier and risks accuracy; unset: the curve's operating point",
                           minimum=0.0),
        "patience": Param(int, None, "patience policy: exit once this many consecutive layers predict the same "
                          "label; smaller exits earlier; unset: the curve's operating point", minimum=1),
        "thresholds": Param(str, "0.5,0.6,0.7,0.8,0.9,0.95,0.99", "comma-separated thresholds swept for the "
                            "curve in prepare; more points, longer prepare"),
        "max_accuracy_drop_points": Param(float, 1.0, "the operating point is the fastest setting losing at most "
                                          "this many accuracy points against the full model", minimum=0.0),
        "train_steps": Param(int, 300, "Adam steps training the exit heads (frozen backbone); more fits better, "
                             "prepares slower", minimum=1),
        "learning_rate": Param(float, 0.01, "Adam learning rate of the exit heads", minimum=1e-8),
        "curve_repeats": Param(int, 3, "timed passes per curve point in prepare; more, steadier speedups",
                               minimum=1),
        "seed": Param(int, 0, "seeds the exit heads' initialisation"),
        "quantization": Param(str, None, "combined variant: run early exit on a quantized copy of the model "
                              "(a quantization scheme, e.g. int8-dynamic); the baseline stays full precision",
                              choices=tuple(SCHEMES)),
        "check_every": Param(int, None, "causal LMs: test for an exit after every this many layers (each test "
                             "costs an LM-head pass); unset: every max(1, layers // 6)", minimum=1),
        "pooling": Param(str, "auto", "classifiers: what the exit heads read: auto (as the model pools, from its "
                         "files: a sentence-transformers pooling config's mean, else the first token its own head "
                         "reads), first, or mean (over non-padding tokens)", choices=POOLINGS),
        "quality_tokens": Param(int, 2048, "causal LMs: tokens of the workload's text scored for perplexity and KL "
                                "(untimed); more is steadier and slower", minimum=16),
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        config = self.config
        if config["threshold"] is not None and config["threshold"] > 1.0:
            raise TechniqueParamError(f"early_exit parameter threshold={config['threshold']!r} is above 1: "
                                      "use a probability in [0, 1] (1.0 never exits)")
        if config["policy"] == "confidence" and config["patience"] is not None:
            raise TechniqueParamError("early_exit parameter patience applies to policy=patience only: "
                                      "drop patience or set policy=patience")
        if config["policy"] == "patience" and config["threshold"] is not None:
            raise TechniqueParamError("early_exit parameter threshold applies to policy=confidence only: "
                                      "drop threshold or set policy=confidence")
        self.thresholds_ = parse_thresholds(config["thresholds"])

    def check(self, facts: Facts, spec: Any) -> str | None:
        reason = super().check(facts, spec)
        if not reason and self.config["quantization"]:
            reason = why_not_scheme(self.config["quantization"], spec.device)
        if reason:
            return reason
        model = facts.model
        if model.layers is not None and model.layers < 2:
            return f"early_exit needs a model with 2 or more layers; {model.name!r} has {model.layers}"
        if model.kind == "classifier":
            reason = why_not_encoder(model.family, model.architecture)
            if reason:
                return f"{reason} ({model.name!r})"
            if facts.calibration_items < MIN_CALIBRATION_ITEMS:
                return (f"early_exit trains exit heads on labelled calibration inputs that are never timed, and the "
                        f"workload {spec.workload.name!r} has {facts.calibration_items} to spare (at least "
                        f"{MIN_CALIBRATION_ITEMS} needed): lower max_items or add lines to the file")
            return None
        reason = why_not_decoder(_config_json(model))
        if reason:
            return f"{reason} ({model.name!r})"
        if self.config["policy"] != "confidence":
            return "early_exit on causal LMs uses policy=confidence (CALM); patience applies to classifiers"
        if self.config["pooling"] != "auto":
            return "early_exit parameter pooling applies to classifiers (causal LMs exit through the LM head): drop it"
        if spec.workload.batch_size != 1:
            return (f"early_exit on causal LMs decodes batch size 1 only, not batch_size={spec.workload.batch_size}:"
                    " set batch_size=1")
        if facts.calibration_items < 1:
            return (f"early_exit chooses its threshold on calibration prompts that are never timed, and the workload "
                    f"{spec.workload.name!r} has none to spare: lower max_items or add lines to the file")
        return None

    # -- prepare (untimed) ----------------------------------------------------------------------
    def prepare(self, trial: Trial) -> None:
        model, spec = trial.model, trial.spec
        self.kind_ = model.kind
        self.quantization_ = None
        self.batches_, self.calibration_ = trial.batches, trial.calibration
        if self.config["quantization"]:  # combined variant: early exit on a quantized copy of the model
            copy_, self.quantization_ = quantize_copy(model.model, self.config["quantization"])
            model = dataclasses.replace(model, model=copy_)
        if model.kind == "causal_lm":
            self._prepare_causal_lm(model, spec)
        else:
            self._prepare_classifier(model, spec)

    def _prepare_causal_lm(self, model: Any, spec: Any) -> None:
        # 1. The layer stack and where exits are tested.
        self._model, self._spec = model, spec
        self.stack_: DecoderStack = decoder_stack(model.model)
        num_layers = self.stack_.num_layers
        every = self.config["check_every"] or max(1, num_layers // 6)
        self.exit_layers_ = frozenset(range(every, num_layers, every))
        self.training_ = None
        # 2. The curve on the calibration prompts (token agreement with the full model's greedy output) and
        # the operating point chosen there.
        if any(b.size != 1 for b in self.batches_ + self.calibration_):
            raise NotApplicableError("early_exit on causal LMs decodes batch size 1 only: set batch_size=1")
        self.curve_ = self._measure_curve(self.calibration_, [])
        self.operating_point_ = self._choose_operating_point(self.curve_)
        self.rule_ = self._rule_used()
        # 3. Quality on the workload's own text (the timed prompts), teacher-forced at the threshold used:
        # perplexity change and next-token KL against the full model (not the generated continuations).
        policy, threshold = self.rule_
        config = model.model.config
        window = min(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 512,
                     512)
        self.text_quality_ = quality.lm_text_quality(
            model.tokenizer, [t for b in self.batches_ for t in b.texts],
            lambda ids: model.model(input_ids=ids).logits,
            lambda ids: exit_logits(self.stack_, ids, float(threshold), self.exit_layers_)[None],
            self.config["quality_tokens"], window, spec.device)

    def _full(self, batch: Any) -> CallOutput:
        """The full model as the baseline runs it."""
        if self.kind_ == "causal_lm":
            return generate(self._model.model, self._model.tokenizer, batch, self._spec.workload.max_new_tokens)
        return classify(self._model.model, batch)

    def _prepare_classifier(self, model: Any, spec: Any) -> None:
        # 1. The layer stack (an unsupported architecture stops here, before any work).
        self._model, self._spec = model, spec
        self.stack_: ClassifierStack = classifier_stack(model.model)
        self.pooling_ = exit_pooling(model.location, getattr(model.model.config, "model_type", None),
                                     self.config["pooling"])
        if not self.stack_.reproduces(self.batches_[0].inputs):
            raise NotApplicableError(f"early_exit could not reproduce {type(model.model).__name__}'s logits "
                                     "layer by layer on the padded workload inputs: not supported yet")
        # 2. The calibration split in two halves (alternate batches): the heads train on one, the curve is
        # measured on the other, so the threshold is not chosen on the items the heads were fitted to.
        self.head_batches_, self.curve_batches_ = _halves(self.calibration_)
        labels = torch.tensor([y for b in self.head_batches_ for y in b.labels])
        heads, report = train_exit_heads(self._pooled_features(self.head_batches_), labels,
                                         model.model.config.num_labels, self.config["train_steps"],
                                         self.config["learning_rate"], self.config["seed"])
        param = next(model.model.parameters())
        self.heads_ = heads.to(device=param.device, dtype=param.dtype)
        # 3. How good each head is on the timed inputs (evaluation only: nothing is chosen from it).
        timed_labels = torch.tensor([y for b in self.batches_ for y in b.labels])
        with torch.inference_mode():
            predicted = self.heads_.all_logits(self._pooled_features(self.batches_).to(param.device)).argmax(-1)
        report["per_layer_head_accuracy"] = (predicted.cpu() == timed_labels[:, None]).float().mean(0).tolist()
        report["evaluated_on"] = "the timed inputs' gold labels (heads trained on the calibration split only)"
        self.training_ = report
        # 4. The curve, measured side by side on the other half, and the operating point chosen there.
        report["curve_items"] = sum(b.size for b in self.curve_batches_)
        self.curve_ = self._measure_curve(self.curve_batches_, [y for b in self.curve_batches_ for y in b.labels])
        self.operating_point_ = self._choose_operating_point(self.curve_)
        self.rule_ = self._rule_used()

    def _pooled_features(self, batches: list[Any]) -> torch.Tensor:
        """(N, L-1, H) float32 pooled states (:attr:`pooling_`) after every intermediate layer."""
        pooling = self.pooling_["pooling"]
        with torch.inference_mode():
            features = torch.cat([torch.stack([pool(h, b.inputs.get("attention_mask"), pooling)
                                               for h in self.stack_.hidden_states(b.inputs)[:-1]], dim=1)
                                  for b in batches]).float().cpu()
        return features.clone()  # a normal tensor: the heads train on it with autograd

    def _settings(self) -> list[tuple[str, float | int]]:
        """The (policy, value) settings the curve sweeps: thresholds, or patience 1 .. L-1."""
        if self.config["policy"] == "confidence":  # 1.0 never exits: what running layer by layer itself costs
            return [("confidence", t) for t in sorted({*self.thresholds_, 1.0})]
        return [("patience", p) for p in range(1, self.stack_.num_layers)]

    def _measure_curve(self, batches: list[Any], labels: list[int]) -> list[dict[str, Any]]:
        # 1. Every setting and the full model, interleaved call by call on calibration batches.
        calls = {FULL: lambda i: self._full(batches[i])}
        for rule in self._settings():
            calls[f"{rule[0]}={rule[1]}"] = (lambda r: lambda i: self._call(batches[i], r))(rule)
        measured = run_interleaved(calls, len(batches), self.config["curve_repeats"], warmup=1,
                                   device=self._spec.device, track_memory=False)
        comparisons = summarize_samples(measured.samples, baseline=FULL, seed=self._spec.seed)["comparisons"]
        # 2. Accuracy (classifiers: on the gold labels; LMs: token agreement with the full model's greedy
        # output), mean layers executed and speedup per setting.
        gold = torch.tensor(labels)

        def accuracy(name: str) -> float:
            if self.kind_ == "causal_lm":
                return quality.generation_quality(measured.outputs[FULL], measured.outputs[name])["token_agreement"]
            predicted = torch.tensor([y for out in measured.outputs[name] for y in out])
            return float((predicted == gold).float().mean())

        full_accuracy = accuracy(FULL)
        full_median_s = float(torch.tensor(measured.samples[FULL]["latency_s"]).median())
        curve = []
        for policy, value in self._settings():
            name = f"{policy}={value}"
            layers = [layer for call in measured.internals[name] for layer in call["exit_layers"]]
            comparison = comparisons[name]
            curve.append({
                "threshold": value if policy == "confidence" else None,
                "patience": value if policy == "patience" else None,
                "accuracy": accuracy(name),
                "accuracy_full": full_accuracy,
                "mean_layers_executed": sum(layers) / len(layers),
                "median_latency_s": float(torch.tensor(measured.samples[name]["latency_s"]).median()),
                "median_latency_full_s": full_median_s,
                "speedup_vs_full": comparison["speedup"],
                "speedup_ci_low": comparison["ci_low"],
                "speedup_ci_high": comparison["ci_high"],
            })
        return curve

    def _choose_operating_point(self, curve: list[dict[str, Any]]) -> dict[str, Any]:
        """The fastest point within the accuracy budget; the full depth, said so, when none is."""
        budget = self.config["max_accuracy_drop_points"] / 100.0
        allowed = [p for p in curve if p["accuracy"] >= p["accuracy_full"] - budget - 1e-9]
        if allowed:
            chosen = dict(max(allowed, key=lambda p: p["speedup_vs_full"]))
            low = chosen["speedup_ci_low"]
            chosen["faster_than_full"] = low is not None and low > 1.0  # False: within noise of the full model
            return chosen
        never = {"threshold": 1.0, "patience": None} if self.config["policy"] == "confidence" else \
            {"threshold": None, "patience": self.stack_.num_layers}
        return {**never, "fallback": f"no swept setting kept accuracy within "
                                     f"{self.config['max_accuracy_drop_points']} points: runs the full depth"}

    def _rule_used(self) -> tuple[str, float | int]:
        policy = self.config["policy"]
        if policy == "confidence":
            value = self.config["threshold"]
            return policy, self.operating_point_["threshold"] if value is None else value
        value = self.config["patience"]
        return policy, self.operating_point_["patience"] if value is None else value

    # -- run (timed) ------------------------------------------------------------------------------
    def run(self, batch: Any) -> CallOutput:
        return self._call(batch, self.rule_)

    def _call(self, batch: Any, rule: tuple[str, float | int]) -> CallOutput:
        if self.kind_ == "causal_lm":
            out = calm_generate(self.stack_, batch.inputs["input_ids"], self._spec.workload.max_new_tokens,
                                float(rule[1]), self.exit_layers_, self._model.tokenizer.eos_token_id)
            return CallOutput(output=[out["tokens"]], new_tokens=len(out["tokens"]),
                              first_output_at=out["first_output_at"],
                              internals={"exit_layers": out["exit_layers"], "block_calls": out["block_calls"]})
        predicted, exit_layers = self._run(batch, rule)
        return CallOutput(output=predicted, internals={"exit_layers": exit_layers})

    def _run(self, batch: Any, rule: tuple[str, float | int]) -> tuple[list[int], list[int]]:
        """Layer by layer with exits; rows that exit leave the batch. Returns labels and exit layers (1-based)."""
        stack, heads = self.stack_, self.heads_
        policy, value = rule
        last = stack.num_layers - 1
        with torch.inference_mode():
            # 1. Embeddings for the whole batch; rows[i] is the batch row of running row i.
            hidden, mask = stack.embed(batch.inputs)  # (B, T, H)
            tokens_mask, pooling = batch.inputs.get("attention_mask"), self.pooling_["pooling"]  # (B, T)
            size = hidden.shape[0]
            rows = torch.arange(size, device=hidden.device)
            predicted = torch.empty(size, dtype=torch.long, device=hidden.device)
            exit_layer = torch.full((size,), stack.num_layers, dtype=torch.long, device=hidden.device)
            previous = torch.full((size,), -1, dtype=torch.long, device=hidden.device)
            streak = torch.zeros(size, dtype=torch.long, device=hidden.device)
            for index in range(stack.num_layers):
                # 2. One block on the running rows only.
                hidden = stack.layer(index, hidden, mask)
                if index == last:
                    predicted[rows] = stack.head(hidden).argmax(-1)
                    break
                # 3. This layer's exit head decides which rows stop here.
                logits = heads.logits(index, pool(hidden, tokens_mask, pooling))  # (b, C)
                label = logits.argmax(-1)
                if policy == "confidence":
                    leave = logits.softmax(-1).amax(-1) > value
                else:
                    streak = torch.where(label == previous, streak + 1, torch.ones_like(streak))
                    previous = label
                    leave = streak >= value
                if not bool(leave.any()):
                    continue
                predicted[rows[leave]] = label[leave]
                exit_layer[rows[leave]] = index + 1
                # 4. Drop the rows that left, so the next blocks run on fewer rows.
                keep = ~leave
                if not bool(keep.any()):
                    break
                rows, previous, streak = rows[keep], previous[keep], streak[keep]
                tokens_mask = None if tokens_mask is None else tokens_mask[keep]
                hidden, mask = stack.keep_rows(keep, hidden, mask)
        return predicted.tolist(), exit_layer.tolist()

    # -- report ---------------------------------------------------------------------------------
    def report(self, outcome: Outcome) -> TechniqueReport:
        internals = self.internals(outcome.per_call)
        metrics = [Metric("mean_layers_executed", internals["mean_layers_executed"], "layers", False,
                          "mean layers executed"),
                   Metric("layers_saved_percent", None if internals["layers_saved_fraction"] is None
                          else 100.0 * internals["layers_saved_fraction"], "%", True, "layers saved", headline=False)]
        if self.kind_ == "causal_lm":
            metrics.extend(quality.lm_quality_metrics(self.text_quality_))
        policy, value = self.rule_
        return TechniqueReport(
            lossless=False, model_bytes=self.quantization_["bytes_after"] if self.quantization_ else None,
            quality=metrics, internals=internals, features=self.features(self.config, {}, None),
            headline=f"{policy}={value}: {internals['mean_layers_executed'] or 0:.2f} of {internals['num_layers']} "
                     "layers on average")

    @classmethod
    def features(cls, params: dict[str, Any], model: dict[str, Any], draft: dict[str, Any] | None) -> dict[str, Any]:
        scheme = params.get("quantization")
        threshold = params.get("threshold")
        return {"exit_threshold": float(threshold) if threshold is not None else float("nan"),
                "step_policy": str(params.get("policy") or cls.params["policy"].default),
                "weight_bits": float(SCHEMES[scheme]["bits"]) if scheme else float("nan")}

    @classmethod
    def expert_rules(cls) -> list[ExpertRule]:
        return [ExpertRule(50, "early exit for classifiers",
                           lambda rows: rows["modality"] == "text-classification")]

    def internals(self, per_call: list[dict[str, Any]]) -> dict[str, Any]:
        layers = [layer for call in per_call for layer in call.get("exit_layers", [])]
        histogram: dict[int, int] = {}
        for layer in sorted(layers):
            histogram[layer] = histogram.get(layer, 0) + 1
        mean_layers = sum(layers) / len(layers) if layers else None
        num_layers = self.stack_.num_layers
        policy, value = self.rule_
        report: dict[str, Any] = {
            "policy": policy,
            "threshold_used": value if policy == "confidence" else None,
            "patience_used": value if policy == "patience" else None,
            "num_layers": num_layers,
            "exit_layer_histogram": histogram,
            "mean_layers_executed": mean_layers,
            "layers_saved_fraction": None if mean_layers is None else 1.0 - mean_layers / num_layers,
            "threshold_curve": self.curve_,
            "operating_point": self.operating_point_,
            "max_accuracy_drop_points": self.config["max_accuracy_drop_points"],
            "heads_training": self.training_,
        }
        if self.quantization_:
            report["quantization"] = self.quantization_
        if self.kind_ == "causal_lm":
            tokens = len(layers)
            report.update({
                "implementation": "CALM-style greedy decoding: after every checked layer the model's own final "
                                  "norm and LM head test the new token; an exited token's hidden state is run "
                                  "through the deeper layers later, batched with the next token that reaches them",
                "exit_check_layers": sorted(self.exit_layers_),
                "curve_quality": "accuracy = token agreement with the full model's greedy output",
                "block_calls_per_token": (sum(c.get("block_calls", 0) for c in per_call) / tokens) if tokens else None,
                "text_quality": {**self.text_quality_, "measured_by": "teacher-forced on the timed prompts' text: "
                                 "each position's distribution from the first exit layer confident above the "
                                 "threshold (else the last layer), against the full model's"},
                "selection_note": "the operating point is chosen on the calibration prompts, never on the timed ones",
            })
            return report
        report.update({
            "implementation": f"layer-by-layer forward with linear exit heads on the {self.pooling_['pooling']}-"
                              "pooled hidden states (DeeBERT confidence / PABEE patience); exited rows leave "
                              "the batch; "
                              "the last layer uses the model's own head",
            "layers_path": self.stack_.layers_path,
            "head_recipe": self.stack_.head_recipe,
            "exit_pooling": self.pooling_,
            "curve_quality": "accuracy = accuracy on the workload's gold labels",
            "selection_note": "heads trained on one half of the calibration split, the operating point "
                              "chosen on the other half, never on the timed inputs",
        })
        return report

    def release(self) -> None:
        # Nothing was attached to the shared model (the heads live here, the backbone is only read):
        # drop the heads and the cached batches; what internals() reports stays.
        self.heads_ = None
        self.batches_, self.calibration_ = [], []
