import numpy as np
import pytest
import torch

from dreamlite.data import edit_stream, t2i_stream, to_tensor
from dreamlite.io import DreamliteError
from dreamlite.models.codec import PixelUnshuffleCodec, VAECodec, to_uint8
from dreamlite.evaluation.shapes.spec import COLORS
from dreamlite.evaluation.shapes.text import SIDES
from dreamlite.models.text import BindingHead, ShapesTextEncoder, UnknownWordError, load_text_encoder

from conftest import TINY_TEXT


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return ShapesTextEncoder.for_shapes(**TINY_TEXT).eval()


def test_vocabulary_covers_every_caption_and_instruction(encoder):
    t2i, edits = t2i_stream(3), edit_stream(3)
    prompts = [next(t2i)[1] for _ in range(300)] + [next(edits)[1] for _ in range(300)]
    states = encoder.encode(prompts)
    assert states.states.shape == (600, encoder.config.max_tokens, 16) and states.pooled.shape == (600, 16)


def test_unknown_word_is_a_clear_error(encoder):
    with pytest.raises(UnknownWordError, match="'dog' is not in the text encoder's vocabulary"):
        encoder.encode(["a red dog"])


@torch.no_grad()
def test_states_do_not_depend_on_the_batch(encoder):
    alone = encoder.encode(["a red circle"])
    together = encoder.encode(["a red circle", "three stars to the left of a large outlined blue square"])
    assert torch.allclose(alone.states[0], together.states[0], atol=1e-5)
    assert torch.equal(alone.states[0, 4:], torch.zeros_like(alone.states[0, 4:]))  # padding carries nothing


@torch.no_grad()
def test_save_and_load_round_trip(tmp_path, encoder):
    encoder.save_pretrained(tmp_path / "te")
    loaded = load_text_encoder(tmp_path / "te")
    a, b = encoder.encode(["two squares", ""]), loaded.encode(["two squares", ""])
    assert torch.equal(a.states, b.states) and torch.equal(a.pooled, b.pooled)
    (tmp_path / "te" / "config.json").write_text('{"_class_name": "ShapesTextEncoder", "width": 16}')
    with pytest.raises(DreamliteError, match="config.json"):
        load_text_encoder(tmp_path / "te")


def test_pixel_unshuffle_is_lossless_and_shaped_like_the_design():
    image, _, _ = next(t2i_stream(0))
    x = to_tensor(image)[None]
    codec = PixelUnshuffleCodec()
    z = codec.encode(x)
    assert z.shape == (1, 48, 16, 16)
    assert np.array_equal(to_uint8(codec.decode(z))[0], image)
    with pytest.raises(DreamliteError, match="multiple of 4"):
        codec.encode(torch.zeros(1, 3, 30, 30))


@pytest.mark.parametrize("kind", ["AutoencoderKL", "AutoencoderTiny"])
def test_vae_adapter_loads_a_local_diffusers_vae(tmp_path, kind):
    import diffusers
    torch.manual_seed(0)
    if kind == "AutoencoderKL":
        vae = diffusers.AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                      layers_per_block=1, scaling_factor=0.5)
        factor = 2
    else:
        vae = diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8),
                                        decoder_block_out_channels=(8, 8, 8, 8), num_encoder_blocks=(1, 1, 1, 1),
                                        num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)
        factor = 8
    vae.save_pretrained(tmp_path / "vae")
    codec = VAECodec(tmp_path / "vae")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    z = codec.encode(x)
    assert codec.factor == factor and z.shape == (1, 4, 32 // factor, 32 // factor)
    assert codec.decode(z).shape == x.shape


def test_binding_targets_name_each_shape_words_colour_count_and_side():
    where, labels = BindingHead.targets(["a red circle left of a blue square", "", "three stars"])
    assert where.tolist() == [[0, 3], [0, 8], [2, 2]]  # token 0 is <bos>
    red, blue = list(COLORS).index("red"), list(COLORS).index("blue")
    none = len(COLORS)
    assert labels.tolist() == [[red, 0, SIDES.index("left")], [blue, 0, SIDES.index("right")], [none, 2, len(SIDES)]]


def test_binding_objective_trains_the_shape_words_states(encoder):
    """The objective is learnable by the encoder: a few steps cut it five-fold (colours swap between captions, so
    only a state that reads its neighbours can fit them); a caption with no shape word adds nothing."""
    torch.manual_seed(0)
    enc = ShapesTextEncoder(encoder.config).train()
    head = BindingHead(enc.width)
    captions = ["a red circle and a blue star", "a blue circle and a red star", "a green square above a white cross",
                "two diamonds", ""]
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=3e-3)
    first = None
    for _ in range(60):
        loss = head(enc.encode(captions).states, captions)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    assert head(enc.encode([""]).states, [""]).item() == 0.0
