"""Running a model the ordinary way, per kind: what the baseline does and techniques build on.

Each function takes a loaded model and a :class:`~workbench.workloads.Batch` and returns a
:class:`~workbench.measure.CallOutput`; none prints or draws.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from workbench.measure import CallOutput


class FirstTokenStreamer(BaseStreamer):
    """Records the clock when generate hands over its first new token.

    ``generate`` calls ``put`` once with the prompt, then once per emitted block of tokens (one token
    for greedy decoding, several for an accepted speculative block), so the second ``put`` is the
    first output token, however many tokens one target pass produced.
    """

    def __init__(self) -> None:
        self.first_output_at: float | None = None
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
        elif self.first_output_at is None:
            self.first_output_at = time.perf_counter()

    def end(self) -> None:
        pass


def new_token_ids(sequences: torch.Tensor, prompt_length: int, pad_token_id: int | None,
                  eos_token_id: int | None) -> list[list[int]]:
    """New tokens per row (B rows), cut after the first end-of-sequence token."""
    rows = []
    for row in sequences[:, prompt_length:].tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        rows.append(row)
    return rows


def generate(model: Any, tokenizer: Any, batch: Any, max_new_tokens: int, **extra: Any) -> CallOutput:
    """Greedy (or ``extra``-configured) generation; outputs are the new token ids per input."""
    streamer = FirstTokenStreamer() if batch.size == 1 else None
    kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    kwargs.update(extra)
    with torch.inference_mode():
        sequences = model.generate(**batch.inputs, streamer=streamer, **kwargs)
    rows = new_token_ids(sequences, batch.inputs["input_ids"].shape[1], tokenizer.pad_token_id,
                         tokenizer.eos_token_id)
    return CallOutput(
        output=rows,
        new_tokens=sum(len(r) for r in rows),
        first_output_at=None if streamer is None else streamer.first_output_at,
    )


def classify(model: Any, batch: Any) -> CallOutput:
    """Predicted label indices, one per input."""
    with torch.inference_mode():
        logits = model(**batch.inputs).logits  # (B, num_labels)
    return CallOutput(output=logits.argmax(dim=-1).tolist())


def draw(pipe: Any, batch: Any, num_inference_steps: int, **extra: Any) -> CallOutput:
    """Images (B, H, W, C) in [0, 1] as numpy, one seeded generator per input."""
    device = getattr(pipe, "device", torch.device("cpu"))
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in batch.seeds]
    inputs: dict[str, Any] = {}
    if batch.class_labels is not None:
        inputs["class_labels"] = batch.class_labels
    else:
        inputs["prompt"] = batch.prompts
    with torch.inference_mode():
        images = pipe(**inputs, num_inference_steps=num_inference_steps, generator=generators,
                      output_type="np", **extra).images
    return CallOutput(output=list(images))


def run_plain(loaded: Any, batch: Any, spec: Any, sampling: dict[str, Any] | None = None) -> CallOutput:
    """The model as it is, by kind: what the baseline variant runs.

    ``sampling`` (``generate`` settings such as ``do_sample``, ``temperature``, ``top_k``, ``top_p``)
    makes a causal LM sample instead of decoding greedily; the caller seeds torch before each call.
    """
    if sampling is not None and loaded.kind != "causal_lm":
        raise ValueError(f"sampling settings {sampling} apply to causal LMs only, not to a {loaded.kind} model")
    if loaded.kind == "causal_lm":
        return generate(loaded.model, loaded.tokenizer, batch, spec.workload.max_new_tokens, **(sampling or {}))
    if loaded.kind == "classifier":
        return classify(loaded.model, batch)
    return draw(loaded.model, batch, spec.workload.num_inference_steps)
