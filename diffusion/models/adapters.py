"""Adapters: changes applied to a built model before the optimizer sees its parameters.

An :class:`Adapter` (LoRA is the one the field uses most) is named in the model section of a config,
``model.adapters: {<name>: {<kwargs>}}``, built from :data:`diffusion.models.registries.adapters` and applied by
:func:`apply_adapters` right after the model is built, so that:

- the optimizer (built next) sees exactly the parameters the adapters leave trainable;
- checkpoint loading rebuilds the same model from the config the checkpoint carries and loads the adapted state
  dict strictly (adapter weights are ordinary parameters of the model);
- EMA averages, and FSDP shards, the adapted modules like any other;
- export asks each adapter to :meth:`~Adapter.merge` itself into the base weights (a plain diffusers pipeline has
  no adapter), and refuses, naming the adapter, when it cannot.

The model keeps the applied adapters in ``model.adapters`` (a list, in config order). Built on torchtitan's idea of
a model "converter" applied between building and parallelising; the adapter decides what it touches.
"""

from __future__ import annotations

from typing import Any

__all__ = ['Adapter', 'apply_adapters', 'merge_adapters']


class Adapter:
    """Interface of an adapter; subclasses implement :meth:`apply` and, to be exportable, :meth:`merge`."""

    #: The registry name, set on the instance by :func:`apply_adapters` for messages and the model card.
    name: str = ''

    def apply(self, model: Any) -> None:
        """Change ``model`` in place: add modules or parameters, freeze what should not train."""
        raise NotImplementedError

    def merge(self, model: Any) -> None:
        """Fold the adapter into the base weights of ``model`` in place and remove it."""
        raise ValueError(
            f'Adapter {self.name or type(self).__name__!r} cannot be merged into the base weights, so the model '
            'cannot be exported as a plain diffusers pipeline.'
        )

    def describe(self) -> dict[str, Any]:
        """What a model card states about the adapter."""
        return {'adapter': self.name or type(self).__name__}


def apply_adapters(model: Any, adapters: list[Adapter]) -> Any:
    """Apply ``adapters`` to ``model`` in order and record them in ``model.adapters``; returns the model."""
    for adapter in adapters:
        adapter.apply(model)
        model.adapters.append(adapter)
    return model


def merge_adapters(model: Any) -> Any:
    """Merge every adapter of ``model`` into its base weights, last applied first; returns the model."""
    while model.adapters:
        model.adapters[-1].merge(model)
        model.adapters.pop()
    return model
