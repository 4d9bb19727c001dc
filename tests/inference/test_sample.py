"""Sampling prompt sets to a folder: file names, ledger, contact sheet, seeds, batching, resuming, the CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.inference import sample as sample_module
from diffusion.inference.export import export_model
from diffusion.inference.sample import main, sample_to_folder
from tests.conftest import build_tiny_sd

PROMPTS = ['a red circle on a gray background', 'a blue square', 'a green triangle at the top']
FAST = dict(num_inference_steps=2, guidance_scale=3.0, progress=False)


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return build_tiny_sd().eval()


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert('RGB'), dtype=np.int16)


def as_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.int16)


def test_writes_one_png_per_prompt_and_seed_with_the_ledger_and_contact_sheet(model, tmp_path):
    rows = sample_to_folder(model, PROMPTS[:2], str(tmp_path), seeds=(3, 5), negative_prompt='blurry', **FAST)

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ['00000_3.png', '00000_5.png', '00001_3.png', '00001_5.png', 'contact_sheet.png', 'samples.jsonl']
    ledger = [json.loads(line) for line in (tmp_path / 'samples.jsonl').read_text().splitlines()]
    assert ledger == rows
    assert ledger[3] == {
        'file': '00001_5.png',
        'prompt_index': 1,
        'prompt': 'a blue square',
        'seed': 5,
        'negative_prompt': 'blurry',
        'guidance_scale': 3.0,
        'num_inference_steps': 2,
        'scheduler': 'ddim',  # the model's default, recorded by name
        'height': 16,
        'width': 16,
    }
    # The file holds what generate draws for that prompt and seed alone.
    expected = model.generate(['a blue square'], negative_prompts='blurry', seed=[5], num_inference_steps=2,
                              guidance_scale=3.0)[0]  # fmt: skip
    assert np.array_equal(pixels(tmp_path / '00001_5.png'), as_uint8(expected))
    # Contact sheet: 2 columns of cells enlarged to 128 px, 2 captioned rows.
    with Image.open(tmp_path / 'contact_sheet.png') as sheet:
        assert sheet.width == 4 + 2 * (128 + 4)
        assert sheet.height > 2 * 128


def test_images_depend_on_prompt_and_seed_only_not_on_the_batch(model, tmp_path):
    one = sample_to_folder(model, PROMPTS, str(tmp_path / 'b1'), seeds=(0, 1), batch_size=1, **FAST)
    four = sample_to_folder(model, PROMPTS, str(tmp_path / 'b4'), seeds=(0, 1), batch_size=4, **FAST)
    sample_to_folder(model, PROMPTS[:1], str(tmp_path / 'again'), seeds=(0,), batch_size=4, **FAST)
    assert [r['file'] for r in one] == [r['file'] for r in four]
    for row in one:
        a, b = pixels(tmp_path / 'b1' / row['file']), pixels(tmp_path / 'b4' / row['file'])
        # Batched and single convolutions may round differently in the last float bit: at most one 8-bit level.
        assert np.abs(a - b).max() <= 1, row['file']
    assert np.array_equal(pixels(tmp_path / 'again' / '00000_0.png'), pixels(tmp_path / 'b4' / '00000_0.png'))
    # ... while another seed gives another image.
    assert np.abs(pixels(tmp_path / 'b4' / '00000_0.png') - pixels(tmp_path / 'b4' / '00000_1.png')).mean() > 5


def test_a_rerun_draws_only_missing_or_changed_images(model, tmp_path, monkeypatch):
    sample_to_folder(model, PROMPTS, str(tmp_path), seeds=(0,), batch_size=2, contact_sheet=False, **FAST)
    (tmp_path / '00001_0.png').unlink()
    drawn = []
    generate = model.generate

    def counting(prompts, **kwargs):
        drawn.extend(zip(prompts, kwargs['seed']))
        return generate(prompts, **kwargs)

    monkeypatch.setattr(model, 'generate', counting)
    sample_to_folder(model, PROMPTS, str(tmp_path), seeds=(0,), batch_size=2, contact_sheet=False, **FAST)
    assert drawn == [(PROMPTS[1], 0)]
    # Other settings make other images: all are redrawn and the ledger records the new settings.
    drawn.clear()
    rows = sample_to_folder(model, PROMPTS, str(tmp_path), seeds=(0,), scheduler='euler', contact_sheet=False,
                            num_inference_steps=2, guidance_scale=3.0, progress=False)  # fmt: skip
    assert len(drawn) == 3
    ledger = [json.loads(line) for line in (tmp_path / 'samples.jsonl').read_text().splitlines()]
    assert [r['scheduler'] for r in ledger] == ['euler'] * 3 and ledger == rows


def test_bad_settings_fail_before_anything_is_drawn(model, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown scheduler 'plms'. Valid names: ddim, ddpm, euler, .*dpm\+\+"):
        sample_to_folder(model, PROMPTS, str(tmp_path / 'a'), scheduler='plms', **FAST)
    with pytest.raises(ValueError, match=r'Seeds repeat: \[1, 1\]'):
        sample_to_folder(model, PROMPTS, str(tmp_path / 'b'), seeds=(1, 1), **FAST)
    with pytest.raises(ValueError, match='No prompts to sample'):
        sample_to_folder(model, [], str(tmp_path / 'c'), **FAST)
    assert not any(tmp_path.iterdir())


def test_cli_samples_from_an_exported_folder(model, tmp_path, capsys):
    export_model(model, str(tmp_path / 'export'), model_card=False)
    prompts = tmp_path / 'prompts.txt'
    prompts.write_text('# demo prompts\na red circle\n\na blue square\n')
    args = ['--checkpoint', str(tmp_path / 'export'), '--prompts', str(prompts), '--out', str(tmp_path / 'out'),
            '--num-images-per-prompt', '2', '--seed', '7', '--steps', '2', '--guidance-scale', '3', '--batch-size', '3',
            '--scheduler', 'dpm++']  # fmt: skip
    rows = main(args)
    assert [r['file'] for r in rows] == ['00000_7.png', '00000_8.png', '00001_7.png', '00001_8.png']
    assert 'StableDiffusion: exported weights from' in capsys.readouterr().out
    expected = model.generate(['a blue square'], seed=[8], num_inference_steps=2, guidance_scale=3.0,
                              scheduler='dpm++')[0]  # fmt: skip
    assert np.array_equal(pixels(tmp_path / 'out' / '00001_8.png'), as_uint8(expected))
    assert (tmp_path / 'out' / 'contact_sheet.png').is_file()


def test_cli_errors_name_the_problem(tmp_path, capsys):
    prompts = tmp_path / 'prompts.txt'
    prompts.write_text('a red circle\n')
    with pytest.raises(SystemExit):
        main(['--checkpoint', 'x', '--prompts', str(prompts), '--out', str(tmp_path), '--scheduler', 'plms'])
    assert "argument --scheduler: invalid choice: 'plms'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=r'Checkpoint not found: .*missing\.pt'):
        main(['--checkpoint', str(tmp_path / 'missing.pt'), '--prompts', str(prompts), '--out', str(tmp_path / 'o')])
    with pytest.raises(SystemExit, match='either --seeds or --num-images-per-prompt'):
        main(['--checkpoint', 'x', '--prompts', str(prompts), '--out', str(tmp_path), '--seeds', '1', '--seed', '2'])


def test_contact_sheet_caps_rows_and_cell_size(tmp_path):
    rows = []
    for index in range(3):
        Image.new('RGB', (512, 512), (index * 80, 0, 0)).save(tmp_path / f'{index:05d}_0.png')
        rows.append({'file': f'{index:05d}_0.png', 'prompt_index': index, 'prompt': 'word ' * 60, 'seed': 0})
    path = sample_module.write_contact_sheet(str(tmp_path), rows, str(tmp_path / 'sheet.png'), max_rows=2)
    with Image.open(path) as sheet:
        assert sheet.width == 4 + 256 + 4  # 512 px images shrink to 256 px cells
        # Two rows of 256 px cells with at most 3 caption lines each (long prompts are elided), not three rows.
        assert 2 * 256 < sheet.height < 3 * 256


def test_seed_per_prompt_offsets_each_prompt_like_the_metrics_callback(model, tmp_path):
    rows = sample_to_folder(model, PROMPTS, str(tmp_path), seeds=(5,), seed_per_prompt=True, **FAST)
    assert [(r['file'], r['seed']) for r in rows] == [('00000_5.png', 5), ('00001_6.png', 6), ('00002_7.png', 7)]
    expected = model.generate([PROMPTS[1]], seed=[6], num_inference_steps=2, guidance_scale=3.0)[0]
    assert np.abs(pixels(tmp_path / '00001_6.png') - as_uint8(expected)).max() <= 1


def test_cli_passes_sdxl_micro_conditioning_and_refuses_it_for_sd2(model, tmp_path):
    from tests.conftest import build_tiny_sdxl

    torch.manual_seed(0)
    sdxl = build_tiny_sdxl().eval()
    export_model(sdxl, str(tmp_path / 'xl'), model_card=False)
    prompts = tmp_path / 'prompts.txt'
    prompts.write_text('a red circle\n')
    common = ['--prompts', str(prompts), '--seeds', '4', '--steps', '2', '--guidance-scale', '3',
              '--scheduler', 'euler']  # fmt: skip
    rows = main(['--checkpoint', str(tmp_path / 'xl'), '--out', str(tmp_path / 'out'), *common,
                 '--original-size', '64', '32', '--crops-coords-top-left', '8', '0'])  # fmt: skip
    assert rows[0]['conditioning'] == {'original_size': [64, 32], 'crops_coords_top_left': [8, 0]}
    kwargs = dict(seed=[4], num_inference_steps=2, guidance_scale=3.0, scheduler='euler')
    conditioned = sdxl.generate(['a red circle'], original_size=(64, 32), crops_coords_top_left=(8, 0), **kwargs)[0]
    plain = as_uint8(sdxl.generate(['a red circle'], **kwargs)[0])
    assert np.array_equal(pixels(tmp_path / 'out' / '00000_4.png'), as_uint8(conditioned))
    assert not np.array_equal(as_uint8(conditioned), plain)
    # Other conditioning is another image: a rerun redraws it rather than keeping the old file.
    rows = main(['--checkpoint', str(tmp_path / 'xl'), '--out', str(tmp_path / 'out'), *common])
    assert 'conditioning' not in rows[0]
    assert np.array_equal(pixels(tmp_path / 'out' / '00000_4.png'), plain)

    export_model(model, str(tmp_path / 'sd2'), model_card=False)
    expected = '--target-size apply to SDXL models only; StableDiffusion with CLIPTextConditioner has no'
    with pytest.raises(SystemExit, match=expected):
        main(
            ['--checkpoint', str(tmp_path / 'sd2'), '--out', str(tmp_path / 'o2'), *common, '--target-size', '16', '16']
        )


def test_an_output_folder_that_cannot_be_written_is_named_before_the_model_loads(tmp_path, monkeypatch):
    # Loading an SD2 checkpoint takes minutes: a wrong --out must fail first. A file in the path blocks it even for
    # root, whom permission bits do not stop.
    def load_checkpoint(*args, **kwargs):
        raise AssertionError('the model was loaded before the output folder was checked')

    monkeypatch.setattr(sample_module, 'load_checkpoint', load_checkpoint)
    prompts = tmp_path / 'prompts.txt'
    prompts.write_text('a red circle\n')
    (tmp_path / 'file').write_text('')
    out = tmp_path / 'file' / 'samples'
    with pytest.raises(SystemExit, match=rf'^error: --out {out}: cannot write there \(Not a directory\)\.$'):
        main(['--checkpoint', 'x', '--prompts', str(prompts), '--out', str(out)])
