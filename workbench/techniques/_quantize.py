"""Quantize a copy of a model with a well-kept library, and report what was really quantized.

Schemes and the library each uses (the fastest correct one measured here; see bench/quantization.py):

- ``int8-dynamic``: int8 weights and per-batch int8 activations, ``torch.ao.quantization.quantize_dynamic``
  (x86/fbgemm kernels; CPU). torchao's int8 dynamic config runs ~5x *slower* than fp32 on CPU in eager
  mode, so it is not used here.
- ``int8-weight-only``: int8 weights, activations in float, torchao ``Int8WeightOnlyConfig``.
- ``int4-weight-only``: torchao ``Int4WeightOnlyConfig``; needs a CUDA GPU (or torchao's optional CPU kernels).
- ``fp16`` / ``bf16``: the whole model cast, torch.
- ``bnb-int8`` / ``bnb-nf4``: bitsandbytes LLM.int8() and 4-bit NF4 linear layers; CUDA only.

GPT-2's attention and MLP projections are ``transformers.pytorch_utils.Conv1D``, not ``nn.Linear``:
quantizers that look for ``nn.Linear`` silently skip them and quantize only the LM head. Every Conv1D is
first converted to an equivalent ``nn.Linear`` (weight transposed), and the report counts linear-like
layers before and quantized layers after, so any skip is visible.

Mixed precision: ``keep_float`` names linear-like layers to leave in float (the sensitive ones, found by
:mod:`workbench.techniques._sensitivity`); the report lists them under ``kept_float``, and
``not_quantized`` lists only layers that were meant to be quantized and were not. Whole-model casts
(fp16, bf16) cannot keep single layers in float32 and refuse it.

Example:
    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2)).eval()
    >>> quantized, report = quantize_copy(model, "int8-dynamic")
    >>> report["linear_layers"], report["quantized_layers"], report["not_quantized"]
    (9, 9, [])
    >>> _, report = quantize_copy(model, "int8-dynamic", keep_float={"lm_head"})
    >>> report["quantized_layers"], report["kept_float"]
    (8, ['lm_head'])
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import io
import warnings
from collections.abc import Collection, Iterable
from typing import Any

import torch
from torch import nn

SCHEMES: dict[str, dict[str, Any]] = {
    "int8-dynamic": {"bits": 8, "library": "torch.ao.quantization.quantize_dynamic (x86/fbgemm)", "devices": ("cpu",)},
    "int8-weight-only": {"bits": 8, "library": "torchao Int8WeightOnlyConfig", "devices": ("cpu", "cuda"), "needs": "torchao"},
    "int4-weight-only": {"bits": 4, "library": "torchao Int4WeightOnlyConfig", "devices": ("cuda",), "needs": "torchao"},
    "fp16": {"bits": 16, "library": "torch (Module.to(float16))", "devices": ("cpu", "cuda")},
    "bf16": {"bits": 16, "library": "torch (Module.to(bfloat16))", "devices": ("cpu", "cuda")},
    "bnb-int8": {"bits": 8, "library": "bitsandbytes Linear8bitLt (LLM.int8())", "devices": ("cuda",), "needs": "bitsandbytes"},
    "bnb-nf4": {"bits": 4, "library": "bitsandbytes Linear4bit (NF4)", "devices": ("cuda",), "needs": "bitsandbytes"},
}
WHOLE_MODEL_CASTS = ("fp16", "bf16")  # schemes that change the whole model's dtype: no layer can stay float32


def why_not_scheme(scheme: str, device: str) -> str | None:
    """Why ``scheme`` cannot run on ``device`` here (missing GPU or library), or None."""
    info = SCHEMES[scheme]
    kind = device.split(":")[0]
    if kind not in info["devices"]:
        where = "a CUDA GPU" if info["devices"] == ("cuda",) else "CPU"
        other = "int8-dynamic or int8-weight-only" if kind == "cpu" else "int8-weight-only, fp16 or bnb-int8"
        return (f"quantization scheme {scheme!r} ({info['library']}) needs {where}, not device={device!r}: "
                f"use {other} on {kind}")
    needs = info.get("needs")
    if needs and importlib.util.find_spec(needs) is None:
        return f"quantization scheme {scheme!r} needs the {needs} library, which is not installed: pip install {needs}"
    return None


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers ``Conv1D`` by an equivalent ``nn.Linear`` in place; returns how many."""
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                in_features, out_features = child.weight.shape  # Conv1D stores (in, out)
                linear = nn.Linear(in_features, out_features, bias=child.bias is not None,
                                   device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
                replaced += 1
    return replaced


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the linear-like layers (``nn.Linear`` and GPT-2's ``Conv1D``) that quantization replaces."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def match_layers(names: Iterable[str], patterns: Iterable[str]) -> set[str]:
    """The layer names matched by module-name patterns: an exact name (``lm_head``), a glob on the full
    name (``model.layers.1*.mlp.down_proj``) or a last-part name matching every layer (``down_proj``).

    Raises ValueError naming a pattern that matches no layer, with examples of names that exist.

    Example:
        >>> sorted(match_layers(["h.0.mlp.c_fc", "h.1.mlp.c_fc", "lm_head"], ["c_fc"]))
        ['h.0.mlp.c_fc', 'h.1.mlp.c_fc']
    """
    names = list(names)
    matched: set[str] = set()
    for pattern in patterns:
        hits = {n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, "*." + pattern)}
        if not hits:
            examples = ", ".join(names[:2] + names[-1:]) if len(names) > 3 else ", ".join(names)
            raise ValueError(f"keep_float pattern {pattern!r} matches no linear layer of this model: use layer "
                             f"names or globs such as {examples} (or a last part such as down_proj)")
        matched |= hits
    return matched


def quantize_copy(model: nn.Module, scheme: str, keep_float: Collection[str] = ()) -> tuple[nn.Module, dict[str, Any]]:
    """A quantized deep copy of ``model`` (the original is untouched) and a report of what changed.

    ``keep_float`` holds exact linear-layer names (see :func:`linear_layer_names`) left in float.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    keep = set(keep_float)
    if keep and scheme in WHOLE_MODEL_CASTS:
        raise ValueError(f"scheme {scheme!r} casts the whole model, so no layer can stay float32: drop keep_float "
                         "or use a per-layer scheme (int8-dynamic, int8-weight-only)")
    # 1. Copy, and make every linear-like layer a real nn.Linear.
    bytes_before = state_bytes(model)
    work = copy.deepcopy(model).eval()
    converted = conv1d_to_linear(work)
    linear_names = [name for name, m in work.named_modules() if isinstance(m, nn.Linear)]
    unknown = sorted(keep - set(linear_names))
    if unknown:
        raise ValueError(f"keep_float names {', '.join(unknown)}, which are not linear layers of this model: "
                         f"use names from linear_layer_names(model), e.g. {linear_names[-1]}")
    targets = [name for name in linear_names if name not in keep]
    # 2. Quantize with the scheme's library, every linear layer but the kept ones.
    if scheme == "int8-dynamic":
        from torch.ao.quantization import quantize_dynamic

        torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines \
            else torch.backends.quantized.engine
        with warnings.catch_warnings():  # torch.ao's deprecation notices, once per call, on every run
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            work = quantize_dynamic(work, set(targets) if keep else {nn.Linear}, dtype=torch.qint8)
    elif scheme in ("int8-weight-only", "int4-weight-only"):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        quantize_(work, Int8WeightOnlyConfig() if scheme == "int8-weight-only" else Int4WeightOnlyConfig(),
                  filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and fqn not in keep)
    elif scheme in WHOLE_MODEL_CASTS:
        work = work.to(torch.float16 if scheme == "fp16" else torch.bfloat16)
    else:
        work = _bitsandbytes(work, scheme, keep)
    # 3. What really got quantized, and what stayed float on purpose.
    modules = dict(work.named_modules())
    quantized = {name for name in linear_names if name in modules and _is_quantized(modules[name], scheme)}
    report = {
        "scheme": scheme,
        "library": SCHEMES[scheme]["library"],
        "conv1d_converted_to_linear": converted,
        "linear_layers": len(linear_names),
        "quantized_layers": len(quantized),
        "kept_float": [name for name in linear_names if name in keep and name not in quantized],
        "not_quantized": [name for name in targets if name not in quantized],  # meant to be, and were not
        "bytes_before": bytes_before,
        "bytes_after": state_bytes(work),
    }
    return work, report


def _is_quantized(module: nn.Module, scheme: str) -> bool:
    if scheme == "int8-dynamic":
        return type(module).__module__.startswith("torch.ao.nn.quantized")
    if scheme in ("fp16", "bf16"):
        weight = getattr(module, "weight", None)
        return isinstance(module, nn.Linear) and weight is not None and weight.dtype in (torch.float16, torch.bfloat16)
    if scheme.startswith("bnb"):
        return type(module).__module__.startswith("bitsandbytes")
    weight = getattr(module, "weight", None)  # torchao swaps the weight for a quantized tensor subclass
    if not isinstance(module, nn.Linear) or weight is None:
        return False
    return any(type(t).__module__.startswith("torchao") for t in (weight, getattr(weight, "data", weight)))


def _bitsandbytes(model: nn.Module, scheme: str, keep: Collection[str] = ()) -> nn.Module:
    import bitsandbytes as bnb

    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and f"{parent_name}.{name}".lstrip(".") not in keep:
                if scheme == "bnb-int8":
                    new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, child.bias is not None,
                                              has_fp16_weights=False)
                    new.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False,
                                                   has_fp16_weights=False)
                else:
                    new = bnb.nn.Linear4bit(child.in_features, child.out_features, child.bias is not None,
                                            quant_type="nf4", compute_dtype=torch.float16)
                    new.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    new.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(parent, name, new)
    return model.to("cuda")


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's serialised state dict: what its weights really take, packed int8 included."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
