"""The ``lora`` adapter: only low-rank weights train, the base stays bit-identical, resumes are exact, EMA averages
the adapter, and merging gives the same images as the adapted model."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from diffusion.builders import build_model, build_optimizer, build_trainer
from diffusion.callbacks.ema_weights import find_ema
from diffusion.models.adapters import merge_adapters
from diffusion.models.lora import LoRA, base_digest, base_state_dict, is_lora_name
from tests.conftest import EMA_TEST_OVERRIDES, build_tiny_sd, tiny_config

LORA = '+model.adapters={lora:{rank:2,alpha:4}}'


def expected_lora_parameters(module: nn.Module, targets: list[str], rank: int) -> tuple[int, int]:
    """(layers, parameters) of LoRA on every ``nn.Linear`` of an unadapted ``module`` whose name ends in a target:
    ``rank * (in + out)`` each."""
    layers = [
        m for name, m in module.named_modules() if isinstance(m, nn.Linear) and any(
            name == t or name.endswith('.' + t) for t in targets
        )
    ]  # fmt: skip
    return len(layers), sum(rank * (m.in_features + m.out_features) for m in layers)


def adapted_tiny_sd(**lora) -> tuple[nn.Module, LoRA]:
    model = build_tiny_sd()
    adapter = LoRA(**lora)
    adapter.apply(model)
    model.adapters.append(adapter)
    return model, adapter


def test_only_the_lora_weights_train_and_their_count_is_rank_times_in_plus_out():
    plain = build_tiny_sd()
    layers, count = expected_lora_parameters(plain.unet, ['to_q', 'to_k', 'to_v', 'to_out.0'], rank=3)
    te_layers, te_count = expected_lora_parameters(plain.text_encoder, ['q_proj', 'k_proj', 'v_proj', 'out_proj'], 3)
    assert layers > 0 and te_layers > 0

    model, adapter = adapted_tiny_sd(rank=3)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_lora_name(n) and n.startswith('unet.') for n in trainable)
    assert len(trainable) == 2 * layers  # lora_A and lora_B per layer
    assert sum(p.numel() for p in trainable.values()) == count
    optimizer = build_optimizer({'name': 'adamw', 'lr': 1e-3}, model)
    assert {id(p) for g in optimizer.param_groups for p in g['params']} == {id(p) for p in trainable.values()}

    with_te, _ = adapted_tiny_sd(rank=3, text_encoder=True)
    trainable = {n: p for n, p in with_te.named_parameters() if p.requires_grad}
    assert {n.split('.', 1)[0] for n in trainable} == {'unet', 'text_encoder'}
    assert sum(p.numel() for p in trainable.values()) == count + te_count
    assert with_te.conditioner.train_text_encoder  # gradients flow through the encoder to its LoRA layers


def test_lora_starts_as_the_base_model_and_its_base_has_the_unadapted_names_and_digest():
    torch.manual_seed(0)
    plain = build_tiny_sd()
    torch.manual_seed(0)
    model, _ = adapted_tiny_sd(rank=2)
    base = base_state_dict(model)
    assert base.keys() == plain.state_dict().keys()
    assert all(torch.equal(base[k], v) for k, v in plain.state_dict().items())
    assert base_digest(model) == base_digest(plain)
    # B starts at zero: the adapted model samples exactly what the base samples.
    args = dict(num_inference_steps=2, seed=0)
    torch.testing.assert_close(model.generate(['a red circle'], **args), plain.generate(['a red circle'], **args))
    with torch.no_grad():
        next(iter(plain.unet.parameters())).add_(1e-3)
    assert base_digest(model) != base_digest(plain)


def test_unknown_or_bad_lora_options_are_refused():
    with pytest.raises(ValueError, match='rank must be a positive integer'):
        LoRA(rank=0)
    model_cfg = OmegaConf.create({'name': 'tiny_stable_diffusion', 'adapters': {'lora': {'rank': 2, 'ranks': 3}}})
    with pytest.raises(ValueError, match=r'Unknown key model\.adapters\.lora\.ranks'):
        build_model(model_cfg)


def test_merge_fuses_the_adapter_into_plain_layers_with_the_same_output():
    model, adapter = adapted_tiny_sd(rank=2, text_encoder=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'lora_B' in name:
                p.normal_(0, 0.5)  # a trained-looking adapter, not the zero start
    args = dict(num_inference_steps=2, seed=0)
    adapted = model.generate(['a red circle'], **args)
    merge_adapters(model)
    assert model.adapters == [] and not any(is_lora_name(n) for n in model.state_dict())
    assert not any('base_layer' in n for n in model.state_dict())
    assert type(model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q) is nn.Linear
    torch.testing.assert_close(model.generate(['a red circle'], **args), adapted, atol=1e-5, rtol=1e-4)


def lora_run(data: str, folder: str, *overrides: str):
    return build_trainer(tiny_config(data, folder, LORA, 'optimizer.lr=1e-2', 'train_dataloader.batch_size=8',
                                     *overrides))  # fmt: skip


def state_of(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.state.model.state_dict().items()}


def test_composer_training_changes_only_the_lora_weights(synthetic_dataset, tmp_path):
    trainer = lora_run(synthetic_dataset, str(tmp_path), 'max_duration=3ba', 'save_folder=null')
    before = state_of(trainer)
    trainer.fit()
    after = state_of(trainer)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_b = {k for k in before if 'lora_B' in k}
    assert changed and all(is_lora_name(k) for k in changed), sorted(changed)[:5]
    assert lora_b <= changed  # every B moved off zero: the adapter learned
    frozen = [k for k in before if not is_lora_name(k)]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)


@pytest.mark.slow
def test_a_lora_run_resumes_bit_exactly_under_strict_loading(synthetic_dataset, tmp_path):
    common = ('save_interval=2ba',)
    full = lora_run(synthetic_dataset, str(tmp_path / 'full'), 'max_duration=4ba', *common)
    full.fit()
    part = lora_run(synthetic_dataset, str(tmp_path / 'part'), 'max_duration=2ba', *common)
    part.fit()
    checkpoint = tmp_path / 'part' / 'checkpoints' / 'ep0-ba2-rank0.pt'
    resumed = lora_run(synthetic_dataset, str(tmp_path / 'resumed'), 'max_duration=4ba', f'load_path={checkpoint}',
                       'load_trusted=true', *common)  # fmt: skip
    assert int(resumed.state.timestamp.batch) == 2
    resumed.fit()
    full_state, resumed_state = state_of(full), state_of(resumed)
    assert any('lora_B' in k for k in full_state)
    for key, value in full_state.items():
        assert torch.equal(resumed_state[key], value), key


def test_scheduled_ema_averages_the_lora_weights(synthetic_dataset, tmp_path):
    trainer = build_trainer(tiny_config(synthetic_dataset, str(tmp_path), LORA, *EMA_TEST_OVERRIDES,
                                        'max_duration=4ba', 'save_folder=null'))  # fmt: skip
    trainer.fit()
    ema = find_ema(trainer.state)
    assert ema.ema_started
    averaged = ema.ema_model.named_parameters_dict
    # Composer's EMA copies the trainable parameters: the LoRA weights, nothing of the frozen base.
    assert averaged and all(is_lora_name(k) for k in averaged)
    assert len(averaged) == sum(1 for _, p in trainer.state.model.named_parameters() if p.requires_grad)
    trained = dict(trainer.state.model.named_parameters())
    assert any(not torch.equal(averaged[k], trained[k]) for k in averaged if 'lora_B' in k)


def checkpoint_weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location='cpu', weights_only=False)['state']['model']


def test_a_lora_checkpoint_holds_the_adapter_and_the_base_reference_and_refuses_another_base(
    synthetic_dataset, tmp_path
):
    import os

    from diffusion.callbacks.frozen_base import BaseMismatchError, base_record
    from diffusion.inference.loading import load_checkpoint

    lora = lora_run(synthetic_dataset, str(tmp_path / 'lora'), 'max_duration=2ba', 'save_interval=2ba')
    lora.fit()
    path = tmp_path / 'lora' / 'checkpoints' / 'ep0-ba2-rank0.pt'
    state = torch.load(path, map_location='cpu', weights_only=False)['state']
    trainable = {n for n, p in lora.state.model.named_parameters() if p.requires_grad}
    assert set(state['model']) == trainable  # the adapter alone
    record = base_record(state)
    assert record['sha256'] == base_digest(lora.state.model) and record['model'] == 'tiny_stable_diffusion'

    full = build_trainer(tiny_config(synthetic_dataset, str(tmp_path / 'full'), 'max_duration=1ba',
                                     'save_interval=1ba', 'train_dataloader.batch_size=8'))  # fmt: skip
    full.fit()
    full_size = os.path.getsize(tmp_path / 'full' / 'checkpoints' / 'ep0-ba1-rank0.pt')
    lora_size = os.path.getsize(path)
    print(f'checkpoint bytes: lora {lora_size}, full fine-tune {full_size}')
    assert lora_size < full_size / 4

    # Inference loading rebuilds the base from the config and seed, checks its digest and adds the adapter.
    loaded = load_checkpoint(str(path))
    expected = lora.state.model.state_dict()
    got = loaded.model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())

    # Another base (another seed builds other random weights): refused in one line naming both digests.
    with pytest.raises(BaseMismatchError, match=rf'trained on the base .*{record["sha256"]}.*this model.s base is'):
        lora_run(synthetic_dataset, str(tmp_path / 'other'), 'max_duration=3ba', 'seed=18', f'load_path={path}',
                 'load_trusted=true')  # fmt: skip


def test_lora_on_the_mmdit_trains_only_its_adapter_from_the_yaml_switch(synthetic_dataset, tmp_path):
    from diffusion.config import load_config
    from tests.models.test_mmdit import MMDIT_YAML, TEST_SD3_VAE_OVERRIDE

    cfg = load_config(MMDIT_YAML, [TEST_SD3_VAE_OVERRIDE, 'model.max_length=8', LORA, 'optimizer.lr=1e-2',
                                   f'train_dataloader.remote={synthetic_dataset}', 'train_dataloader.resolution=16',
                                   'train_dataloader.batch_size=4', f'run_folder={tmp_path}', 'save_folder=null',
                                   'max_duration=2ba', 'progress_bar=false'])  # fmt: skip
    trainer = build_trainer(cfg)
    model = trainer.state.model
    layers = [name for name, m in model.transformer.named_modules() if hasattr(m, 'lora_A')]
    # The joint attention's image and text projections are adapted (the last block has no text output layer).
    assert {name.split('.attn.', 1)[-1] for name in layers} == {
        'to_q', 'to_k', 'to_v', 'to_out.0', 'add_q_proj', 'add_k_proj', 'add_v_proj', 'to_add_out'
    }  # fmt: skip
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(layers) and all(
        is_lora_name(n) and n.startswith('transformer.') for n in trainable
    )
    before = state_of(trainer)
    trainer.fit()
    after = state_of(trainer)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Every B moves but the last block's text query: that block discards its text stream (context_pre_only), so the
    # query gets no gradient and its B stays at zero.
    last = f'transformer.transformer_blocks.{len(model.transformer.transformer_blocks) - 1}.attn.add_q_proj.'
    assert {k for k in before if 'lora_B' in k and not k.startswith(last)} <= changed
    assert changed and all(is_lora_name(k) for k in changed)
