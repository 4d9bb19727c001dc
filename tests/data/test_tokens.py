"""The dataloader's shortcuts give what transformers and torchvision give: token ids and pixels, value for value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from diffusion.data.image_caption import SignedPixels, SquareCrop, image_transform
from diffusion.data.tokens import CaptionTokenizer, _ClipIds, padded_token_ids
from diffusion.models.t5 import build_t5_tokenizer
from diffusion.models.text_encoders import EOS_TOKEN, build_clip_tokenizer

CAPTIONS = [
    'a large red circle on a plain gray background',
    '',
    '   ',
    'A Photo of THE Eiffel-Tower, at night!!! 12345 ... (2019)',
    'café crème brûlée, naïve façade — 東京タワー 🚀 emoji',
    'a <|endoftext|> inside <|startoftext|> the caption',
    ' '.join(['a very long caption about an orange triangle'] * 30),  # far past 77 tokens: truncated
    'tab\tand\nnewline separated words',
]


def reference(tokenizer, captions):
    return tokenizer(
        list(captions), padding='max_length', max_length=tokenizer.model_max_length, truncation=True,
        return_tensors='pt',
    ).input_ids  # fmt: skip


# SD2 and SDXL's second tokenizer pad with '!', SDXL's first with the end token.
@pytest.mark.parametrize('pad_token', ['!', EOS_TOKEN])
def test_padded_token_ids_equal_the_tokenizers_own_call(pad_token):
    tokenizer = build_clip_tokenizer(pad_token=pad_token)
    ids = padded_token_ids(tokenizer, CAPTIONS)
    assert ids.dtype == torch.long and ids.shape == (len(CAPTIONS), tokenizer.model_max_length)
    assert torch.equal(ids, reference(tokenizer, CAPTIONS))
    # One at a time, as the dataset calls it, too; and the long caption really was cut (ends with the end token).
    for i, caption in enumerate(CAPTIONS):
        assert torch.equal(padded_token_ids(tokenizer, [caption])[0], ids[i])
    assert ids[6, -1] == tokenizer.eos_token_id and (ids[6, :-1] != tokenizer.pad_token_id).all()


def test_the_special_tokens_are_worked_out_once_and_only_when_they_wrap_the_caption():
    tokenizer = build_clip_tokenizer()
    assert CaptionTokenizer(tokenizer).around == ([tokenizer.bos_token_id], [tokenizer.eos_token_id])

    class Reversing(type(tokenizer)):
        """Puts a sequence's ids in reverse order between its special tokens: not a plain wrapping."""

        def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
            return super().build_inputs_with_special_tokens(token_ids_0[::-1], token_ids_1)

    reversing = build_clip_tokenizer()
    reversing.__class__ = Reversing
    assert CaptionTokenizer(reversing).around is None  # so it calls the tokenizer's own method per caption
    assert torch.equal(padded_token_ids(reversing, CAPTIONS), reference(reversing, CAPTIONS))
    assert not torch.equal(padded_token_ids(reversing, CAPTIONS), padded_token_ids(tokenizer, CAPTIONS))

    class Checking(type(tokenizer)):
        """Refuses ids outside its vocabulary, such as the probe's."""

        def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
            if any(token_id < 0 for token_id in token_ids_0):
                raise ValueError('negative id')
            return super().build_inputs_with_special_tokens(token_ids_0, token_ids_1)

    checking = build_clip_tokenizer()
    checking.__class__ = Checking
    assert CaptionTokenizer(checking).around is None
    assert torch.equal(padded_token_ids(checking, CAPTIONS), reference(checking, CAPTIONS))


def test_a_tokenizer_it_cannot_reproduce_goes_through_its_own_call():
    clip = build_clip_tokenizer()
    clip.padding_side = 'left'
    assert torch.equal(padded_token_ids(clip, CAPTIONS), reference(clip, CAPTIONS))
    assert (padded_token_ids(clip, ['a red circle'])[0, 0] == clip.pad_token_id).item()  # padded on the left
    t5 = build_t5_tokenizer(max_length=16)  # a fast (Rust) tokenizer
    assert torch.equal(padded_token_ids(t5, CAPTIONS), reference(t5, CAPTIONS))


# Pieces of captions that exercise each step _ClipIds takes or skips: ftfy's fixes (HTML escapes, mojibake, curly
# quotes, ligatures, full-width letters, line and paragraph separators, terminal escapes, control characters), the
# byte-to-unicode mapping (non-ASCII words), the added-token split ('!' is SD2's pad token) and BPE.
PIECES = [
    'a', 'red', 'circle', 'on', 'the', 'GRAY', 'Background', 'photo', '12', '2019', '3.5', "it's", "we'll", '-',
    '(', ')', ',', '.', '...', '"', "'", '&', '&amp;', '&lt;b&gt;', 'caf&eacute;', '&#x2019;', '<', '>', '<b>',
    'é', 'Ã©', '\u2019', '\u201cquoted\u201d', 'ﬁsh', 'ＬＯＵＤ', '東京', '🚀', '\u2028', '\u00a0', '\x1b[31m', '\x00',
    '\x07', '\x7f', '\x85', '\t', '\n', '\r\n', '  ', '!', '!!', '<|endoftext|>', '<|startoftext|>', '<|', 'zxqv',
]  # fmt: skip


@pytest.mark.parametrize('pad_token', ['!', EOS_TOKEN])
def test_clips_own_steps_give_the_tokenizers_ids_for_any_caption(pad_token):
    tokenizer = build_clip_tokenizer(pad_token=pad_token)
    clip_ids = _ClipIds.make(tokenizer)
    assert clip_ids is not None and CaptionTokenizer(tokenizer).clip_ids is not None
    rng = np.random.default_rng(0)
    captions = CAPTIONS + [
        ' '.join(rng.choice(PIECES, size=rng.integers(1, 12))) if k % 2 else ''.join(rng.choice(PIECES, size=6))
        for k in range(1500)
    ]
    for caption in captions:
        assert clip_ids(caption) == tokenizer.convert_tokens_to_ids(tokenizer.tokenize(caption)), repr(caption)
    assert torch.equal(padded_token_ids(tokenizer, captions), reference(tokenizer, captions))


def test_ftfy_leaves_printable_ascii_without_an_ampersand_as_it_is():
    """What _ClipIds relies on to skip ftfy: checked on random strings over the whole printable ASCII range."""
    import ftfy

    rng = np.random.default_rng(0)
    alphabet = [chr(code) for code in range(0x20, 0x7F) if chr(code) != '&']
    for _ in range(3000):
        text = ''.join(rng.choice(alphabet, size=rng.integers(0, 60)))
        assert ftfy.fix_text(text) == text, repr(text)
    assert ftfy.fix_text('caf&eacute;') != 'caf&eacute;'  # why '&' is excluded


def test_clips_own_steps_are_not_taken_for_a_tokenizer_that_changes_one_of_them():
    tokenizer = build_clip_tokenizer()

    class Recolouring(type(tokenizer)):
        def _tokenize(self, text):
            return super()._tokenize(text.replace('red', 'blue'))

    recolouring = build_clip_tokenizer()
    recolouring.__class__ = Recolouring
    assert _ClipIds.make(recolouring) is None and CaptionTokenizer(recolouring).clip_ids is None
    red = ['a red circle']
    assert torch.equal(padded_token_ids(recolouring, red), reference(recolouring, red))
    assert not torch.equal(padded_token_ids(recolouring, red), padded_token_ids(tokenizer, red))
    without_ftfy = build_clip_tokenizer()
    without_ftfy.fix_text = None  # as when ftfy is not installed: transformers' BasicTokenizer instead
    from transformers.models.clip.tokenization_clip import BasicTokenizer

    without_ftfy.nlp = BasicTokenizer(strip_accents=False, do_split_on_punc=False)
    assert _ClipIds.make(without_ftfy) is None
    assert torch.equal(padded_token_ids(without_ftfy, CAPTIONS), reference(without_ftfy, CAPTIONS))


def test_signed_pixels_equal_torchvisions_to_tensor_then_normalize():
    rng = np.random.default_rng(0)
    reference_transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    for shape, mode in (((37, 23, 3), 'RGB'), ((16, 16), 'L'), ((8, 40, 3), 'RGB')):
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        ours, theirs = SignedPixels()(image), reference_transform(image)
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape
        assert torch.equal(ours, theirs)  # bit for bit, not approximately
    # All 256 levels, including the ends: exactly -1 and 1.
    levels = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (3, 1)).T.reshape(16, 16, 3), 'RGB')
    assert torch.equal(SignedPixels()(levels), reference_transform(levels))
    assert SignedPixels()(levels).min() == -1.0 and SignedPixels()(levels).max() == 1.0
    assert isinstance(image_transform(32).transforms[-1], SignedPixels)


@pytest.mark.parametrize('crop', ['random', 'center'])
def test_an_image_already_at_the_training_size_is_what_resize_and_crop_give_it(crop):
    rng = np.random.default_rng(1)
    torchvision_steps = transforms.Compose([
        transforms.Resize(24, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.RandomCrop(24) if crop == 'random' else transforms.CenterCrop(24),
    ])  # fmt: skip
    for shape in ((24, 24, 3), (24, 24), (24, 40, 3), (57, 24, 3)):  # at size, then the two that are resized
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        torch.manual_seed(3)
        theirs = np.asarray(torchvision_steps(image))
        after_theirs = torch.rand(1)  # the next number drawn: the same only if both drew the same numbers
        torch.manual_seed(3)
        ours = np.asarray(SquareCrop(24, crop)(image))
        assert np.array_equal(ours, theirs) and torch.rand(1) == after_theirs
    assert isinstance(image_transform(32, crop).transforms[0], SquareCrop)
