"""Text-to-image quality in the features of a CLIP model the user keeps on disk (nothing is downloaded): the CLIP
score of images against their prompts, ``100 * max(cos(image, text), 0)`` averaged (Hessel et al. 2021), and the
Fréchet distance between two image sets in CLIP's image embedding. Both need a local folder that
``transformers.CLIPModel`` and ``CLIPProcessor`` load (e.g. a saved ``openai/clip-vit-base-patch32``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from fewstep.errors import ConfigError
from fewstep.eval.digits import frechet_distance


class ClipFeatures:
    """A local CLIP model: image and text embeddings (unit length)."""

    def __init__(self, folder: str | Path):
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"eval.encoder: {folder} is not a saved CLIP model folder (no config.json)")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ConfigError(f"eval.encoder: cannot load a CLIP model and processor from {folder}: "
                              f"{type(error).__name__}") from None

    @torch.no_grad()
    def images(self, pixels: Tensor) -> Tensor:
        """Embeddings of images ``(N, 3, H, W)`` in ``[-1, 1]``."""
        inputs = self.processor(images=list(((pixels.clamp(-1, 1) + 1) / 2).float().cpu()), return_tensors="pt",
                                do_rescale=False)
        features = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        return torch.nn.functional.normalize(getattr(features, "pooler_output", features), dim=-1)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> Tensor:
        inputs = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True)
        features = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return torch.nn.functional.normalize(getattr(features, "pooler_output", features), dim=-1)


def clip_score(image_features: Tensor, text_features: Tensor) -> float:
    """``100 * mean(max(cos, 0))`` over matching rows of unit-length image and text embeddings."""
    return float(100 * (image_features * text_features).sum(-1).clamp(min=0).mean())


def clip_frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between two sets of CLIP image embeddings (meaningful with many more images than the
    embedding's dimension)."""
    return frechet_distance(features_a, features_b)
