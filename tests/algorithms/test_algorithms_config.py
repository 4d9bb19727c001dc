"""Our algorithms switched on from yaml take effect on the model that the Trainer trains."""

import torch
import torch._dynamo
from diffusers.models.attention_processor import Attention, AttnProcessor

from diffusion.algorithms import AttentionBackend, CompileDenoiser, GradientCheckpointing
from diffusion.builders import build_trainer
from tests.conftest import tiny_config


def test_yaml_algorithms_are_applied_at_init_and_train_two_batches(synthetic_dataset, tmp_path):
    cfg = tiny_config(
        synthetic_dataset,
        str(tmp_path),
        'max_duration=2ba',
        'save_folder=null',
        '+algorithms.attention_backend.backend=math',
        '+algorithms.gradient_checkpointing={}',
        # Dynamo's graph capture without code generation: the plumbing, in seconds (see test_compile_denoiser.py).
        '+algorithms.compile_unet={backend:eager}',
    )
    trainer = build_trainer(cfg)
    by_type = {type(algorithm): algorithm for algorithm in trainer.state.algorithms}
    assert set(by_type) == {AttentionBackend, GradientCheckpointing, CompileDenoiser}
    assert by_type[AttentionBackend].backend == 'math'
    assert by_type[CompileDenoiser].backend == 'eager'

    model = trainer.state.model
    processors = [type(module.processor) for module in model.modules() if isinstance(module, Attention)]
    assert len(processors) == 14 and set(processors) == {AttnProcessor}
    assert model.unet.is_gradient_checkpointing
    # nn.Module.compile stores the compiled call on the module; parameter names keep no `_orig_mod.` prefix.
    assert model.unet._compiled_call_impl is not None
    assert not any('_orig_mod' in name for name in model.state_dict())

    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 2
    assert torch.isfinite(trainer.state.loss)
    trainer.close()
    torch._dynamo.reset()
