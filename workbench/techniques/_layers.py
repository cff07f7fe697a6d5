"""A transformer seen as a stack of layers: embed, run layer i, apply the model's own head.

Early exit needs to stop between layers, so it cannot call the model's ``forward``; it needs the
pieces. This module finds them generically (``model.base_model``, the longest ``nn.ModuleList`` of
identical blocks, the embeddings module) and checks, on real inputs, that running the pieces in turn
reproduces the model's own logits before anything relies on them. An architecture that does not fit
raises :class:`~workbench.errors.NotApplicableError` naming its class. Nothing here changes the model.

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> import torch
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
    ...     num_attention_heads=2, intermediate_size=64)).eval()
    >>> stack = classifier_stack(model)
    >>> ids = torch.tensor([[101, 7, 8, 102]])
    >>> hidden, mask = stack.embed({"input_ids": ids})
    >>> for i in range(stack.num_layers):
    ...     hidden = stack.layer(i, hidden, mask)
    >>> torch.allclose(stack.head(hidden), model(input_ids=ids).logits, atol=1e-5)
    True
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workbench.errors import NotApplicableError

_EMBEDDING_NAMES = ("embeddings", "embed", "wte")  # attribute names of an encoder's embedding module


def find_layer_list(module: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest ``nn.ModuleList`` under ``module`` whose children are all of one class, with its name."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, child in module.named_modules():
        if not isinstance(child, nn.ModuleList) or len(child) == 0:
            continue
        if len({type(block) for block in child}) != 1:
            continue
        if best is None or len(child) > len(best[1]):
            best = (name, child)
    return best


def _unwrap(output: Any) -> torch.Tensor:
    """A layer's hidden states, whether it returns a tensor or a tuple (older transformers)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _index_mask(mask: Any, keep: torch.Tensor) -> Any:
    """The attention mask for the kept rows; None and broadcast (batch 1) masks stay as they are."""
    if mask is None or not isinstance(mask, torch.Tensor) or mask.shape[0] == 1:
        return mask
    return mask[keep]


# -- classifiers ---------------------------------------------------------------------------------


def _pooler_head(model: nn.Module, base: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """BERT family: the base model's pooler, then dropout and ``classifier`` on the top model."""
    if getattr(base, "pooler", None) is None or not isinstance(getattr(model, "classifier", None), nn.Module):
        return None
    dropout = getattr(model, "dropout", nn.Identity())
    return lambda hidden: model.classifier(dropout(base.pooler(hidden)))


def _sequence_head(model: nn.Module, base: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """RoBERTa/ELECTRA family: ``classifier`` reads the whole sequence and picks its first token itself."""
    if not isinstance(getattr(model, "classifier", None), nn.Module):
        return None
    return lambda hidden: model.classifier(hidden)


_HEAD_RECIPES = (("pooler+classifier", _pooler_head), ("sequence classifier", _sequence_head))


@dataclass
class ClassifierStack:
    """A sequence classifier as embeddings -> ``num_layers`` blocks -> the model's own head.

    Shapes: hidden states (B, T, H); masks as the model's attention implementation wants them; logits
    (B, num_labels).
    """

    model: nn.Module  # the shared classifier; never modified
    base: nn.Module  # model.base_model (the encoder without the task head)
    embeddings: nn.Module  # token (+ position, type) embeddings
    layers: nn.ModuleList  # the encoder blocks, in order
    layers_path: str  # where the blocks live, e.g. "encoder.layer"
    head: Callable[[torch.Tensor], torch.Tensor]  # (B, T, H) last hidden states -> (B, num_labels) logits
    head_recipe: str = ""  # which head recipe matched the model's own logits

    def __post_init__(self) -> None:
        accepted = inspect.signature(self.embeddings.forward).parameters
        self._embedding_keys = tuple(k for k in ("input_ids", "token_type_ids", "position_ids") if k in accepted)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Embeddings (B, T, H) and the attention mask the blocks expect, built as the model builds it."""
        from transformers.masking_utils import create_bidirectional_mask

        hidden = self.embeddings(**{k: v for k, v in inputs.items() if k in self._embedding_keys})
        mask = create_bidirectional_mask(config=self.base.config, inputs_embeds=hidden,
                                         attention_mask=inputs.get("attention_mask"))
        return hidden, mask

    def layer(self, index: int, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
        """Block ``index`` (0-based) applied to hidden states (B, T, H)."""
        return _unwrap(self.layers[index](hidden, attention_mask=mask))

    @staticmethod
    def keep_rows(keep: torch.Tensor, hidden: torch.Tensor, mask: Any) -> tuple[torch.Tensor, Any]:
        """Hidden states and mask cut to the rows still running (``keep``: (B,) bool)."""
        return hidden[keep], _index_mask(mask, keep)

    def reproduces(self, inputs: dict[str, torch.Tensor]) -> bool:
        """True when embed -> every block -> head gives the model's own logits on ``inputs``."""
        with torch.inference_mode():
            reference = self.model(**inputs).logits
            logits = self.head(self.hidden_states(inputs)[-1])
        return logits.shape == reference.shape and torch.allclose(logits, reference, atol=1e-4, rtol=1e-4)

    def hidden_states(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Hidden states after every block, ``num_layers`` tensors (B, T, H), no exits."""
        hidden, mask = self.embed(inputs)
        out = []
        for index in range(self.num_layers):
            hidden = self.layer(index, hidden, mask)
            out.append(hidden)
        return out


def classifier_stack(model: nn.Module, check_inputs: dict[str, torch.Tensor] | None = None) -> ClassifierStack:
    """The layer stack of a sequence classifier, checked against its own forward on ``check_inputs``.

    Raises:
        NotApplicableError: no layer list, no embeddings, or no head recipe reproduces the model's logits.
    """
    # 1. The base model, its blocks and its embeddings.
    arch = type(model).__name__
    base = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    if not isinstance(base, nn.Module) or base is model or config is None:
        raise NotApplicableError(f"early_exit cannot split {arch} into layers: it has no base_model "
                                 "(supported: transformers *ForSequenceClassification encoders such as BERT)")
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        raise NotApplicableError(f"early_exit supports encoder classifiers, not the decoder-based {arch}")
    found = find_layer_list(base)
    embeddings = next((getattr(base, n) for n in _EMBEDDING_NAMES if isinstance(getattr(base, n, None), nn.Module)),
                      None)
    if found is None or embeddings is None:
        raise NotApplicableError(f"early_exit found no layer list and embeddings in {arch}: "
                                 "supported are BERT-style encoders (base_model.embeddings + a list of blocks)")
    # 2. The model's own head: the first recipe that reproduces its logits.
    if check_inputs is None:
        check_inputs = {"input_ids": torch.arange(4, device=next(model.parameters()).device)[None] + 1}
    path, layers = found
    for recipe, make in _HEAD_RECIPES:
        head = make(model, base)
        if head is None:
            continue
        stack = ClassifierStack(model, base, embeddings, layers, path, head, recipe)
        try:
            if stack.reproduces(check_inputs):
                return stack
        except Exception:  # a recipe that does not fit this architecture: try the next
            continue
    raise NotApplicableError(f"early_exit could not reproduce {arch}'s own logits layer by layer "
                             f"(blocks at base_model.{path}): this architecture is not supported yet")


# -- causal LMs ----------------------------------------------------------------------------------


@dataclass
class DecoderStack:
    """A GPT-2-style causal LM as token + absolute position embeddings -> blocks -> final norm -> LM head.

    Blocks take (1, q, H) hidden states, a :class:`~transformers.DynamicCache` whose per-layer entries
    may have different lengths (a layer's cache lags while tokens wait for it), and a float mask.
    """

    model: nn.Module  # the shared causal LM; never modified
    token_embeddings: nn.Module  # wte: ids -> (1, q, H)
    position_embeddings: nn.Module  # wpe: absolute positions -> (1, q, H)
    layers: nn.ModuleList  # the decoder blocks, in order
    final_norm: nn.Module  # ln_f
    lm_head: nn.Module  # (.., H) -> (.., V)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """(1, q) token ids at positions start .. start+q-1 -> (1, q, H)."""
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        return self.token_embeddings(ids) + self.position_embeddings(positions)

    def layer(self, index: int, hidden: torch.Tensor, cache: Any) -> torch.Tensor:
        """Block ``index`` on q new tokens (1, q, H) that follow the tokens already in its cache entry."""
        queries, past = hidden.shape[1], cache.get_seq_length(index)
        mask = None
        if queries > 1:  # causal, offset by what this layer has cached: query i sees keys 0 .. past+i
            allowed = torch.ones(queries, past + queries, dtype=torch.bool, device=hidden.device).tril(past)
            mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
            mask = mask.masked_fill(~allowed, torch.finfo(hidden.dtype).min)[None, None]
        return _unwrap(self.layers[index](hidden, cache=cache, attention_mask=mask, use_cache=True))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM logits (.., V) of hidden states (.., H) through the model's own final norm and head."""
        return self.lm_head(self.final_norm(hidden))


def decoder_stack(model: nn.Module) -> DecoderStack:
    """The layer stack of a GPT-2-style causal LM (absolute position embeddings).

    Raises:
        NotApplicableError: another architecture (rotary positions, no final norm, ...) or attention backend.
    """
    arch = type(model).__name__
    base = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    parts = {name: getattr(base, name, None) for name in ("wte", "wpe", "ln_f")}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = find_layer_list(base) if isinstance(base, nn.Module) else None
    if config is None or found is None or head is None or not all(isinstance(p, nn.Module) for p in parts.values()):
        raise NotApplicableError(f"early_exit on causal LMs supports GPT-2-style models (absolute position "
                                 f"embeddings wte/wpe, blocks, ln_f), not {arch}")
    backend = getattr(config, "_attn_implementation", "eager")
    if backend not in ("sdpa", "eager"):
        raise NotApplicableError(f"early_exit on {arch} needs attn_implementation sdpa or eager, not {backend!r}")
    return DecoderStack(model, parts["wte"], parts["wpe"], found[1], parts["ln_f"], head)
