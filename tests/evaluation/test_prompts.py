"""Prompt sets: plain text, PartiPrompts and DrawBench tables, COCO captions, the built-in demo list."""

import json

import pytest

from diffusion.evaluation.prompt_following import DEMO_PROMPTS_PATH, load_prompts
from diffusion.evaluation.prompts import PromptRecord, load_prompt_records, load_prompt_set

PARTI = (
    'Prompt\tCategory\tChallenge\tNote\n'
    'A raccoon wearing formal clothes\tAnimals\tImagination\t\n'
    'a red cube on top of a blue sphere\tArtifacts\tPositional\tcolour binding\n'
    '\tAnimals\tBasic\tempty prompt, skipped\n'
    'two dogs on a sofa\tanimals\tCounting\t\n'
)
DRAWBENCH = (
    'Prompts,Category\n'
    'A red colored car.,Colors\n'
    '"A storefront with ""Hello World"" written on it.",Text\n'
    'A black apple and a green backpack.,Colors\n'
)


def write(path, text):
    path.write_text(text, encoding='utf-8')
    return str(path)


def test_plain_text_skips_blank_lines_and_comments(tmp_path):
    path = write(tmp_path / 'prompts.txt', '# my prompts\n\n  a red circle  \n# two\na blue square\n\n')
    assert load_prompt_set(path) == ['a red circle', 'a blue square']
    assert load_prompt_set(path, limit=1) == ['a red circle']


def test_demo_is_a_builtin_name_for_the_shipped_list():
    prompts = load_prompt_set('demo')
    assert prompts == load_prompts(DEMO_PROMPTS_PATH)
    assert len(prompts) > 0 and all(isinstance(p, str) and p for p in prompts)


def test_partiprompts_tsv(tmp_path):
    path = write(tmp_path / 'PartiPrompts.tsv', PARTI)
    records = load_prompt_records(path)
    assert records == [
        PromptRecord('A raccoon wearing formal clothes', category='Animals'),
        PromptRecord('a red cube on top of a blue sphere', category='Artifacts'),
        PromptRecord('two dogs on a sofa', category='animals'),
    ]
    # Categories match case-insensitively; limit applies after the filter.
    assert load_prompt_set(path, category='ANIMALS') == ['A raccoon wearing formal clothes', 'two dogs on a sofa']
    assert load_prompt_set(path, category='animals', limit=1) == ['A raccoon wearing formal clothes']
    # Another column as the prompt.
    assert load_prompt_set(path, column='Challenge') == ['Imagination', 'Positional', 'Basic', 'Counting']


@pytest.mark.parametrize('name, delimiter', [('drawbench.csv', ','), ('drawbench.tsv', '\t')])
def test_drawbench_csv_and_tsv(tmp_path, name, delimiter):
    text = DRAWBENCH
    if delimiter == '\t':
        text = 'Prompts\tCategory\nA red colored car.\tColors\nA storefront with "Hello World" written on it.\tText\n'
        text += 'A black apple and a green backpack.\tColors\n'
    # The sheet's csv export starts with a byte-order mark.
    path = write(tmp_path / name, '\ufeff' + text)
    assert load_prompt_set(path) == [
        'A red colored car.',
        'A storefront with "Hello World" written on it.',
        'A black apple and a green backpack.',
    ]
    assert load_prompt_set(path, category='colors') == ['A red colored car.', 'A black apple and a green backpack.']


def test_coco_captions_give_one_prompt_and_the_reference_image_per_image(tmp_path):
    captions = {
        'images': [{'id': 42, 'file_name': 'COCO_val2014_000000000042.jpg'}, {'id': 7, 'file_name': 'img7.jpg'}],
        'annotations': [
            {'image_id': 42, 'id': 9, 'caption': 'A second caption of 42.'},
            {'image_id': 7, 'id': 3, 'caption': ' A cat on a mat. '},
            {'image_id': 42, 'id': 5, 'caption': 'A dog in the park.'},
        ],
    }
    path = write(tmp_path / 'captions_val2014.json', json.dumps(captions))
    # Sorted by image id; the lowest annotation id is the caption.
    assert load_prompt_records(path) == [
        PromptRecord('A cat on a mat.', reference='img7.jpg'),
        PromptRecord('A dog in the park.', reference='COCO_val2014_000000000042.jpg'),
    ]
    assert load_prompt_set(path, limit=1) == ['A cat on a mat.']


def test_errors_name_the_file_and_the_accepted_layouts(tmp_path):
    unknown = write(tmp_path / 'mine.tsv', 'caption\tscore\na cat\t1\n')
    with pytest.raises(ValueError, match=r'mine\.tsv.*caption, score.*PartiPrompts.*DrawBench.*COCO'):
        load_prompt_set(unknown)
    assert load_prompt_set(unknown, column='caption') == ['a cat']
    with pytest.raises(ValueError, match=r"no column 'text'.*caption, score"):
        load_prompt_set(unknown, column='text')
    with pytest.raises(ValueError, match='unknown prompt-file layout'):
        load_prompt_set(write(tmp_path / 'prompts.md', 'a cat\n'))
    with pytest.raises(ValueError, match='COCO captions'):
        load_prompt_set(write(tmp_path / 'other.json', '{"prompts": ["a cat"]}'))
    with pytest.raises(FileNotFoundError, match="'nope'.*Built-in names: demo"):
        load_prompt_set('nope')
    parti = write(tmp_path / 'PartiPrompts.tsv', PARTI)
    with pytest.raises(ValueError, match="no prompts in category 'Food'.*Animals, Artifacts"):
        load_prompt_set(parti, category='Food')
    with pytest.raises(ValueError, match='has no categories'):
        load_prompt_set('demo', category='Animals')
    with pytest.raises(ValueError, match='no prompts found'):
        load_prompt_set(write(tmp_path / 'empty.txt', '# nothing\n\n'))
