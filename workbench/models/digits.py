"""Class-conditional 8x8 digit diffusion (a real diffusers pipeline) and a digit judge.

* :class:`DigitsPipeline` - a :class:`diffusers.DiffusionPipeline` around a class-conditional
  :class:`diffusers.UNet2DModel` (``num_class_embeds=10``) and a diffusers scheduler (DDIM by
  default). It follows diffusers' conventions: ``num_inference_steps``, ``generator``,
  ``output_type``, ``callback_on_step_end`` and ``pipe._interrupt`` for stopping early.
* :class:`DigitJudge` - a small CNN that says which digit an 8x8 image shows; the quality figure
  for class-conditional generation ("does the image show the digit that was asked for?").
* :func:`train_diffusion` and :func:`train_judge` - seeded training on :func:`workbench.datasets.digits`.

Image conventions: models take ``(B, 1, 8, 8)`` float tensors in [-1, 1]; the pipeline's ``"np"``
output is ``(B, 8, 8, 1)`` float32 in [0, 1], as in diffusers.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import EMAModel
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from tqdm.auto import tqdm

from workbench import datasets

NUM_CLASSES = 10
IMAGE_SIZE = 8


@dataclass
class DigitsPipelineOutput(ImagePipelineOutput):
    """:class:`ImagePipelineOutput` plus how many denoising steps really ran.

    Attributes:
        images: ``np.ndarray`` ``(B, 8, 8, 1)`` in [0, 1] for ``"np"``; ``torch.Tensor``
            ``(B, 1, 8, 8)`` in [0, 1] for ``"pt"``; a list of 8x8 ``PIL.Image`` for ``"pil"``;
            the raw ``(B, 1, 8, 8)`` sample in [-1, 1] for ``"latent"``.
        num_inference_steps_run: UNet evaluations per image; fewer than asked when a callback
            set ``pipe._interrupt = True``.
    """

    num_inference_steps_run: int = 0


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional generation of 8x8 digits.

    Example:
        >>> from workbench.models import zoo
        >>> from workbench.models.digits import DigitsPipeline
        >>> pipe = DigitsPipeline.from_zoo_dir(zoo.model_dir("digits-diffusion"))  # doctest: +SKIP
        >>> out = pipe([3, 7], num_inference_steps=20, generator=torch.manual_seed(0))  # doctest: +SKIP
        >>> out.images.shape  # doctest: +SKIP
        (2, 8, 8, 1)

    Stopping early: a ``callback_on_step_end`` may set ``pipe._interrupt = True``; the loop then
    stops and the images are the scheduler's last prediction of the clean sample
    (``pred_original_sample``), not the half-denoised latents. The output says how many steps ran.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents", "pred_original_sample"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def from_zoo_dir(cls, path: str | Path, **kwargs: Any) -> "DigitsPipeline":
        """Load ``unet/`` and ``scheduler/`` from a zoo folder (safetensors only)."""
        return cls.from_pretrained(str(path), use_safetensors=True, **kwargs)

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    def check_inputs(
        self,
        class_labels: list[int],
        num_inference_steps: int,
        output_type: str,
        callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str],
    ) -> None:
        n_classes = self.unet.config.num_class_embeds
        if not class_labels:
            raise ValueError("class_labels must name at least one class, got an empty list")
        bad = [c for c in class_labels if not isinstance(c, (int, np.integer)) or not 0 <= c < n_classes]
        if bad:
            raise ValueError(f"class_labels must be ints in [0, {n_classes}), got {bad[:5]}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if output_type not in ("np", "pt", "pil", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt', 'pil' or 'latent', got {output_type!r}")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} unknown; choose from {self._callback_tensor_inputs}"
            )

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int],
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[["DigitsPipeline", int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str] = ("latents",),
    ) -> DigitsPipelineOutput | tuple:
        """Generate one image per entry of ``class_labels``.

        Args:
            class_labels: digits to draw, ``B`` ints in 0..9.
            num_inference_steps: denoising steps (UNet evaluations per image).
            generator: torch generator(s) for the initial noise (and DDPM/DDIM ``eta`` noise).
            eta: DDIM noise weight (0 = deterministic DDIM); ignored by schedulers without it.
            output_type: ``"np"`` (B, 8, 8, 1) in [0, 1], ``"pt"`` (B, 1, 8, 8) in [0, 1],
                ``"pil"`` or ``"latent"`` (raw (B, 1, 8, 8) in [-1, 1]).
            return_dict: return :class:`DigitsPipelineOutput` (else a tuple ``(images,)``).
            callback_on_step_end: ``fn(pipe, step_index, timestep, callback_kwargs) -> dict``
                called after each step; returned ``"latents"`` replace the current latents.
            callback_on_step_end_tensor_inputs: which tensors go into ``callback_kwargs``
                (``"latents"``, ``"pred_original_sample"``).

        Guidance: there is no classifier-free guidance; the UNet has no "no class" embedding.
        """
        # 1. Check inputs
        self.check_inputs(class_labels, num_inference_steps, output_type, callback_on_step_end_tensor_inputs)
        self._interrupt = False
        device, dtype = self._execution_device, self.unet.dtype
        batch = len(class_labels)
        labels = torch.tensor([int(c) for c in class_labels], device=device, dtype=torch.long)

        # 2. Initial noise (B, C, H, W)
        size = self.unet.config.sample_size
        shape = (batch, self.unet.config.in_channels, size, size)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

        # 3. Timesteps and scheduler extras
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        step_params = set(inspect.signature(self.scheduler.step).parameters)
        extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in step_params}

        # 4. Denoising loop
        pred_original_sample = latents
        steps_run = 0
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t)
            noise_pred = self.unet(model_input, t, class_labels=labels).sample
            out = self.scheduler.step(noise_pred, t, latents, **extra)
            latents = out.prev_sample
            pred_original_sample = getattr(out, "pred_original_sample", None)
            if pred_original_sample is None:
                pred_original_sample = latents
            steps_run = i + 1
            if callback_on_step_end is not None:
                local = {"latents": latents, "pred_original_sample": pred_original_sample}
                callback_kwargs = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                latents = callback_outputs.pop("latents", latents)
            if self.interrupt:
                break

        # 5. An interrupted run returns the last clean-sample prediction
        sample = pred_original_sample if steps_run < len(self.scheduler.timesteps) else latents
        self.maybe_free_model_hooks()

        # 6. Post-process
        images = _postprocess(sample, output_type)
        if not return_dict:
            return (images,)
        return DigitsPipelineOutput(images=images, num_inference_steps_run=steps_run)


def _postprocess(sample: torch.Tensor, output_type: str) -> Any:
    """(B, 1, H, W) in [-1, 1] -> the requested output type."""
    if output_type == "latent":
        return sample
    images = (sample / 2 + 0.5).clamp(0, 1).float()
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray((a[:, :, 0] * 255).round().astype(np.uint8), mode="L") for a in array]


class DigitJudge(nn.Module, PyTorchModelHubMixin):
    """A small CNN that classifies 8x8 digits; saved as ``model.safetensors`` + ``config.json``.

    Example:
        >>> judge = DigitJudge()
        >>> judge(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> judge.predict(np.zeros((2, 8, 8, 1), dtype=np.float32)).shape
        (2,)
    """

    def __init__(self, channels: tuple[int, int] | list[int] = (32, 64), hidden: int = 128, dropout: float = 0.25):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),                    # (B, c1, 8, 8)
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, c2, 4, 4)
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(c2 * 16, hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images ``(B, 1, 8, 8)`` in [-1, 1] -> logits ``(B, 10)``."""
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> np.ndarray:
        """Digits shown by pipeline output images: ``(B, 8, 8, 1)`` in [0, 1] -> ``(B,)`` int64."""
        if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
            raise ValueError(f"images must have shape (B, 8, 8, 1) (pipeline 'np' output), got {images.shape}")
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1
        was_training = self.training
        self.eval()
        labels = self(x).argmax(-1).numpy()
        self.train(was_training)
        return labels


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class JudgeRecipe:
    """How the judge is trained."""

    channels: tuple[int, int] = (32, 64)  # conv widths; wider = more accurate, slower
    hidden: int = 128  # fully connected width
    epochs: int = 30  # passes over the 1,437 training digits
    batch_size: int = 64
    lr: float = 2e-3  # AdamW peak learning rate (cosine decay)


@dataclass(frozen=True)
class DiffusionRecipe:
    """How the digit UNet is built and trained."""

    block_out_channels: tuple[int, ...] = (32, 64)  # UNet widths per resolution (8x8, 4x4)
    layers_per_block: int = 1  # ResNet blocks per resolution; more = better samples, slower
    attention: bool = True  # self-attention at 4x4
    steps: int = 1200  # optimizer steps
    batch_size: int = 128
    lr: float = 2e-3  # AdamW peak learning rate (cosine decay, short warm-up)
    ema_decay: float = 0.995  # EMA of weights used for sampling; 0 disables
    num_train_timesteps: int = 1000


def _cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    return peak * min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / steps))


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Yield ``steps`` index tensors, epoch by epoch, each epoch a seeded permutation of ``range(n)``."""
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (the training set size), got {batch_size}")
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            if done == steps:
                return
            yield perm[start:start + batch_size]
            done += 1


@torch.no_grad()
def judge_accuracy(judge: DigitJudge, images: np.ndarray, labels: np.ndarray) -> float:
    """Share of ``images`` ``(N, 1, 8, 8)`` in [-1, 1] the judge labels correctly."""
    judge.eval()
    pred = judge(torch.from_numpy(images)).argmax(-1).numpy()
    return float((pred == labels).mean())


def train_judge(recipe: JudgeRecipe, seed: int = 0, progress: bool = True) -> tuple[DigitJudge, dict[str, Any]]:
    """Train a :class:`DigitJudge` on the digits train split.

    Returns:
        ``(judge, stats)`` with stats keys ``steps``, ``final_loss``, ``metrics`` (test accuracy),
        ``config`` and ``data``.
    """
    # 1. Data and model
    torch.manual_seed(seed)
    x_train, y_train = datasets.digits("train", seed=seed)
    x_test, y_test = datasets.digits("test", seed=seed)
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    judge = DigitJudge(channels=tuple(recipe.channels), hidden=recipe.hidden)
    steps = recipe.epochs * (len(x) // recipe.batch_size)
    opt = torch.optim.AdamW(judge.parameters(), lr=recipe.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)

    # 2. Train (small random shifts make the judge robust to generated images)
    judge.train()
    losses = []
    for step, idx in enumerate(tqdm(_batches(len(x), recipe.batch_size, steps, gen), total=steps,
                                    desc="digits-judge", disable=not progress)):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, recipe.lr, warmup=10)
        batch = _random_shift(x[idx], gen)
        loss = nn.functional.cross_entropy(judge(batch), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())

    # 3. Evaluate
    judge.eval()
    stats = {
        "steps": steps,
        "final_loss": float(np.mean(losses[-20:])),
        "metrics": {"test_accuracy": judge_accuracy(judge, x_test, y_test), "test_images": float(len(y_test))},
        "config": asdict(recipe),
        "data": f"scikit-learn load_digits, stratified 80/20 split (seed {seed}): "
                f"{len(y_train)} train / {len(y_test)} test 8x8 images",
    }
    return judge, stats


def _random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image ``(B, 1, 8, 8)`` by up to ``max_shift`` pixels, padding with background (-1)."""
    padded = nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, len(x)), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(len(x))])


def new_unet(recipe: DiffusionRecipe) -> UNet2DModel:
    """A class-conditional UNet2DModel for (B, 1, 8, 8) samples."""
    n = len(recipe.block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if recipe.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=IMAGE_SIZE, in_channels=1, out_channels=1,
        block_out_channels=tuple(recipe.block_out_channels), layers_per_block=recipe.layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up),
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=NUM_CLASSES,
    )


def new_scheduler(recipe: DiffusionRecipe) -> DDIMScheduler:
    """The inference scheduler saved with the pipeline (DDIM, cosine betas, trailing spacing)."""
    return DDIMScheduler(
        num_train_timesteps=recipe.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
        clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing",
    )


def train_diffusion(recipe: DiffusionRecipe, seed: int = 0, progress: bool = True) -> tuple[DigitsPipeline, dict[str, Any]]:
    """Train the class-conditional digit UNet (epsilon prediction) and wrap it in a DDIM pipeline.

    Returns:
        ``(pipeline, stats)`` with stats keys ``steps``, ``final_loss``, ``config``, ``data``,
        ``metrics`` (empty: judge accuracy is measured by the caller, who has the judge).
    """
    # 1. Data, model, noise schedule
    torch.manual_seed(seed)
    x_train, y_train = datasets.digits("train", seed=seed)
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    unet = new_unet(recipe)
    ddim = new_scheduler(recipe)
    noise_schedule = DDPMScheduler.from_config(ddim.config)
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=1e-4)
    ema = EMAModel(unet.parameters(), decay=recipe.ema_decay) if recipe.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(seed)

    # 2. Train: predict the noise added at a random timestep
    unet.train()
    losses = []
    batches = _batches(len(x), recipe.batch_size, recipe.steps, gen)
    for step, idx in enumerate(tqdm(batches, total=recipe.steps, desc="digits-diffusion", disable=not progress)):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, recipe.steps, recipe.lr, warmup=50)
        clean = x[idx]                                                         # (B, 1, 8, 8)
        noise = torch.randn(clean.shape, generator=gen)
        t = torch.randint(0, recipe.num_train_timesteps, (len(idx),), generator=gen)
        noisy = noise_schedule.add_noise(clean, noise, t)
        loss = nn.functional.mse_loss(unet(noisy, t, class_labels=y[idx]).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if ema is not None:
            ema.step(unet.parameters())
        losses.append(loss.item())
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval()

    # 3. Wrap
    pipe = DigitsPipeline(unet=unet, scheduler=ddim)
    stats = {
        "steps": recipe.steps,
        "final_loss": float(np.mean(losses[-50:])),
        "metrics": {},
        "config": asdict(recipe),
        "data": f"scikit-learn load_digits train split (seed {seed}): {len(y_train)} 8x8 images, 10 classes",
    }
    return pipe, stats


@torch.no_grad()
def generation_accuracy(
    pipe: DigitsPipeline, judge: DigitJudge, num_inference_steps: int, per_class: int = 10, seed: int = 0
) -> float:
    """Share of generated digits the judge labels as the class that was asked for.

    Generates ``per_class`` images of each digit at ``num_inference_steps`` from ``seed``.
    """
    labels = [c for c in range(NUM_CLASSES) for _ in range(per_class)]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(labels, num_inference_steps=num_inference_steps, generator=torch.manual_seed(seed)).images
    return float((judge.predict(images) == np.array(labels)).mean())
