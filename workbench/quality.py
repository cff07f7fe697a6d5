"""Quality of a technique's outputs against the baseline's, on the same inputs and seeds.

Every speed figure is shown beside one of these. Functions return plain dicts of numbers.

Example:
    >>> generation_quality([[[1, 2, 3]]], [[[1, 2, 4]]])["token_agreement"]
    0.6666666666666666
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np


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
