"""A model as the CLI and the recipes see it: U-Net + text encoder + codec + how it is sampled, saved as a folder.

Folder layout (the U-Net at the root, so ``UNet2DConditionModel.from_pretrained(folder)`` or
``DreamLiteUNetModel.from_pretrained(folder)`` loads it directly)::

    config.json, diffusion_pytorch_model.safetensors   the U-Net (diffusers)
    text_encoder/                                      the text encoder (shapes encoder or transformers)
    vae/                                               a diffusers VAE, when the codec is not pixel-unshuffle
    scheduler/scheduler_config.json                    an epsilon or v model's training schedule, as diffusers'
                                                       ``DDPMScheduler.from_pretrained(folder, subfolder="scheduler")``
    dreamlite.json                                     preset, prediction, in-context, image size, codec, provenance

A diffusers pipeline folder (``model_index.json`` with ``unet/``) and ``PRESET:weights.safetensors`` also load.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from dreamlite.io import DreamliteError, inside, read_json, write_json

from .codec import Codec, PixelUnshuffleCodec, VAECodec
from .presets import PRESETS, Prediction, build, get_preset, unet_class
from .teacher import SCHEDULES, schedule_config
from .text import ShapesTextEncoder, TextEncoder, load_text_encoder

META = "dreamlite.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class Bundle:
    unet: nn.Module
    prediction: Prediction
    in_context: bool  # DreamLite layout: input is (target | cond) along the width
    image_size: int  # default output size in pixels
    text: TextEncoder | None = None
    codec: Codec | None = None
    name: str = ""
    folder: Path | None = None
    meta: dict = field(default_factory=dict)
    denoiser: object = None  # an exported artifact's ONNX Runtime denoiser (the U-Net is then a meta-device shell)

    @property
    def schedule(self) -> str:
        """The discrete training schedule of an epsilon model (``sdxl`` unless its dreamlite.json says otherwise)."""
        return self.meta.get("schedule", "sdxl")

    @property
    def text_tokens(self) -> int:
        """Text length the U-Net is called with: the text encoder's, else the shapes encoder's 24 or CLIP's 77."""
        if hasattr(getattr(self.text, "config", None), "max_tokens"):
            return self.text.config.max_tokens
        return 24 if self.meta.get("preset", "").startswith("shapes") else 77

    def latent_size(self, image_size: int | None = None) -> int:
        factor = self.codec.factor if self.codec else 8
        return (image_size or self.image_size) // factor

    def save_pretrained(self, folder, **provenance) -> None:
        """Write the folder described in the module docstring (the U-Net in safetensors, never pickle)."""
        folder = Path(folder)
        self.unet.save_pretrained(folder, safe_serialization=True)
        if isinstance(self.text, ShapesTextEncoder):
            self.text.save_pretrained(folder / "text_encoder")
        if self.prediction != "flow":
            from diffusers import DDPMScheduler
            DDPMScheduler.from_config(schedule_config(self.schedule, self.prediction)).save_config(folder / "scheduler")
        codec = {"kind": "pixel-unshuffle", "factor": self.codec.factor} if isinstance(
            self.codec, PixelUnshuffleCodec) else {"kind": "vae", "folder": "vae"}
        write_json(folder / META, {**self.meta, **provenance, "prediction": self.prediction,
                                   "in_context": self.in_context, "image_size": self.image_size, "codec": codec})


def _defaults(cls_name: str) -> tuple[Prediction, bool]:
    return ("flow", True) if cls_name == "DreamLiteUNetModel" else ("epsilon", False)


def from_preset(name: str, device="cpu", seed: int = 0, text: TextEncoder | None = None) -> Bundle:
    """A preset with random (seeded) weights, or on ``device="meta"`` without allocating any."""
    p = get_preset(name)
    unet = build(p.config, p.cls, device, seed)
    codec = PixelUnshuffleCodec() if p.codec == "pixel-unshuffle" else None
    if text is None and p.text == "shapes" and str(device) != "meta":
        torch.manual_seed(seed)
        text = ShapesTextEncoder.for_shapes()
    factor = codec.factor if codec else 8
    return Bundle(unet, p.prediction, p.cls == "DreamLiteUNetModel", p.config["sample_size"] * factor, text, codec,
                  name=name, meta=p.meta())


def _unet_folder(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    if (folder / "model_index.json").is_file() and (folder / "unet" / "config.json").is_file():
        return folder / "unet"
    raise DreamliteError(f"{folder}: not a diffusers model folder (no config.json, and no model_index.json with "
                         "unet/)")


def load_unet(folder: Path, device="cpu", meta: bool = False) -> nn.Module:
    cfg = read_json(folder / "config.json")
    name = cfg.get("_class_name") if isinstance(cfg, dict) else None
    try:
        cls = unet_class(name)
    except ValueError as e:
        raise DreamliteError(f"{folder / 'config.json'}: {e}") from None
    if meta:
        with torch.device("meta"):
            return cls.from_config(cls.load_config(folder))
    if not (folder / WEIGHTS).is_file():
        found = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.ckpt"))
        hint = f" (found {found[0]}: dreamlite never unpickles; convert it to safetensors)" if found else ""
        raise DreamliteError(f"{folder}: no {WEIGHTS}{hint}")
    try:
        model = cls.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=True, torch_dtype=torch.float32)
        return model.to(device).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise DreamliteError(f"{folder}: cannot load the U-Net ({str(e).splitlines()[0]})") from None


ZOO = Path(__file__).parent / "zoo"


def load_bundle(spec: str, device="cpu", meta: bool = False, seed: int = 0, sampling: bool = False) -> Bundle:
    """A preset name, ``zoo:NAME`` (a model shipped in models/zoo), a model folder, a pipeline folder, or
    ``PRESET:FILE.safetensors``. With ``sampling``, a preset that cannot sample (no text encoder or codec in this
    project) is refused before its weights are allocated."""
    if spec.startswith("zoo:"):
        spec = str(inside(ZOO, spec[4:], "model"))
    if sampling and spec in PRESETS and PRESETS[spec].text == "external":
        raise DreamliteError(f"{spec}: sampling needs a text encoder and a codec beside the U-Net; pass a model "
                             "folder that has them (a bare preset can only be inspected or pruned)")
    if spec in PRESETS:
        return from_preset(spec, "meta" if meta else device, seed)
    if ":" in spec and spec.split(":", 1)[0] in PRESETS:
        return _from_file(*spec.split(":", 1), device=device)
    folder = Path(spec)
    if not folder.exists():
        raise DreamliteError(f"{spec}: neither a preset ({', '.join(PRESETS)}) nor an existing folder")
    if folder.is_file():
        raise DreamliteError(f"{spec}: a weights file needs its architecture: PRESET:{spec}")
    if (folder / "manifest.json").is_file():
        return _from_artifact(folder)
    unet_dir = _unet_folder(folder)
    unet = load_unet(unet_dir, device, meta)
    info = read_json(folder / META) if (folder / META).is_file() else {}
    prediction, in_context = _defaults(type(unet).__name__)
    codec, text = _companions(folder, info, meta)
    if info.get("schedule", "sdxl") not in SCHEDULES:
        raise DreamliteError(f"{folder / META}: schedule: {info['schedule']!r} is not one of {', '.join(SCHEDULES)}")
    factor = codec.factor if codec else 8
    size = int(info.get("image_size", unet.config.sample_size * factor))
    return Bundle(unet, info.get("prediction", prediction), bool(info.get("in_context", in_context)), size, text,
                  codec, name=str(folder), folder=folder, meta=info)


def _companions(folder: Path, info: dict, meta: bool = False):
    """The codec and text encoder beside a U-Net (``meta``: only what costs nothing to build)."""
    codec_info = info.get("codec", {"kind": "vae", "folder": "vae"})
    if codec_info.get("kind") == "pixel-unshuffle":
        codec = PixelUnshuffleCodec(int(codec_info.get("factor", 4)))
    elif (folder / "vae" / "config.json").is_file() and not meta:
        codec = VAECodec(folder / "vae")
    else:
        codec = None
    text = None
    if (folder / "text_encoder" / "config.json").is_file() and not meta:
        text = load_text_encoder(folder / "text_encoder")
    return codec, text


def _from_file(preset: str, path: str, device="cpu") -> Bundle:
    from safetensors.torch import load_file

    file = Path(path)
    if file.suffix != ".safetensors" or not file.is_file():
        raise DreamliteError(f"{path}: expected an existing .safetensors file (dreamlite never unpickles)")
    b = from_preset(preset, "meta")
    try:
        b.unet.load_state_dict(load_file(str(file), device=str(device)), strict=True, assign=True)
    except RuntimeError as e:
        raise DreamliteError(f"{path}: does not match preset {preset!r} ({str(e).splitlines()[1].strip()})") from None
    b.name, b.meta = f"{preset}:{path}", {**b.meta, "weights": str(file)}
    return b


def _from_artifact(folder: Path) -> Bundle:
    """An exported artifact (compress/quantize/artifact.py): the ONNX graph is the denoiser; the U-Net, built on the
    meta device from the recorded config, only describes it."""
    from dreamlite.compress.quantize.artifact import load_artifact

    manifest, session = load_artifact(folder)
    from .sampler import OrtDenoiser

    info = read_json(folder / META) if (folder / META).is_file() else {}
    unet = load_unet(folder, meta=True)
    codec, text = _companions(folder, info)
    return Bundle(unet, manifest["prediction"], manifest["in_context"], manifest["image_size"][0], text, codec,
                  name=str(folder), folder=folder, meta={**info, "artifact": manifest}, denoiser=OrtDenoiser(session))
