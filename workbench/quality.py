"""Quality of a technique's outputs against the baseline's, on the same inputs and seeds.

Every speed figure is shown beside one of these. Functions return plain dicts of numbers.

Example:
    >>> generation_quality([[[1, 2, 3]]], [[[1, 2, 4]]])["token_agreement"]
    0.6666666666666666
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


# ----------------------------------------------------------------------------------------------
# What "quality lost" means per modality, in that modality's own unit


@dataclass(frozen=True)
class LossScale:
    """How a modality's quality loss is measured, in which unit, and how a budget names it."""

    modality: str  # the workload's modality
    metric: str  # the budget's keyword: perplexity, accuracy, ssim
    unit: str  # unit of the loss: "%" (perplexity increase), "points" (accuracy drop), "SSIM" (1 - SSIM)
    label: str  # the loss in words, for tables and axes
    example: str  # a budget clause in this unit
    default_bound: float  # the largest loss a budget allows when it does not name this modality


#: One scale per modality. Language models: perplexity increase in percent on the workload's own text
#: (never token agreement: one early divergence cascades through greedy decoding, so agreement says little
#: about a lossy model's quality); classifiers: accuracy drop in points on the gold labels; images: how far
#: the technique's SSIM to the many-step reference falls below 1.
LOSS_SCALES: dict[str, LossScale] = {
    "text-generation": LossScale("text-generation", "perplexity", "%", "perplexity increase (%)",
                                 "perplexity<=2%", 2.0),
    "text-classification": LossScale("text-classification", "accuracy", "points", "accuracy drop (points)",
                                     "accuracy<=1", 1.0),
    "image-generation": LossScale("image-generation", "ssim", "SSIM", "1 - SSIM to the reference (unitless, 0 = same)",
                                  "ssim>=0.9", 0.1),
}


def quality_loss(quality: Mapping[str, Any] | None, modality: str, lossless: bool = False) -> float:
    """How much quality a run gave up, in its modality's unit (see :data:`LOSS_SCALES`); NaN when the run
    has no figure in that unit (an unknown loss never counts as zero).

    - text generation: the perplexity change in percent (signed: negative is better); 0 for a lossless
      technique (a stored lossless run produced the baseline's output token for token) and for a sampled
      run whose samples passed the distributional check against the sampled baseline;
    - text classification: the accuracy drop in points (or, without labels, the share of changed
      predictions in points, which bounds it);
    - image generation: 1 - SSIM of the technique's images to the reference images.

    Example:
        >>> quality_loss({"perplexity_change_percent": 0.4, "token_agreement": 0.5}, "text-generation")
        0.4
        >>> quality_loss({"token_agreement": 0.97}, "text-generation")
        nan
        >>> quality_loss({"accuracy_change_points": -1.5}, "text-classification")
        1.5
    """
    q = quality or {}

    def num(key: str) -> float | None:
        value = q.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)

    if modality == "text-generation":
        if lossless:
            return 0.0
        if num("perplexity_change_percent") is not None:
            return round(num("perplexity_change_percent"), 6)
        if q.get("comparison") == "distributional (sampled)":  # see workbench.sampled_quality
            return 0.0 if q.get("passed") is True else math.nan
        return math.nan
    if modality == "text-classification":
        if lossless:
            return 0.0
        if num("accuracy_change_points") is not None:
            return round(-num("accuracy_change_points"), 6)
        if num("agreement") is not None:
            return round(100.0 * (1.0 - num("agreement")), 6)
        return math.nan
    if modality == "image-generation":
        key = "ssim_baseline_vs_reference" if lossless else "ssim_technique_vs_reference"
        if num(key) is not None:
            return round(1.0 - num(key), 6)
        return 0.0 if lossless else math.nan
    return 0.0 if lossless else math.nan


def loss_text(value: float | None, modality: str) -> str:
    """A quality loss in its unit, in words: 'perplexity +0.40%', 'accuracy -1.2 points', 'SSIM 0.912'.

    Example:
        >>> loss_text(0.4, "text-generation"), loss_text(1.25, "text-classification"), loss_text(0.1, "image-generation")
        ('perplexity +0.40%', 'accuracy -1.25 points', 'SSIM 0.900')
    """
    if value is None or not math.isfinite(value):
        scale = LOSS_SCALES.get(modality)
        return f"{scale.metric if scale else 'quality'} not measured"
    if modality == "text-generation":
        return f"perplexity {value:+.2f}%"
    if modality == "text-classification":
        return f"accuracy {-value:+.2f} points"
    if modality == "image-generation":
        return f"SSIM {1.0 - value:.3f}"
    return f"quality loss {value:.3g}"


def lm_text_quality(tokenizer: Any, texts: list[str], reference: Any, technique: Any, max_tokens: int,
                    window: int, device: str = "cpu") -> dict[str, Any]:
    """Perplexity of two language models on the same text, its change in percent, and the mean KL
    divergence KL(reference || technique) of their next-token distributions, teacher-forced.

    The text is the workload's own (the timed inputs'), scored as one stream in windows of ``window``
    tokens, at most ``max_tokens`` tokens: not the generated continuation, so a divergence early in
    generation does not cascade into the figure. ``reference`` and ``technique`` map ids (1, T) to
    logits (1, T, V).

    Returns:
        perplexity_baseline, perplexity_technique, perplexity_change_percent, next_token_kl_mean (nats),
        quality_text_tokens.
    """
    import torch

    ids = tokenizer("\n\n".join(t for t in texts if t), return_tensors="pt").input_ids[0][:max_tokens].to(device)
    nll = {"baseline": 0.0, "technique": 0.0}
    kl_sum, scored = 0.0, 0
    with torch.inference_mode():
        for start in range(0, max(len(ids) - 1, 1), window):
            chunk = ids[start:start + window].unsqueeze(0)
            if chunk.shape[1] < 2:
                break
            target = chunk[0, 1:]
            p = torch.log_softmax(reference(chunk)[0, :-1].float(), dim=-1)
            q = torch.log_softmax(technique(chunk)[0, :-1].float(), dim=-1)
            nll["baseline"] -= float(p.gather(1, target[:, None]).sum())
            nll["technique"] -= float(q.gather(1, target[:, None]).sum())
            kl_sum += float(torch.sum(p.exp() * (p - q), dim=-1).clamp_min(0).sum())
            scored += target.numel()
    if not scored:
        raise ValueError("lm_text_quality needs at least 2 tokens of text: the workload's inputs are empty")
    ppl_base, ppl_tech = math.exp(nll["baseline"] / scored), math.exp(nll["technique"] / scored)
    return {
        "perplexity_baseline": ppl_base,
        "perplexity_technique": ppl_tech,
        "perplexity_change_percent": 100.0 * (ppl_tech / ppl_base - 1.0),
        "next_token_kl_mean": kl_sum / scored,
        "quality_text_tokens": scored,
    }


def text_window(config: Any) -> int:
    """Tokens per teacher-forced window for a model config: its context (``n_positions`` or
    ``max_position_embeddings``), at most 512."""
    return min(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 512, 512)


def copy_quality(loaded: Any, other: Any, texts: list[str], device: str, max_tokens: int) -> dict[str, Any]:
    """What a modified copy of a loaded model costs on the timed inputs' text, untimed.

    Causal LMs: :func:`lm_text_quality` of the two (perplexity of both, its change, mean next-token KL);
    classifiers: mean KL(original || copy) of the label distributions over ``texts``, in nats.

    Args:
        loaded: the :class:`~workbench.models.loading.LoadedModel` (its ``model``, ``tokenizer``, ``kind``).
        other: the copy (quantized, pruned, sparse ...), called like ``loaded.model``.
    """
    import torch

    tokenizer = loaded.tokenizer
    with torch.inference_mode():
        if loaded.kind == "classifier":
            enc = tokenizer([t for t in texts if t], return_tensors="pt", padding=True, truncation=True).to(device)
            p = torch.log_softmax(loaded.model(**enc).logits.float(), dim=-1)  # (B, C)
            q = torch.log_softmax(other(**enc).logits.float(), dim=-1)
            return {"label_kl_mean": float(torch.sum(p.exp() * (p - q), dim=-1).clamp_min(0).mean()),
                    "kl_inputs": len(texts)}
        # Language models: the workload's texts as one stream, in windows the model can take.
        return lm_text_quality(tokenizer, texts, lambda ids: loaded.model(input_ids=ids).logits,
                               lambda ids: other(input_ids=ids).logits, max_tokens, text_window(loaded.model.config),
                               device)


def copy_quality_metrics(q: Mapping[str, Any]) -> list[Any]:
    """The typed metrics of :func:`copy_quality`'s figures, for either kind."""
    from workbench.techniques.base import Metric

    if "perplexity_change_percent" in q:
        return lm_quality_metrics(q)
    return [Metric("label_kl_mean", q["label_kl_mean"], "nats", False, "label KL"),
            Metric("kl_inputs", q["kl_inputs"], "inputs", None, "inputs scored", headline=False)]


def lm_quality_metrics(q: Mapping[str, Any]) -> list[Any]:
    """The typed metrics of :func:`lm_text_quality`'s figures (perplexity change and KL are the headline)."""
    from workbench.techniques.base import Metric

    return [
        Metric("perplexity_baseline", q["perplexity_baseline"], "", False, "perplexity (baseline)", headline=False),
        Metric("perplexity_technique", q["perplexity_technique"], "", False, "perplexity"),
        Metric("perplexity_change_percent", q["perplexity_change_percent"], "%", False, "perplexity change"),
        Metric("next_token_kl_mean", q["next_token_kl_mean"], "nats", False, "next-token KL"),
        Metric("quality_text_tokens", q["quality_text_tokens"], "tokens", None, "tokens scored", headline=False),
    ]


def _flatten(per_batch: list[list[Any]]) -> list[Any]:
    return [row for batch in per_batch for row in batch]


def generation_quality(baseline: list[list[list[int]]], technique: list[list[list[int]]]) -> dict[str, Any]:
    """Token-level agreement of generated ids (per batch, per input) with the baseline's.

    ``token_agreement`` counts positions equal to the baseline, over the baseline's length;
    ``first_mismatch`` locates the first input (and token) that differs, or None.
    """
    base_rows, tech_rows = _flatten(baseline), _flatten(technique)
    equal_positions = total_positions = exact = 0
    first_mismatch = None
    for index, (b, t) in enumerate(zip(base_rows, tech_rows)):
        same = sum(1 for x, y in zip(b, t) if x == y)
        equal_positions += same
        total_positions += max(len(b), 1)
        if b == t:
            exact += 1
        elif first_mismatch is None:
            position = next((i for i, (x, y) in enumerate(zip(b, t)) if x != y), min(len(b), len(t)))
            first_mismatch = {"input": index, "token": position}
    n = len(base_rows)
    return {
        "inputs": n,
        "exact_match_rate": exact / n if n else None,
        "token_agreement": equal_positions / total_positions if total_positions else None,
        "first_mismatch": first_mismatch,
    }


def classification_quality(baseline: list[list[int]], technique: list[list[int]], labels: list[int]) -> dict[str, Any]:
    """Accuracy of both variants on the gold labels, its change in points, and their agreement."""
    base, tech = np.asarray(_flatten(baseline)), np.asarray(_flatten(technique))
    gold = np.asarray(labels)
    base_acc, tech_acc = float((base == gold).mean()), float((tech == gold).mean())
    return {
        "inputs": int(gold.size),
        "accuracy_baseline": base_acc,
        "accuracy_technique": tech_acc,
        "accuracy_change_points": 100.0 * (tech_acc - base_acc),
        "agreement": float((base == tech).mean()),
    }


def psnr_db(reference: np.ndarray, image: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]; inf when identical."""
    mse = float(np.mean((np.asarray(reference, float) - np.asarray(image, float)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def image_quality(baseline: list[list[np.ndarray]], technique: list[list[np.ndarray]]) -> dict[str, Any]:
    """Mean PSNR (dB) and largest absolute pixel difference against the baseline's images."""
    base_rows, tech_rows = _flatten(baseline), _flatten(technique)
    psnrs = [psnr_db(b, t) for b, t in zip(base_rows, tech_rows)]
    finite = [p for p in psnrs if math.isfinite(p)]
    return {
        "inputs": len(psnrs),
        "identical_rate": sum(1 for p in psnrs if not math.isfinite(p)) / len(psnrs) if psnrs else None,
        "psnr_db_mean": float(np.mean(finite)) if finite else None,  # over non-identical images only
        "max_abs_diff": max((float(np.abs(np.asarray(b) - np.asarray(t)).max())
                             for b, t in zip(base_rows, tech_rows)), default=None),
    }


def image_digest(image: np.ndarray) -> str:
    """A short sha256 of an image quantised to 8 bits: equal digests, equal pictures."""
    data = np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


def compare(kind: str, baseline: list[Any], technique: list[Any], labels: list[int] | None = None) -> dict[str, Any]:
    """Quality figures for a model kind (see the per-kind functions)."""
    if kind == "causal_lm":
        return generation_quality(baseline, technique)
    if kind == "classifier":
        return classification_quality(baseline, technique, labels or [])
    return image_quality(baseline, technique)


def ssim(reference: np.ndarray, image: np.ndarray, win_size: int = 7) -> float:
    """Structural similarity (SSIM) of two images (H, W) or (H, W, C) in [0, 1]: 1.0 when identical.

    The window shrinks (odd, at least 3) to fit images smaller than ``win_size``, e.g. 8x8 digits.

    Example:
        >>> image = np.linspace(0, 1, 64).reshape(8, 8, 1)
        >>> ssim(image, image)
        1.0
    """
    from skimage.metrics import structural_similarity

    reference, image = np.asarray(reference, dtype=np.float64), np.asarray(image, dtype=np.float64)
    if reference.shape != image.shape:
        raise ValueError(f"ssim needs images of one shape, got {reference.shape} and {image.shape}")
    side = min(reference.shape[:2])
    window = min(win_size, side if side % 2 else side - 1)
    if window < 3:
        raise ValueError(f"ssim needs images of at least 3x3 pixels, got {reference.shape}")
    channel_axis = -1 if reference.ndim == 3 else None
    return float(structural_similarity(reference, image, win_size=window, data_range=1.0,
                                       channel_axis=channel_axis))


def reference_similarity(references: list[np.ndarray], images: list[np.ndarray]) -> dict[str, Any]:
    """How close images are to reference images of the same seeds: SSIM and PSNR per image and summed up.

    ``psnr_db_mean`` averages the non-identical images only (identical ones have infinite PSNR);
    ``identical_rate`` counts the identical ones.

    Example:
        >>> a = [np.zeros((8, 8, 1)), np.ones((8, 8, 1))]
        >>> reference_similarity(a, a)["ssim_mean"], reference_similarity(a, a)["identical_rate"]
        (1.0, 1.0)
    """
    if len(references) != len(images):
        raise ValueError(f"reference_similarity needs one reference per image, got {len(references)} "
                         f"references for {len(images)} images")
    ssims = [ssim(r, i) for r, i in zip(references, images)]
    psnrs = [psnr_db(r, i) for r, i in zip(references, images)]
    finite = [p for p in psnrs if math.isfinite(p)]
    return {
        "inputs": len(ssims),
        "ssim_mean": float(np.mean(ssims)) if ssims else None,
        "ssim_min": float(np.min(ssims)) if ssims else None,
        "ssim_per_image": ssims,
        "psnr_db_mean": float(np.mean(finite)) if finite else None,  # over non-identical images only
        "identical_rate": (len(psnrs) - len(finite)) / len(psnrs) if psnrs else None,
    }
