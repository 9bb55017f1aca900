"""VCD, Visual Contrastive Decoding (Leng et al., CVPR 2024): contrast with a noised image.

Next-token logits l(x, v) with the image and l(x, v') with the image after `noise_step` steps of DDPM forward
noising (1000-step schedule, sigmoid betas from 1e-5 to 5e-3, on the normalised pixel tensor):
    l_cd = (1 + alpha) l(x, v) - alpha l(x, v'), with tokens where l(x, v) < log(beta) + max l(x, v) set to -inf.
Greedy decoding and sampling both work (the authors' code samples only). Each image's noise is drawn from a generator
seeded with `seed`, so a run is reproducible and an image gets the same noise alone or in a batch. For Qwen-VL, whose
pixel tensor is a list of patches with each image repeated over two frames, the noise is drawn per patch element, so
the two frames get different noise.
"""

from __future__ import annotations

import math

import torch

from neverfade.methods.base import Flags, Method, Param, register


def ddpm_noise(pixels: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps under VCD's schedule, t in 0..999 indexed as VCD's code does."""
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1 - betas, dim=0)[step].item()
    eps = torch.randn(pixels.shape, generator=generator, dtype=torch.float32).to(pixels.device)
    return (math.sqrt(alpha_bar) * pixels.float() + math.sqrt(1 - alpha_bar) * eps).to(pixels.dtype)


@register
class VCD(Method):
    name = "vcd"
    summary = "Contrast the next-token logits with those for a noised image (VCD)."
    params = (
        Param(
            "alpha", 1.0, "contrast strength: (1 + alpha) l(x, v) - alpha l(x, v')", "paper: VCD's default", minimum=0.0
        ),
        Param(
            "beta",
            0.1,
            "plausibility: keep tokens with p >= beta * max p under the clean image",
            "paper: VCD's default",
            minimum=0.0,
            maximum=1.0,
        ),
        Param(
            "noise_step",
            500,
            "DDPM forward-noising step t (0..999) of the 1000-step schedule",
            "paper: VCD's default",
            type=int,
            minimum=0,
            maximum=999,
        ),
        Param("seed", 0, "seed of the noise", "our choice: reproducible runs", type=int, minimum=0),
    )

    def flags(self):
        return Flags(strategy="contrast")

    def bind(self, info):
        super().bind(info)
        self.family = info.family  # what an image is encoded from, and which pixels are whose

    def contrast_inputs(self, model, input_ids, model_kwargs, raw_inputs):
        """The same prompt with the noised image; its features are encoded from the pixels in its own prefill."""
        source = raw_inputs if raw_inputs.get("pixel_values") is not None else model_kwargs
        if source.get("pixel_values") is None:
            raise ValueError("vcd needs the pixels: call generate with neverfade_inputs=<the processor's outputs>")
        other = {k: v for k, v in model_kwargs.items() if k != "mm_encoder_outputs"}
        other.update({k: source[k] for k in self.family.image_inputs if source.get(k) is not None})
        other["pixel_values"] = self.noised(source["pixel_values"], self.family.pixel_split(source))
        padding = self.family.pixel_padding(source)
        if padding is not None:
            other["pixel_values"] = torch.where(padding, source["pixel_values"], other["pixel_values"])
        return input_ids, other

    def noised(self, pixels: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Each image (`sizes`: its leading entries of `pixels`) noised on its own, with the same seed, so an image
        gets the same noise in any batch."""
        return torch.cat(
            [
                ddpm_noise(part, self.noise_step, torch.Generator().manual_seed(self.seed))
                for part in pixels.split(sizes)
            ]
        )

    def combine(self, logits: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
        cutoff = math.log(self.beta) + logits.max(dim=-1, keepdim=True).values if self.beta > 0 else None
        combined = (1 + self.alpha) * logits - self.alpha * contrast
        return combined if cutoff is None else combined.masked_fill(logits < cutoff, float("-inf"))
