"""The local app (``python -m diffusion.inference.app``): its settings checks, its LoRA switch and scale against the
model's own ``generate``, the checkpoint trust checks, and the page driven in headless Chromium."""

from __future__ import annotations

import io
import os
import re
import shutil
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.checkpointing import UntrustedCheckpointError
from diffusion.inference import app
from diffusion.inference.export import LORA_WEIGHTS, export_lora, export_model
from diffusion.inference.loading import load_model
from diffusion.inference.sample import to_uint8
from diffusion.models.lora import LoRA
from tests.conftest import build_adapted, build_tiny_sd

PROMPT = 'a red circle'
# Tiny and quick: 3 steps at 32 x 24 (the tiny model's VAE factor is 2, the SD pipeline wants multiples of 8).
SETTINGS = dict(seed=3, steps=3, width=32, height=24)


def draw(model, prompt=PROMPT, seed=3, steps=3, width=32, height=24, **kwargs) -> np.ndarray:
    """``generate``'s image for the settings, rounded to 8 bits as the app and the sampling CLI round."""
    image = model.generate([prompt], seed=seed, num_inference_steps=steps, width=width, height=height, **kwargs)[0]
    return to_uint8(image)


def with_lora_at(folder: str, scale: float, lora: str):
    """The exported base, loaded anew, with the LoRA file added and scaled by diffusers' own ``set_adapters``."""
    model = load_model(folder)
    pipe = model.pipeline()
    # The file named: offline (HF_HUB_OFFLINE, as the suite runs) diffusers will not guess it in a folder.
    folder, name = (lora, LORA_WEIGHTS) if os.path.isdir(lora) else (os.path.dirname(lora), os.path.basename(lora))
    pipe.load_lora_weights(folder, weight_name=name, adapter_name='reference')
    pipe.set_adapters(['reference'], adapter_weights=[scale])
    return model


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
    """A tiny SD2 model exported as a pipeline (``base``) and a LoRA on its UNet and text encoder exported alone
    (``lora``), with random B matrices so that it changes the images; also the adapted model (``adapted``)."""
    root = tmp_path_factory.mktemp('app')
    torch.manual_seed(0)
    base = build_tiny_sd().eval()
    adapted = build_adapted(build_tiny_sd, text_encoder=True)
    export_model(base, str(root / 'base'), model_card=False)
    export_lora(adapted, str(root / 'lora'), model_card=False)
    return {'base': str(root / 'base'), 'lora': str(root / 'lora'), 'adapted': adapted, 'root': root}


def test_bad_settings_are_refused_in_one_line_naming_the_setting(exports):
    playground = app.load(pipeline=exports['base'])
    assert playground.multiple == 8 and playground.default_size == 16 and not playground.has_lora
    cases = {
        'width 20: must be a positive multiple of 8 for this model, e.g. 16 or 24.': dict(width=20),
        'height 0: must be a positive multiple of 8': dict(height=0),
        "scheduler 'plms': not a sampler of this model; one of ddim, ddpm, euler, euler_ancestral, dpm++.": dict(
            scheduler='plms'
        ),
        'num_images 5: at most 4 per request.': dict(num_images=5),
        'steps 0: must be a whole number of at least 1.': dict(steps=0),
        'seed -1: must be a whole number of at least 0.': dict(seed=-1),
    }
    for message, settings in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            playground.generate(PROMPT, **settings)
    # Every sampler the page offers draws; the defaults are the model's own size and sampler.
    assert playground.generate(PROMPT, steps=2)[0].size == (16, 16)
    assert playground.request(PROMPT).scheduler == 'ddim'
    for scheduler in playground.schedulers:
        assert playground.generate(PROMPT, steps=2, scheduler=scheduler)[0].size == (16, 16)


def test_the_app_draws_what_generate_draws_and_the_lora_switch_and_scale_act_as_diffusers_scales(exports):
    base = load_model(exports['base'])
    playground = app.load(pipeline=exports['base'], lora=exports['lora'])
    assert playground.has_lora and playground.adapter == app.APP_ADAPTER
    assert playground.lora_source.endswith('pytorch_lora_weights.safetensors')

    plain = draw(base)
    off = np.asarray(playground.generate(PROMPT, lora=False, **SETTINGS)[0])
    zero = np.asarray(playground.generate(PROMPT, lora_scale=0.0, **SETTINGS)[0])
    full = np.asarray(playground.generate(PROMPT, **SETTINGS)[0])
    half = np.asarray(playground.generate(PROMPT, lora_scale=0.5, **SETTINGS)[0])
    assert np.array_equal(off, plain) and np.array_equal(zero, plain)  # off, or at scale 0: the base model
    assert np.array_equal(full, draw(exports['adapted']))  # scale 1: the adapter as trained
    assert np.array_equal(half, draw(with_lora_at(exports['base'], 0.5, exports['lora'])))
    assert (full != plain).mean() > 0.5 and (half != full).mean() > 0.5  # the LoRA and its scale change the image

    # Several images: image i is generate's for seed + i; a negative prompt and the settings go through.
    settings = dict(SETTINGS, seed=7, num_images=2, negative_prompt='blue', guidance_scale=4.0, scheduler='euler')
    images = playground.generate(PROMPT, lora=False, **settings)
    for i, image in enumerate(images):
        expected = draw(base, seed=7 + i, negative_prompts=['blue'], guidance_scale=4.0, scheduler='euler')
        assert np.array_equal(np.asarray(image), expected), i


def test_an_sd3_lora_export_loads_whole_and_its_sides_are_multiples_of_the_patch(tmp_path):
    # SD3's LoRA file mixes the projections diffusers renames (to_q) with those it does not (add_q_proj): exported
    # under peft's names, every layer loads, so the app draws the adapted model's images.
    from tests.models.test_mmdit import build_tiny_sd3

    torch.manual_seed(0)
    base = build_tiny_sd3().eval()
    torch.manual_seed(0)
    adapted = build_tiny_sd3()
    adapter = LoRA(rank=2, alpha=4)
    adapter.apply(adapted)
    adapted.adapters.append(adapter)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if 'lora_B' in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    adapted.eval()
    export_model(base, str(tmp_path / 'base'), model_card=False)
    export_lora(adapted, str(tmp_path / 'lora'), kohya_file=None, model_card=False)
    playground = app.load(pipeline=str(tmp_path / 'base'), lora=str(tmp_path / 'lora'))
    assert playground.multiple == 4 and playground.schedulers == ['flow_euler', 'flow_heun']
    settings = dict(seed=1, steps=2, width=32, height=16)
    on = np.asarray(playground.generate(PROMPT, **settings)[0])
    off = np.asarray(playground.generate(PROMPT, lora=False, **settings)[0])
    assert np.array_equal(on, draw(adapted, seed=1, steps=2, width=32, height=16))
    assert np.array_equal(off, draw(base, seed=1, steps=2, width=32, height=16))
    with pytest.raises(ValueError, match='width 18: must be a positive multiple of 4 for this model, e.g. 16 or 20'):
        playground.generate(PROMPT, width=18)


def test_loading_refuses_what_it_cannot_trust_or_read(exports, tmp_path):
    from tests.test_checkpointing import plant_with_manifest

    marker = tmp_path / 'payload-ran'
    evil = plant_with_manifest(tmp_path / 'evil.pt', marker)
    with pytest.raises(UntrustedCheckpointError, match=r'evil\.pt\.sha256 is not signed'):
        app.load(checkpoint=str(evil))
    with pytest.raises(SystemExit, match=r'evil\.pt\.sha256 is not signed'):
        app.main(['--checkpoint', str(evil)])
    assert not marker.exists()

    with pytest.raises(ValueError, match='Give one of --checkpoint'):
        app.load()
    with pytest.raises(FileNotFoundError, match=r'--pipeline .*: no model_index\.json there'):
        app.load(pipeline=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r'--lora .*: the folder has no pytorch_lora_weights\.safetensors'):
        app.load(pipeline=exports['base'], lora=str(tmp_path))
    pickled = tmp_path / 'lora.bin'
    pickled.write_bytes(b'not read')
    with pytest.raises(ValueError, match=r'--lora .*lora\.bin: only \.safetensors LoRA files are read'):
        app.load(pipeline=exports['base'], lora=str(pickled))
    # A LoRA of another base (wider text features) is refused in one line, from the base digest its file records.
    wider = dict(hidden_size=32, projection_dim=32, intermediate_size=64)
    other = build_tiny_sd(unet_config=dict(cross_attention_dim=32), text_encoder_config=wider)
    adapter = LoRA(rank=2)
    adapter.apply(other)
    other.adapters.append(adapter)
    export_lora(other, str(tmp_path / 'other'), model_card=False)
    with pytest.raises(
        ValueError, match=r'other/pytorch_lora_weights\.safetensors: made for the base .*load it on its own'
    ):
        app.load(pipeline=exports['base'], lora=str(tmp_path / 'other'))
    # The kohya / ComfyUI file of the same adapter gives the same images as the diffusers file.
    kohya = app.load(pipeline=exports['base'], lora=f'{exports["lora"]}/lora_kohya.safetensors')
    assert np.array_equal(np.asarray(kohya.generate(PROMPT, **SETTINGS)[0]), draw(exports['adapted']))


def test_a_lora_runs_checkpoint_brings_its_own_adapter(synthetic_dataset, tmp_path):
    from diffusion.builders import build_trainer
    from tests.conftest import tiny_config

    overrides = ('+model.adapters={lora:{rank:2,alpha:4}}', 'optimizer.lr=1e-2', 'train_dataloader.batch_size=8')
    build_trainer(tiny_config(synthetic_dataset, str(tmp_path), *overrides, 'max_duration=2ba')).fit()
    checkpoint = str(tmp_path / 'checkpoints' / 'latest-rank0.pt')
    playground = app.load(checkpoint=checkpoint)  # a signed checkpoint of this session's key
    assert (
        playground.has_lora and playground.adapter == 'default' and playground.lora_source == 'trained with the model'
    )
    trained = draw(load_model(checkpoint), width=16, height=16)
    settings = dict(SETTINGS, width=16, height=16)
    assert np.array_equal(np.asarray(playground.generate(PROMPT, **settings)[0]), trained)
    zero = np.asarray(playground.generate(PROMPT, lora_scale=0.0, **settings)[0])
    assert np.array_equal(zero, np.asarray(playground.generate(PROMPT, lora=False, **settings)[0]))
    assert not np.array_equal(zero, trained)
    with pytest.raises(ValueError, match='already carries a LoRA'):
        app.load(checkpoint=checkpoint, lora=str(tmp_path))


# ---------------------------------------------------------------- end to end in a browser

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
CHROMEDRIVER = shutil.which('chromedriver')


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
                     '--window-size=1200,900'):  # fmt: skip
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def fill(driver, element_id: str, value, selector: str = 'input[type=number]') -> None:
    """Type ``value`` into a control as a user would: select what is there, type, leave the field."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, f'#{element_id} {selector}')
    field.send_keys(Keys.CONTROL, 'a')
    field.send_keys(str(value), Keys.TAB)


def generate_in_page(driver, caption: str) -> np.ndarray:
    """Press Generate, wait for the gallery to show an image captioned ``caption``, and download its pixels."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, 'generate').click()

    def shown(d):
        gallery = d.find_element(By.ID, 'images')
        images = gallery.find_elements(By.TAG_NAME, 'img')
        return images[0].get_attribute('src') if images and caption in gallery.text else None

    source = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,)).until(shown)
    with urllib.request.urlopen(source) as response:  # the served file, as the page shows it
        return np.asarray(Image.open(io.BytesIO(response.read())).convert('RGB'))


@pytest.mark.slow
def test_generate_through_the_page_in_a_browser(exports, tmp_path, monkeypatch, capsys):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip('needs chromium and chromedriver (apt-get install -y chromium chromium-driver)')
    pytest.importorskip('selenium', reason='needs selenium 4 (pip install selenium)')
    pytest.importorskip('gradio', reason="needs the app extra (pip install -e '.[app]')")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # The command line as a user runs it, serving in this process (a second process would import torch, diffusers
    # and Gradio again: a minute on a busy 2-core machine), with Gradio's files under this test's folder.
    monkeypatch.setenv('GRADIO_TEMP_DIR', str(tmp_path / 'gradio'))
    serving, serve = [], app.serve
    monkeypatch.setattr(app, 'serve', lambda *args: serving.append(serve(*args, block=False)))
    driver = None
    try:
        app.main(['--pipeline', exports['base'], '--lora', exports['lora'], '--port', '0'])
        url = re.search(r'Serving on (http://\S+/)', capsys.readouterr().out)[1]
        driver = browser()
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, 'body[data-app-ready=true]'))
        shown = driver.find_element(By.ID, 'model').text
        assert 'exported weights from' in shown and 'LoRA: ' in shown and 'pytorch_lora_weights.safetensors' in shown
        fill(driver, 'prompt', PROMPT, 'textarea')
        for name in ('seed', 'steps', 'height'):
            fill(driver, name, SETTINGS[name])
        fill(driver, 'width', 20)
        driver.find_element(By.ID, 'generate').click()
        error = 'width 20: must be a positive multiple of 8 for this model'
        WebDriverWait(driver, 30).until(lambda d: error in d.find_element(By.TAG_NAME, 'body').text)
        fill(driver, 'width', SETTINGS['width'])
        driver.find_element(By.CSS_SELECTOR, '#lora input[type=checkbox]').click()  # LoRA off
        off = generate_in_page(driver, 'seed 3, 3 steps, ddim, guidance 7.5')
        driver.find_element(By.CSS_SELECTOR, '#lora input[type=checkbox]').click()  # on again, at 0.5
        fill(driver, 'lora-scale', 0.5)
        half = generate_in_page(driver, 'seed 3, 3 steps, ddim, guidance 7.5, LoRA 0.5')
        # A local app: the page fetched nothing (fonts, scripts) from anywhere but the app's own server.
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert fetched and [name for name in fetched if not name.startswith(('data:', url))] == []
    finally:
        if driver is not None:
            driver.quit()
        for running in serving:
            running.close()
    assert off.shape == (24, 32, 3)
    assert np.array_equal(off, draw(load_model(exports['base'])))  # the base model's generate, pixel for pixel
    assert np.array_equal(half, draw(with_lora_at(exports['base'], 0.5, exports['lora'])))
    assert (half != off).mean() > 0.5
