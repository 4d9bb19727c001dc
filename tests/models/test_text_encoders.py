import torch

from diffusion.models.text_encoders import SD2_TEXT_ENCODER_CONFIG, build_clip_tokenizer, build_text_encoder


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
