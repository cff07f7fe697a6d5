"""A transformer seen as a stack of layers: embed, run layer i, apply the model's own head.

Early exit needs to stop between layers, so it cannot call the model's ``forward``; it needs the
pieces. This module finds them generically (``model.base_model``, the longest ``nn.ModuleList`` of
identical blocks, the embeddings module) and checks, on real inputs, that running the pieces in turn
reproduces the model's own logits before anything relies on them. Causal LMs come in two layouts
(:data:`DECODER_LAYOUTS`): GPT-2's absolute positions and the Llama layout's rotary ones (Llama, Qwen2,
Mistral, Gemma, Phi-3), whose blocks each get the positions of their own cache length, so a layer that
lags behind (tokens waiting after an early exit) still computes the full model's keys and values. An
architecture that does not fit raises :class:`~workbench.errors.NotApplicableError` naming its class;
:func:`why_not_decoder` and :func:`why_not_encoder` say the same from config.json facts at plan time.
Nothing here changes the model.

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


def _pre_classifier_head(model: nn.Module, base: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """DistilBERT family: the first token through ``pre_classifier``, ReLU, dropout and ``classifier``."""
    if not isinstance(getattr(model, "pre_classifier", None), nn.Module):
        return None
    dropout = getattr(model, "dropout", nn.Identity())
    return lambda hidden: model.classifier(dropout(torch.relu(model.pre_classifier(hidden[:, 0]))))


_HEAD_RECIPES = (("pooler+classifier", _pooler_head), ("pre_classifier", _pre_classifier_head),
                 ("sequence classifier", _sequence_head))
#: config model_type of the encoder classifiers whose stack is known to reproduce the model (BERT-style
#: blocks over base_model.embeddings); checked from config.json before any weight loads. ALBERT is not
#: among them: it runs one shared block num_hidden_layers times, so there is no list of layers to exit from.
ENCODER_FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")
#: how each family's own head reads the sequence: the first token ([CLS] / <s>), through a pooler or not.
FIRST_TOKEN_HEADS = {"bert": "pooler on [CLS]", "roberta": "<s> token", "xlm-roberta": "<s> token",
                     "electra": "[CLS] token", "distilbert": "[CLS] token"}


def why_not_encoder(family: str | None, architecture: str | None) -> str | None:
    """Why early exit cannot drive this encoder classifier (from config.json facts), or None."""
    if family in ENCODER_FAMILIES:
        return None
    arch = architecture or family
    if family == "albert":
        return (f"early_exit cannot exit from {arch}: ALBERT runs one shared block for every layer (no layer list); "
                f"supported encoders: model_type {', '.join(ENCODER_FAMILIES)}")
    return (f"early_exit on classifiers drives BERT-style encoders (model_type {', '.join(ENCODER_FAMILIES)}), "
            f"not {arch} (model_type {family!r})")


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
    projection: nn.Module | None = None  # ELECTRA: embeddings_project (embedding size -> hidden), else None

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
        if self.projection is not None:
            hidden = self.projection(hidden)
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
    if getattr(config, "model_type", None) == "albert":
        raise NotApplicableError(why_not_encoder("albert", arch))
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
    projection = getattr(base, "embeddings_project", None)
    for recipe, make in _HEAD_RECIPES:
        head = make(model, base)
        if head is None:
            continue
        stack = ClassifierStack(model, base, embeddings, layers, path, head, recipe,
                                projection if isinstance(projection, nn.Module) else None)
        try:
            if stack.reproduces(check_inputs):
                return stack
        except Exception:  # a recipe that does not fit this architecture: try the next
            continue
    raise NotApplicableError(f"early_exit could not reproduce {arch}'s own logits layer by layer "
                             f"(blocks at base_model.{path}): this architecture is not supported yet")


# -- causal LMs ----------------------------------------------------------------------------------

#: config model_type -> the layout early exit drives. "absolute": GPT-2 (transformer.wte + wpe, h, ln_f);
#: "rotary": the Llama layout (model.embed_tokens, model.layers, model.norm, model.rotary_emb, lm_head),
#: whose blocks take (cos, sin) for their positions. Gemma scales its embeddings by sqrt(hidden) inside
#: its embedding module (GemmaTextScaledWordEmbedding), so embed_tokens alone is its input.
DECODER_LAYOUTS = {"gpt2": "absolute", "llama": "rotary", "qwen2": "rotary", "mistral": "rotary",
                   "gemma": "rotary", "phi3": "rotary"}
#: rope types whose frequencies depend on the sequence length seen (they rescale past a length): a lagging
#: layer would compute its keys with other frequencies than the full model did, so they are refused.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def rope_type(config: Any) -> str:
    """The rope type a config (object or config.json dict) names: 'default' when it names none."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    for key in ("rope_parameters", "rope_scaling"):
        value = get(key, None)
        if isinstance(value, dict) and (value.get("rope_type") or value.get("type")):
            return str(value.get("rope_type") or value.get("type"))
    return "default"


def why_not_decoder(config: Any) -> str | None:
    """Why early exit cannot drive this causal LM's layer stack (config object or config.json dict), or None."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    family = get("model_type", None)
    arch = (get("architectures", None) or [None])[0] or family
    if family not in DECODER_LAYOUTS:
        return (f"early_exit on causal LMs drives GPT-2 and Llama-layout models (model_type "
                f"{', '.join(DECODER_LAYOUTS)}), not {arch} (model_type {family!r})")
    kind = rope_type(config)
    if kind in LENGTH_DEPENDENT_ROPE:
        return (f"early_exit on {arch} cannot keep the KV cache exact with rope_type {kind!r} (its frequencies "
                "change with the sequence length while exited tokens lag): use a model with default rope")
    return None


@dataclass
class DecoderStack:
    """A causal LM as token embeddings -> blocks -> final norm -> LM head, run block by block.

    Two layouts: GPT-2 adds absolute position embeddings to the tokens (``position_embeddings``); the
    Llama layout (Llama, Qwen2, Mistral, Gemma, Phi-3) gives every block the rotary (cos, sin) of its
    query positions (``rotary``). Blocks take (1, q, H) hidden states and a
    :class:`~transformers.DynamicCache` whose per-layer entries may have different lengths (a layer's
    cache lags while tokens wait for it): the q new tokens of layer i sit at positions past_i .. past_i+q-1,
    past_i being that layer's cache length, and attend causally (within ``windows[i]`` when the layer
    has a sliding window) to everything before them.
    """

    model: nn.Module  # the shared causal LM; never modified
    token_embeddings: nn.Module  # ids -> (1, q, H): wte, or embed_tokens (Gemma's scales by sqrt(H) itself)
    position_embeddings: nn.Module | None  # GPT-2's wpe: absolute positions -> (1, q, H); None for rotary
    rotary: nn.Module | None  # the Llama layout's rotary_emb: (hidden, position_ids) -> (cos, sin); None for GPT-2
    layers: nn.ModuleList  # the decoder blocks, in order
    final_norm: nn.Module  # ln_f / norm
    lm_head: nn.Module  # (.., H) -> (.., V)
    windows: tuple[int | None, ...] = ()  # per layer: sliding-window length, None for full attention
    cache_keyword: str = "cache"  # the blocks' name for the KV cache argument (older transformers: past_key_values)

    def __post_init__(self) -> None:
        if not self.windows:
            self.windows = (None,) * len(self.layers)
        self._rope_memo: tuple[tuple, Any] | None = None  # (past, q, device, dtype) -> (cos, sin) of the last call

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layout(self) -> str:
        return "rotary" if self.rotary is not None else "absolute"

    def new_cache(self) -> Any:
        """An empty cache whose layers keep every key (sliding windows are applied by the mask)."""
        from transformers import DynamicCache

        return DynamicCache()

    def embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """(1, q) token ids at positions start .. start+q-1 -> (1, q, H)."""
        hidden = self.token_embeddings(ids)
        if self.position_embeddings is not None:
            positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
            hidden = hidden + self.position_embeddings(positions)
        return hidden

    def layer(self, index: int, hidden: torch.Tensor, cache: Any) -> torch.Tensor:
        """Block ``index`` on q new tokens (1, q, H) that follow the tokens already in its cache entry."""
        queries, past = hidden.shape[1], cache.get_seq_length(index)
        kwargs: dict[str, Any] = {self.cache_keyword: cache, "use_cache": True,
                                  "attention_mask": self._mask(queries, past, self.windows[index], hidden)}
        if self.rotary is not None:  # this layer's own positions: past .. past+q-1
            positions = torch.arange(past, past + queries, device=hidden.device)[None]
            kwargs["position_ids"] = positions
            kwargs["position_embeddings"] = self._rope(hidden, positions, past)
        return _unwrap(self.layers[index](hidden, **kwargs))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM logits (.., V) of hidden states (.., H) through the model's own final norm and head."""
        return self.lm_head(self.final_norm(hidden))

    @staticmethod
    def _mask(queries: int, past: int, window: int | None, hidden: torch.Tensor) -> torch.Tensor | None:
        """(1, 1, q, past+q) float mask: query i (position past+i) sees keys 0 .. past+i, the last ``window``
        of them under a sliding window; None when every query sees every key (one token, no window cut)."""
        if queries == 1 and (window is None or past + 1 <= window):
            return None
        keys = torch.arange(past + queries, device=hidden.device)
        query = torch.arange(past, past + queries, device=hidden.device)[:, None]
        allowed = keys[None] <= query
        if window is not None:
            allowed &= keys[None] > query - window
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        return mask.masked_fill(~allowed, torch.finfo(hidden.dtype).min)[None, None]

    def _rope(self, hidden: torch.Tensor, positions: torch.Tensor, past: int) -> Any:
        """(cos, sin) of ``positions`` (1, q); the last call's are reused (consecutive layers share positions)."""
        key = (past, positions.shape[1], hidden.device, hidden.dtype)
        if self._rope_memo is None or self._rope_memo[0] != key:
            self._rope_memo = (key, self.rotary(hidden, positions))
        return self._rope_memo[1]


def _layer_windows(config: Any, num_layers: int) -> tuple[int | None, ...]:
    """Per layer: the sliding window its attention uses (Mistral/Phi-3: every layer; Qwen2: the layers
    ``layer_types`` marks sliding_attention), else None."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return (None,) * num_layers
    types = getattr(config, "layer_types", None)
    if types is not None and getattr(config, "model_type", None) == "qwen2":
        use = getattr(config, "use_sliding_window", True)
        return tuple(window if use and types[i] == "sliding_attention" else None for i in range(num_layers))
    return (int(window),) * num_layers


def decoder_stack(model: nn.Module) -> DecoderStack:
    """The layer stack of a GPT-2 or Llama-layout causal LM (see :data:`DECODER_LAYOUTS`).

    Raises:
        NotApplicableError: another architecture, a length-dependent rope, or an attention backend other
        than sdpa/eager.
    """
    # 1. A supported family, with a rope and an attention backend the stack can keep exact.
    arch = type(model).__name__
    base = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    if config is None or not isinstance(base, nn.Module):
        raise NotApplicableError(f"early_exit on causal LMs needs a transformers causal LM, not {arch}")
    reason = why_not_decoder({"model_type": getattr(config, "model_type", None), "architectures": [arch],
                              "rope_parameters": getattr(config, "rope_parameters", None),
                              "rope_scaling": getattr(config, "rope_scaling", None)})
    if reason:
        raise NotApplicableError(reason)
    backend = getattr(config, "_attn_implementation", None) or "eager"
    if backend not in ("sdpa", "eager"):
        raise NotApplicableError(f"early_exit on {arch} needs attn_implementation sdpa or eager, not {backend!r}")
    # 2. Its pieces, by layout.
    layout = DECODER_LAYOUTS[config.model_type]
    names = ("wte", "wpe", "ln_f", "h") if layout == "absolute" else ("embed_tokens", "rotary_emb", "norm", "layers")
    parts = [getattr(base, name, None) for name in names]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not all(isinstance(p, nn.Module) for p in parts) or not isinstance(parts[3], nn.ModuleList):
        raise NotApplicableError(f"early_exit found no {'/'.join(names)} and LM head in {arch} "
                                 f"(model_type {config.model_type!r}): its layout is not the one expected")
    tokens, positions, norm, layers = parts
    accepted = inspect.signature(layers[0].forward).parameters
    keyword = "cache" if "cache" in accepted else "past_key_values"
    return DecoderStack(model, tokens, positions if layout == "absolute" else None,
                        positions if layout == "rotary" else None, layers, norm, head,
                        _layer_windows(config, len(layers)), keyword)
