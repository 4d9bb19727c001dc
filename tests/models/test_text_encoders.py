import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffusion.inference.export import export_model
from diffusion.models.text_encoders import SD2_TEXT_ENCODER_CONFIG, build_clip_tokenizer, build_text_encoder
from tests.conftest import build_tiny_sd


def test_offline_tokenizer_matches_clip_ids():
    tokenizer = build_clip_tokenizer()
    # Token ids of OpenAI's CLIP vocabulary (also SD2's): <start>=49406, a=320, photo=1125, of=539, cat=2368.
    ids = tokenizer('a photo of a cat', padding='max_length', max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[7:] == [0] * 70  # SD2 pads with '!' (id 0)
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    # Lower-casing and punctuation handling as CLIP does it.
    assert tokenizer('A Photo, of a CAT').input_ids == [49406, 320, 1125, 267, 539, 320, 2368, 49407]


def test_end_token_padding_option():
    tokenizer = build_clip_tokenizer(pad_token='<|endoftext|>')
    assert tokenizer('cat', padding='max_length', max_length=5).input_ids == [49406, 2368, 49407, 49407, 49407]


def test_sd2_text_encoder_parameter_count_on_meta_device():
    with torch.device('meta'):
        model = build_text_encoder(SD2_TEXT_ENCODER_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == 340_387_840
    assert model.config.num_hidden_layers == 23 and model.config.hidden_size == 1024


def test_tokenizer_max_length_shortens_the_conditioning_and_survives_export(tmp_path):
    torch.manual_seed(0)
    model = build_tiny_sd(tokenizer_max_length=12, train_text_encoder=True)
    batch = {'image': torch.rand(2, 3, 16, 16) * 2 - 1, 'captions': ['a red circle', 'a very long caption ' * 8]}
    assert model.conditioner.tokenize(batch['captions'])['input_ids'].shape == (2, 12)  # padded and truncated
    assert model.conditioner.conditioning_shapes()['text_embeds'][0] == 12
    text_embeds = model.conditioner.conditioning(batch, drop_captions=False, image_size=(16, 16))['text_embeds']
    assert text_embeds.shape[:2] == (2, 12)
    model.loss(model(batch), batch).backward()  # trains with it
    export_model(model, str(tmp_path / 'pipe'), model_card=False)
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / 'pipe'))
    assert pipe.tokenizer.model_max_length == 12  # the pipeline pads to what the model was trained on
    assert pipe.encode_prompt('a red circle', 'cpu', 1, False)[0].shape[1] == 12
    with pytest.raises(ValueError, match=r"tokenizer_max_length must be between 3 and the text encoder's 77 .*got 100"):
        build_tiny_sd(tokenizer_max_length=100)
    with pytest.raises(ValueError, match=r"tokenizer_max_length='short': expected an integer"):
        build_tiny_sd(tokenizer_max_length='short')
