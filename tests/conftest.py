import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the independent PIL renderer


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


REPO = Path(__file__).resolve().parents[1]


def killed_then_resumed(monkeypatch, run, killed_at=lambda path: True):
    """Call ``run()`` with training killed (KeyboardInterrupt) right after the first checkpoint whose path
    ``killed_at`` accepts, then call it again, as a re-run would, and return what that returns."""
    import dreamlite.train as train

    real = train.save_checkpoint

    def dying(path, step, *a, **kw):
        real(path, step, *a, **kw)
        if killed_at(path):
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", dying)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(train, "save_checkpoint", real)
    return run()

# Tiny versions of the shapes presets (same layouts, widths 8 to 16): every model test builds from these.
TINY_TEXT = {"width": 16, "layers": 1, "heads": 2, "ff": 32}
TINY = {
    "shapes-server": {"block_out_channels": [8, 16, 16], "attention_head_dim": [1, 2, 2], "norm_num_groups": 4,
                      "transformer_layers_per_block": [1, 1, 2], "cross_attention_dim": 16,
                      "addition_time_embed_dim": 4, "projection_class_embeddings_input_dim": 16 + 6 * 4},
    "shapes-mobile": {"block_out_channels": [8, 8, 16], "attention_head_dim": [1, 1, 2], "norm_num_groups": 4,
                      "cross_attention_dim": 16, "encoder_hid_dim": 16, "addition_time_embed_dim": 4,
                      "projection_class_embeddings_input_dim": 8, "time_embedding_dim": 24},
}


# For the tests of ONNX export and quantization: the tiny mobile model with one ResNet per block (850 ONNX nodes
# instead of 1,321). Every block type stays. ONNX Runtime's quantizer, whose cost grows with the square of the node
# count, takes 40% of the time it takes on the deeper model, the export 75%.
SHALLOW = {"layers_per_block": 1}


def tiny_bundle(preset: str, seed: int = 0, **overrides):
    import torch
    from dreamlite.models.bundle import Bundle
    from dreamlite.models.codec import PixelUnshuffleCodec
    from dreamlite.models.presets import build, get_preset
    from dreamlite.models.text import ShapesTextEncoder

    p = get_preset(preset)
    unet = build(p.config, p.cls, seed=seed, **{**TINY[preset], **overrides}).eval()
    torch.manual_seed(seed)
    text = ShapesTextEncoder.for_shapes(**TINY_TEXT).eval()
    return Bundle(unet, p.prediction, p.cls == "DreamLiteUNetModel", 64, text, PixelUnshuffleCodec(), name=f"tiny-{preset}",
                  meta=p.meta())


@pytest.fixture
def tiny_server():
    return tiny_bundle("shapes-server")


@pytest.fixture
def tiny_mobile():
    return tiny_bundle("shapes-mobile")


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """Both tiny models saved as model folders (fp32), as a user would have them, and the shallow mobile model."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for preset in TINY:
        tiny_bundle(preset).save_pretrained(root / preset)
        out[preset] = root / preset
    tiny_bundle("shapes-mobile", **SHALLOW).save_pretrained(root / "shallow-mobile")
    out["shallow-mobile"] = root / "shallow-mobile"
    return out
