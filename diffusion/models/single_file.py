"""One safetensors file in the original (LDM) key layout, the checkpoint format ComfyUI, A1111 and Forge load.

The layout is the one of the Stability AI reference code (``ldm.modules.diffusionmodules.openaimodel.UNetModel``,
``ldm.models.autoencoder.AutoencoderKL``, OpenCLIP's text transformer): UNet under ``model.diffusion_model.``, VAE
under ``first_stage_model.``, the SD2 text encoder under ``cond_stage_model.model.`` (OpenCLIP names, with the
query, key and value projections fused into one ``in_proj_weight``), and for SDXL the CLIP-L encoder under
``conditioner.embedders.0.transformer.`` (transformers names) and the OpenCLIP bigG one under
``conditioner.embedders.1.model.``. The mapping is derived here from the module structures of diffusers'
``UNet2DConditionModel`` and ``AutoencoderKL`` and transformers' ``CLIPTextModel``: each diffusers submodule is
placed where the reference code keeps the same layer (a down block's ``j``-th resnet is input block
``1 + j + (blocks before it)``, its downsampler the next one, ...), and every tensor must be placed exactly once.
Written with ``safetensors.torch.save_file``; nothing is pickled. ``tests/inference/test_single_file.py`` loads the
file back with diffusers' ``from_single_file``, an independent implementation of the reverse mapping.

diffusers' loader tells SDXL's two text encoders apart by their width (768 and 1280 in SDXL), so a model whose two
encoders have the same width loads with the wrong one in ``text_encoder_2``; the file itself is still correct.

v-prediction and zero-terminal-SNR models carry ComfyUI's marker keys ``v_pred`` and ``ztsnr`` (empty tensors),
which its SDXL loaders read; its SD2 loader guesses the prediction type from the weights instead.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
from safetensors.torch import save_file
from torch import nn

__all__ = [
    'clip_to_ldm',
    'open_clip_to_ldm',
    'pipeline_to_ldm',
    'save_single_file',
    'unet_to_ldm',
    'vae_to_ldm',
]

# A diffusers ResnetBlock2D inside the UNet is the reference ResBlock, whose layers sit in nn.Sequentials:
# in_layers = [GroupNorm, SiLU, Conv], emb_layers = [SiLU, Linear], out_layers = [GroupNorm, SiLU, Dropout, Conv].
_UNET_RESNET = {
    'norm1': 'in_layers.0',
    'conv1': 'in_layers.2',
    'time_emb_proj': 'emb_layers.1',
    'norm2': 'out_layers.0',
    'conv2': 'out_layers.3',
    'conv_shortcut': 'skip_connection',
}
# The VAE's resnets keep diffusers' names except for the 1x1 shortcut.
_VAE_RESNET = {'conv_shortcut': 'nin_shortcut'}
# The VAE's mid-block attention is the reference AttnBlock: 1x1 convolutions q, k, v, proj_out and a GroupNorm.
_VAE_ATTENTION = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out.0': 'proj_out'}
# An OpenCLIP ResidualAttentionBlock against transformers' CLIPEncoderLayer (attention handled apart).
_OPEN_CLIP_LAYER = {
    'layer_norm1': 'ln_1',
    'layer_norm2': 'ln_2',
    'self_attn.out_proj': 'attn.out_proj',
    'mlp.fc1': 'mlp.c_fc',
    'mlp.fc2': 'mlp.c_proj',
}


def _renamer(table: dict[str, str]) -> Callable[[str], str]:
    """Replace the leading module path of a parameter name per ``table`` (longest match first)."""
    ordered = sorted(table, key=len, reverse=True)

    def rename(name: str) -> str:
        for old in ordered:
            if name.startswith(old + '.'):
                return table[old] + name[len(old) :]
        return name

    return rename


class _Placer:
    """Collects the tensors of submodules under their reference names and checks each tensor is placed once."""

    def __init__(self, root: nn.Module, what: str):
        self.what = what
        self.expected = {id(t): name for name, t in root.state_dict(keep_vars=True).items()}
        self.out: dict[str, torch.Tensor] = {}
        self.placed: set[int] = set()

    def put(
        self,
        module: nn.Module,
        prefix: str,
        rename: Optional[Callable[[str], str]] = None,
        transform: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        for name, tensor in module.state_dict(keep_vars=True).items():
            new_name = rename(name) if rename else name
            value = tensor.detach()
            self.out[prefix + new_name] = transform(new_name, value) if transform else value
            self.placed.add(id(tensor))

    def result(self) -> dict[str, torch.Tensor]:
        missing = [name for key, name in self.expected.items() if key not in self.placed]
        if missing:
            raise ValueError(
                f'{self.what}: {len(missing)} tensors have no place in the single-file layout (e.g. {missing[:5]}); '
                'this architecture variant cannot be exported as one file.'
            )
        return self.out


def unet_to_ldm(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a diffusers ``UNet2DConditionModel`` under the reference ``UNetModel`` names (no prefix).

    Supports the SD1/SD2/SDXL family: cross-attention (or plain) down and up blocks with any number of resnets and
    transformer layers, a cross-attention mid block, and SDXL's ``text_time`` additional embedding.
    """
    placer = _Placer(unet, 'UNet')
    resnet = _renamer(_UNET_RESNET)
    placer.put(unet.conv_in, 'input_blocks.0.0.')
    placer.put(unet.time_embedding.linear_1, 'time_embed.0.')  # time_embed = [Linear, SiLU, Linear]
    placer.put(unet.time_embedding.linear_2, 'time_embed.2.')
    if getattr(unet, 'add_embedding', None) is not None:  # SDXL: label_emb = [[Linear, SiLU, Linear]]
        placer.put(unet.add_embedding.linear_1, 'label_emb.0.0.')
        placer.put(unet.add_embedding.linear_2, 'label_emb.0.2.')

    # Input blocks: one per down-block resnet (with its transformer at index 1), then one for the downsampler.
    index = 1
    for block in unet.down_blocks:
        attentions = getattr(block, 'attentions', None)
        for j, res in enumerate(block.resnets):
            placer.put(res, f'input_blocks.{index}.0.', resnet)
            if attentions is not None:
                placer.put(attentions[j], f'input_blocks.{index}.1.')
            index += 1
        if block.downsamplers is not None:
            placer.put(block.downsamplers[0].conv, f'input_blocks.{index}.0.op.')
            index += 1

    # Middle block: resnet, transformer, resnet.
    mid = unet.mid_block
    placer.put(mid.resnets[0], 'middle_block.0.', resnet)
    for j, attention in enumerate(getattr(mid, 'attentions', [])):
        placer.put(attention, f'middle_block.{2 * j + 1}.')
        placer.put(mid.resnets[j + 1], f'middle_block.{2 * j + 2}.', resnet)

    # Output blocks: one per up-block resnet; the upsampler joins the last one, after its transformer if any.
    index = 0
    for block in unet.up_blocks:
        attentions = getattr(block, 'attentions', None)
        for j, res in enumerate(block.resnets):
            placer.put(res, f'output_blocks.{index}.0.', resnet)
            if attentions is not None:
                placer.put(attentions[j], f'output_blocks.{index}.1.')
            index += 1
        if block.upsamplers is not None:
            placer.put(
                block.upsamplers[0].conv, f'output_blocks.{index - 1}.{2 if attentions is not None else 1}.conv.'
            )

    placer.put(unet.conv_norm_out, 'out.0.')  # out = [GroupNorm, SiLU, Conv]
    placer.put(unet.conv_out, 'out.2.')
    return placer.result()


def _conv_attention_weight(name: str, tensor: torch.Tensor) -> torch.Tensor:
    # The reference AttnBlock uses 1x1 convolutions where diffusers uses linear layers: same numbers, 4-D shape.
    return tensor[:, :, None, None] if name.endswith('weight') and tensor.ndim == 2 else tensor


def vae_to_ldm(vae: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a diffusers ``AutoencoderKL`` under the reference ``AutoencoderKL`` names (no prefix)."""
    placer = _Placer(vae, 'VAE')
    resnet = _renamer(_VAE_RESNET)
    attention = _renamer(_VAE_ATTENTION)

    def put_mid(mid: nn.Module, prefix: str) -> None:
        placer.put(mid.resnets[0], f'{prefix}.mid.block_1.', resnet)
        placer.put(mid.resnets[1], f'{prefix}.mid.block_2.', resnet)
        for attn in mid.attentions:
            if attn is not None:  # None when the mid block has no attention (mid_block_add_attention=False)
                placer.put(attn, f'{prefix}.mid.attn_1.', attention, _conv_attention_weight)

    encoder, decoder = vae.encoder, vae.decoder
    placer.put(encoder.conv_in, 'encoder.conv_in.')
    for i, block in enumerate(encoder.down_blocks):
        for j, res in enumerate(block.resnets):
            placer.put(res, f'encoder.down.{i}.block.{j}.', resnet)
        if block.downsamplers is not None:
            placer.put(block.downsamplers[0].conv, f'encoder.down.{i}.downsample.conv.')
    put_mid(encoder.mid_block, 'encoder')
    placer.put(encoder.conv_norm_out, 'encoder.norm_out.')
    placer.put(encoder.conv_out, 'encoder.conv_out.')

    # The reference decoder numbers its levels from the highest resolution: diffusers' up block i is level n-1-i.
    placer.put(decoder.conv_in, 'decoder.conv_in.')
    put_mid(decoder.mid_block, 'decoder')
    levels = len(decoder.up_blocks)
    for i, block in enumerate(decoder.up_blocks):
        for j, res in enumerate(block.resnets):
            placer.put(res, f'decoder.up.{levels - 1 - i}.block.{j}.', resnet)
        if block.upsamplers is not None:
            placer.put(block.upsamplers[0].conv, f'decoder.up.{levels - 1 - i}.upsample.conv.')
    placer.put(decoder.conv_norm_out, 'decoder.norm_out.')
    placer.put(decoder.conv_out, 'decoder.conv_out.')
    if getattr(vae, 'quant_conv', None) is not None:
        placer.put(vae.quant_conv, 'quant_conv.')
    if getattr(vae, 'post_quant_conv', None) is not None:
        placer.put(vae.post_quant_conv, 'post_quant_conv.')
    return placer.result()


def open_clip_to_ldm(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` (or ``...WithProjection``) under OpenCLIP's text-tower names (no prefix).

    OpenCLIP's ``nn.MultiheadAttention`` keeps the query, key and value projections as one ``in_proj_weight``
    (3D, D) and ``in_proj_bias`` (3D,), in that order; its ``text_projection`` is a (D, P) matrix applied as
    ``x @ P``, the transpose of transformers' ``nn.Linear`` weight.
    """
    placer = _Placer(text_encoder, 'text encoder')
    text = text_encoder.text_model
    placer.put(text.embeddings.token_embedding, '', lambda n: 'token_embedding.weight')
    placer.put(text.embeddings.position_embedding, '', lambda n: 'positional_embedding')
    layer_rename = _renamer(_OPEN_CLIP_LAYER)
    for i, layer in enumerate(text.encoder.layers):
        prefix = f'transformer.resblocks.{i}.'
        attn = layer.self_attn
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        for kind in ('weight', 'bias'):
            placer.out[f'{prefix}attn.in_proj_{kind}'] = torch.cat([getattr(p, kind).detach() for p in projections])
        for p in projections:
            placer.placed.update(id(t) for t in p.state_dict(keep_vars=True).values())
        for name, child in layer.named_children():
            if name != 'self_attn':
                placer.put(child, prefix, lambda n, name=name: layer_rename(f'{name}.{n}'))
        placer.put(attn.out_proj, prefix + 'attn.out_proj.')
    placer.put(text.final_layer_norm, 'ln_final.')
    projection = getattr(text_encoder, 'text_projection', None)
    if projection is not None:
        placer.put(projection, '', lambda n: 'text_projection', lambda n, t: t.T)
    for buffer in text_encoder.buffers():
        placer.placed.add(id(buffer))  # position_ids: an arange, rebuilt by every loader
    return placer.result()


def clip_to_ldm(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` as the reference code keeps it: transformers' own names."""
    return {name: tensor.detach() for name, tensor in text_encoder.state_dict().items() if 'position_ids' not in name}


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + name: tensor for name, tensor in tensors.items()}


def pipeline_to_ldm(pipeline: Any) -> dict[str, torch.Tensor]:
    """All weights of a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` in the single-file layout.

    Raises:
        ValueError: The pipeline is neither, or one of its networks has a layer the original layout lacks.
    """
    components = pipeline.components
    for name in ('unet', 'vae', 'text_encoder'):
        if components.get(name) is None:
            raise ValueError(f'{type(pipeline).__name__} has no {name}; the single-file layout needs one.')
    state = _prefixed('model.diffusion_model.', unet_to_ldm(components['unet']))
    state.update(_prefixed('first_stage_model.', vae_to_ldm(components['vae'])))
    if components.get('text_encoder_2') is not None:  # SDXL: CLIP-L then OpenCLIP bigG
        state.update(_prefixed('conditioner.embedders.0.transformer.', clip_to_ldm(components['text_encoder'])))
        state.update(_prefixed('conditioner.embedders.1.model.', open_clip_to_ldm(components['text_encoder_2'])))
    else:  # SD2: the OpenCLIP ViT-H text tower
        state.update(_prefixed('cond_stage_model.model.', open_clip_to_ldm(components['text_encoder'])))
    scheduler = components.get('scheduler')
    if scheduler is not None and scheduler.config.get('prediction_type') == 'v_prediction':
        state['v_pred'] = torch.tensor([])
        if scheduler.config.get('rescale_betas_zero_snr'):
            state['ztsnr'] = torch.tensor([])
    return state


def save_single_file(
    pipeline: Any, path: str, dtype: Optional[torch.dtype] = None, metadata: Optional[dict[str, str]] = None
) -> str:
    """Write the pipeline's weights as one safetensors file in the original layout; returns ``path``.

    Args:
        pipeline: A ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (e.g. ``model.pipeline()``).
        path (str): Output file, conventionally ``<name>.safetensors``.
        dtype (torch.dtype, optional): Cast floating-point tensors to this type (``torch.float16`` halves the file).
        metadata (dict[str, str], optional): Extra string metadata stored in the safetensors header.
    """
    if not path.endswith('.safetensors'):
        raise ValueError(f'The single-file checkpoint must be a .safetensors file, got {path!r}.')
    state = pipeline_to_ldm(pipeline)
    # Contiguous copies: safetensors refuses views and tensors that share memory (a transposed projection is both).
    state = {
        name: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous().clone()
        for name, t in state.items()
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f'{path}.tmp'
    save_file(state, tmp, metadata={'format': 'pt', **(metadata or {})})
    os.replace(tmp, path)  # never leave half a checkpoint under the final name
    return path
