"""The offline tiny model zoo: seven small real models trained locally, no network needed.

| name               | kind        | what it is                                                        |
|--------------------|-------------|-------------------------------------------------------------------|
| ``code-target``    | causal_lm   | deep GPT-2 on stdlib code; the slow model speculative decoding speeds up |
| ``code-draft``     | causal_lm   | 1-layer GPT-2, same tokenizer, distilled from the target          |
| ``code-wide``      | causal_lm   | 2-layer x 512 GPT-2, same tokenizer: matmul-bound, int8 pays here |
| ``code-classifier``| classifier  | BERT: code snippet -> stdlib package area (early exit has layers) |
| ``digits-diffusion``| diffusion  | class-conditional UNet2DModel + DDIM, 8x8 digits                   |
| ``digits-judge``   | judge       | CNN that says which digit an 8x8 image shows                      |
| ``code-shared``    | causal_lm   | GPT-2 whose 8 blocks x 128 are one shared set of weights, trained with a random number of iterations per batch (ODE pre-training): ``ode_steps`` runs it in fewer, larger steps |

More are built only when named (``workbench zoo build --extra``, or ``build(names=[...])``): siblings
that give the meta-learner's seed data more than one model of each shape, so that leaving one model out
still leaves a similar one to learn from:

| name                    | kind       | what it is                                                    |
|-------------------------|------------|---------------------------------------------------------------|
| ``code-tall``           | causal_lm  | 12-layer x 96 GPT-2 (deep and narrow, like ``code-target``)    |
| ``code-mid``            | causal_lm  | 4-layer x 320 GPT-2 (between ``code-target`` and ``code-wide``) |
| ``code-classifier-deep``| classifier | 8-layer x 48 BERT snippet classifier                            |
| ``code-shared-plain``   | causal_lm  | ``code-shared``'s plain sibling: same data, seed and steps, always 8 iterations |
| ``code-classifier-shared`` | classifier | ALBERT (one layer x 64 applied 8 times) snippet classifier with ODE pre-training |
| ``code-classifier-shared-plain`` | classifier | its plain sibling, always 8 iterations            |

The shared pairs (trick and plain) are there for ``ode_steps`` and ``bench/ode_steps.py``: the same model
trained with and without the random-iterations pre-training, to show what the trick buys.

Each model lives in ``<root>/<name>/`` with the files its library expects (``save_pretrained``,
safetensors only) and ``workbench_zoo.json`` (a :class:`ZooRecord`). Language models and the
classifier load with ``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification`` and
``AutoTokenizer``; the diffusion folder with :meth:`DigitsPipeline.from_pretrained`; the judge with
:meth:`DigitJudge.from_pretrained`.

Example:
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from workbench.models import zoo
    >>> records = zoo.build(quick=True)  # doctest: +SKIP
    >>> path = zoo.model_dir("code-target")  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
    >>> tokenizer = AutoTokenizer.from_pretrained(path)  # doctest: +SKIP

The package's modules: ``catalogue`` (the models, their records and recipes), ``builder`` (what is up to
date, the atomic build of each model) and ``trainers`` (how each model is trained).
"""

from __future__ import annotations

from workbench.models.zoo.builder import build, list_models, model_dir, record
from workbench.models.zoo.catalogue import (DEFAULT_NAMES, DEFAULT_SEED, EXTRA_NAMES, FORMAT_VERSION, METADATA_FILE,
                                            PRETRAINED_NAMES,
                                            MODELS, ZOO_NAMES, ClassifierRecipe, LMRecipe, TokenizerRecipe, ZooError,
                                            ZooModel, ZooRecord)

__all__ = ["DEFAULT_NAMES", "DEFAULT_SEED", "EXTRA_NAMES", "FORMAT_VERSION", "METADATA_FILE", "MODELS", "PRETRAINED_NAMES",
           "ZOO_NAMES",
           "ClassifierRecipe", "LMRecipe", "TokenizerRecipe", "ZooError", "ZooModel", "ZooRecord", "build",
           "list_models", "model_dir", "record"]
