"""Model presets: the real server and mobile U-Net configs and the shapes-world pair, as diffusers configs.

A preset is data: the diffusers class name, the constructor arguments (exactly what lands in config.json) and how the
model is driven (prediction type, default latent size, text widths, addition-embedding inputs). ``build`` makes the
model on the meta device (for planning: parameter counts, MACs, pruning plans) or with seeded random weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .conditioning import SDXL_TIME_IDS

Prediction = Literal["epsilon", "v", "flow"]  # epsilon and v (Salimans & Ho 2022): on a discrete schedule

SDXL = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}

SD15 = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
    "norm_num_groups": 32,
}

# The released DreamLite U-Net (../shared/ANCHORS.md); attention_head_dim holds head COUNTS, as in SDXL's config.
DREAMLITE_039B = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownRemoveSelfAttnBlock2D", "CrossAttnDownRemoveSelfAttnBlock2D",
                         "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpRemoveSelfAttnBlock2DV1", "UpBlock2D"],
    "block_out_channels": [256, 512, 896], "transformer_layers_per_block": [1, 2, 4], "num_mid_layers": 1,
    "attention_head_dim": [4, 8, 14], "num_kv_heads": 1, "qk_norm": "rms_norm", "ff_mult": 3, "use_sep_conv": True,
    "cross_attention_dim": 2304, "encoder_hid_dim": 2048, "encoder_hid_dim_type": "text_proj_rms",
    "addition_embed_type": "time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 512,
    "use_linear_projection": True, "norm_num_groups": 32,
}

# Shapes world. Latent: the pixel-unshuffle codec's 48 x 16 x 16. Text: the shapes encoder's 64-wide states.
SHAPES_TEXT_DIM = 64
SHAPES_SERVER = {
    "sample_size": 16, "in_channels": 48, "out_channels": 48, "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [64, 64, 128], "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 2, 4], "cross_attention_dim": SHAPES_TEXT_DIM, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 16,
    "projection_class_embeddings_input_dim": SHAPES_TEXT_DIM + SDXL_TIME_IDS * 16,
    "norm_num_groups": 16,
}
# The DreamLite layout at shapes scale (19.9% of shapes-server's parameters; DreamLite is 15% of SDXL): widths
# [64, 64, 128] -> [64, 64, 64] (multiples of the 16 norm groups, whole 32-channel heads), transformer depth
# [., 1, 2] -> [1, 1, 1] (a new cross-attention layer at stage 1), mid block 2 -> 1, time embedding 256 -> 96, one
# shared key/value head, qk RMSNorm, FFN x3, separable convs, `time` addition embedding (2 ids: height, width), text
# projection with RMSNorm. Stage 1 keeps the teacher's 64 channels: it carries the 48 latent channels (the noise a
# velocity predictor must pass through), and at 48 the pruned student started 4x further from the teacher (output
# deviation 0.50 vs 0.11) and needed about 12x the recovery steps for the same per-noise-level error. Stage 2 keeps
# 64 too, paid for by the narrower time embedding: at 32 it was where shapes form (sigma 0.6 to 0.8), and at equal
# steps the student kept about half as many objects from sigma 0.8 and scored 0.050 against 0.133 (docs/models.md).
SHAPES_MOBILE = {
    "sample_size": 16, "in_channels": 48, "out_channels": 48, "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownRemoveSelfAttnBlock2D", "CrossAttnDownRemoveSelfAttnBlock2D",
                         "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpRemoveSelfAttnBlock2DV1", "UpBlock2D"],
    "block_out_channels": [64, 64, 64], "time_embedding_dim": 96, "transformer_layers_per_block": [1, 1, 1],
    "num_mid_layers": 1,
    "attention_head_dim": [1, 2, 2], "num_kv_heads": 1, "qk_norm": "rms_norm", "ff_mult": 3, "use_sep_conv": True,
    "cross_attention_dim": SHAPES_TEXT_DIM, "encoder_hid_dim": SHAPES_TEXT_DIM, "encoder_hid_dim_type": "text_proj_rms",
    "addition_embed_type": "time", "addition_time_embed_dim": 16, "projection_class_embeddings_input_dim": 32,
    "use_linear_projection": True, "norm_num_groups": 16,
}


@dataclass(frozen=True)
class Preset:
    name: str
    cls: str  # diffusers class name
    config: dict
    prediction: Prediction
    description: str
    codec: str = "vae"  # "pixel-unshuffle" for the shapes world
    text: str = "external"  # "shapes" when the shapes text encoder drives it
    schedule: str = "sdxl"  # training noise schedule of an epsilon model (models/teacher.py SCHEDULES)
    tags: tuple[str, ...] = field(default=())

    def meta(self) -> dict:
        """What a model folder's dreamlite.json records about the preset it was built from."""
        return {"preset": self.name, **({"schedule": self.schedule} if self.prediction != "flow" else {})}


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("sdxl", "UNet2DConditionModel", SDXL, "epsilon", "Stable Diffusion XL base U-Net (2.57B)"),
    Preset("sd15", "UNet2DConditionModel", SD15, "epsilon", "Stable Diffusion 1.5 U-Net (0.86B)"),
    Preset("dreamlite-0.39b", "DreamLiteUNetModel", DREAMLITE_039B, "flow", "DreamLite mobile U-Net (0.39B)"),
    Preset("shapes-server", "UNet2DConditionModel", SHAPES_SERVER, "epsilon",
           "SDXL layout at shapes-world scale (the teacher)", codec="pixel-unshuffle", text="shapes"),
    Preset("shapes-mobile", "DreamLiteUNetModel", SHAPES_MOBILE, "flow",
           "DreamLite layout at shapes-world scale (the student)", codec="pixel-unshuffle", text="shapes"),
]}


def unet_class(name: str):
    """The diffusers model class for a config's ``_class_name`` (an allowlist: nothing else is imported)."""
    import diffusers

    if name not in ("UNet2DConditionModel", "DreamLiteUNetModel"):
        raise ValueError(f"_class_name: {name!r} is not a U-Net dreamlite handles "
                         "(UNet2DConditionModel or DreamLiteUNetModel)")
    return getattr(diffusers, name)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]


def build(config: dict, cls: str, device: str | torch.device = "cpu", seed: int = 0, **overrides):
    """Build a U-Net from a config: on ``device="meta"`` nothing is allocated; otherwise weights are seeded."""
    model_cls = unet_class(cls)
    cfg = {**config, **overrides}
    if str(device) == "meta":
        with torch.device("meta"):
            return model_cls(**cfg)
    torch.manual_seed(seed)
    with torch.device(device):
        return model_cls(**cfg)


def build_preset(name: str, device: str | torch.device = "cpu", seed: int = 0, **overrides):
    p = get_preset(name)
    return build(p.config, p.cls, device, seed, **overrides)
