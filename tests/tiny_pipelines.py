"""Tiny diffusers text-to-image pipelines built from configs with random weights (no download): an SD-like UNet
pipeline with CLIP and a VAE, an SDXL-like one with two encoders and size conditioning, and an SD3-like transformer
pipeline (two CLIP encoders, no T5), and a FLUX-like one (CLIP pooled + a one-layer T5). The CLIP tokenizer is BPE over
single letters; the T5 tokenizer a unigram model over a few words."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

MAX_TOKENS = 16
KINDS = ("sd", "sdxl", "sd3", "flux")
WORDS = ("a", "an", "the", "cat", "dog", "red", "fox", "bird", "very", "long", "prompt", "about", "many", "things",
         "and", "more")


def tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)


def t5_tokenizer() -> T5TokenizerFast:
    vocab = ["<pad>", "</s>", "<unk>", *WORDS]
    words = Tokenizer(models.Unigram([(word, 0.0 if i < 3 else -1.0) for i, word in enumerate(vocab)], unk_id=2))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return T5TokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           model_max_length=MAX_TOKENS, extra_ids=0)


def clip(width: int, projection: bool = False) -> torch.nn.Module:
    config = CLIPTextConfig(vocab_size=54, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=width)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def vae(latent_channels: int = 4, **extra) -> diffusers.AutoencoderKL:
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels,
                                   norm_num_groups=8, sample_size=16, **extra)


def unet(cross_attention_dim: int, **extra) -> diffusers.UNet2DConditionModel:
    return diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                          block_out_channels=(16, 32), norm_num_groups=8,
                                          cross_attention_dim=cross_attention_dim, attention_head_dim=4,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **extra)


def build(kind: str, folder: Path) -> Path:
    """Save a tiny pipeline of ``kind`` (one of :data:`KINDS`) to ``folder`` and return it."""
    torch.manual_seed(0)
    words = tokenizer(folder.parent / f"{folder.name}-tokenizer")
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if kind == "sd":
        pipe = diffusers.StableDiffusionPipeline(vae=vae(), text_encoder=clip(16), tokenizer=words, unet=unet(16),
                                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    elif kind == "sdxl":
        network = unet(32, addition_embed_type="text_time", addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=6 * 8 + 16, transformer_layers_per_block=1)
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae(), text_encoder=clip(16), text_encoder_2=clip(16, True),
                                                   tokenizer=words, tokenizer_2=words, unet=network,
                                                   scheduler=scheduler)
    elif kind == "flux":
        network = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                                   pooled_projection_dim=16, axes_dims_rope=[2, 2, 4])
        t5 = T5EncoderModel(T5Config(vocab_size=3 + len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                     num_heads=2))
        pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                      vae=vae(scaling_factor=0.3611, shift_factor=0.1159),  # FLUX's own
                                      text_encoder=clip(16), tokenizer=words, text_encoder_2=t5,
                                      tokenizer_2=t5_tokenizer(), transformer=network)
    else:
        network = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                                  attention_head_dim=8, num_attention_heads=2,
                                                  joint_attention_dim=32, caption_projection_dim=16,
                                                  pooled_projection_dim=32, out_channels=4)
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=network, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=vae(scaling_factor=1.5305, shift_factor=0.0609),  # SD3's own
            text_encoder=clip(16, True), tokenizer=words, text_encoder_2=clip(16, True), tokenizer_2=words,
            text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder)
    return folder


def clip_model(folder: Path) -> Path:
    """A tiny CLIP model and processor saved to ``folder`` (for ``eval.encoder``)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    text = {"vocab_size": 54, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": MAX_TOKENS}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer(folder.parent / f"{folder.name}-tokenizer")
                  ).save_pretrained(folder)
    return folder


def save_sd_with_images(folder: Path, unet: diffusers.UNet2DConditionModel, vae_model: diffusers.AutoencoderKL,
                        text_width: int, pixels: int, count: int) -> None:
    """An SD pipeline around ``unet`` and ``vae_model`` (a one-layer CLIP text encoder of ``text_width``, SD's
    scheduler) saved in ``folder/pipe``, and ``count`` random images of ``pixels`` px captioned "a cat" / "a dog" in
    ``folder/images``."""
    from PIL import Image

    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = diffusers.StableDiffusionPipeline(vae=vae_model, text_encoder=clip(text_width),
                                             tokenizer=tokenizer(folder / "tok"), unet=unet, scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    images = folder / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        Image.fromarray((torch.rand(pixels, pixels, 3, generator=generator) * 255).to(torch.uint8).numpy()).save(
            images / f"{i}.png")
        (images / f"{i}.txt").write_text("a cat" if i % 2 else "a dog")
