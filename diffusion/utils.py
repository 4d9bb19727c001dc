"""Small helpers shared across the package: named registries, config-key checks against builders, unwrapping DDP."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Collection, Mapping, Optional

import catalogue
from torch.nn.parallel import DistributedDataParallel

__all__ = ['Registry', 'accepted_keys', 'check_kwargs', 'forwards_kwargs', 'unwrap_model']


def forwards_kwargs(*targets: Callable, exclude: Collection[str] = ()) -> Callable:
    """Mark a builder whose ``**kwargs`` go on to ``targets``, so that config keys are checked against them too.

    Args:
        *targets (Callable): Functions or classes that receive the builder's ``**kwargs``.
        exclude (Collection[str]): Parameters of the targets that the builder fills itself.
    """

    def mark(builder: Callable) -> Callable:
        builder.__forwards_kwargs__ = (targets, tuple(exclude))
        return builder

    return mark


def accepted_keys(builder: Callable) -> tuple[list[str], bool]:
    """The keyword names ``builder`` accepts, following :func:`forwards_kwargs`, and whether it accepts any."""
    params = inspect.signature(builder).parameters
    names = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != 'self']
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    forwarded = getattr(builder, '__forwards_kwargs__', None)
    if accepts_any and forwarded is not None:
        targets, exclude = forwarded
        accepts_any = False
        for target in targets:
            target_names, target_any = accepted_keys(target)
            names += [n for n in target_names if n not in names and n not in exclude]
            accepts_any = accepts_any or target_any
    return names, accepts_any


def check_kwargs(builder: Callable, kwargs: Mapping[str, Any], *, where: str, provided: Collection[str] = ()) -> None:
    """Raise a ``ValueError`` naming the first key of ``kwargs`` that ``builder`` does not accept.

    Args:
        builder (Callable): Function or class whose signature decides the valid keys.
        kwargs (Mapping[str, Any]): Keyword arguments from a config.
        where (str): Config path of ``kwargs``, used in the message (e.g. ``'algorithms.ema'``).
        provided (Collection[str]): Keys that the code supplies itself; a config may not set them.
    """
    names, accepts_any = accepted_keys(builder)
    valid = [n for n in names if n not in provided]
    for key in kwargs:
        if key in provided:
            raise ValueError(f'{where}.{key} is set by the trainer and cannot be given in the config.')
        if key not in valid and not accepts_any:
            raise ValueError(f'Unknown key {where}.{key}. Valid keys: {", ".join(valid) or "(none)"}.')


def unwrap_model(model: Any) -> Any:
    """The ComposerModel inside a ``DistributedDataParallel`` wrapper (Composer wraps ``state.model`` under DDP)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class Registry:
    """A named registry of builders with a one-line description, backed by ``catalogue``.

    Args:
        name (str): Name of the registry, also used in error messages (e.g. ``'algorithms'``).
        description (str): One line saying what the registered builders return.
    """

    def __init__(self, name: str, description: str):
        self.name = name
        self.description = description
        self._registry = catalogue.create('diffusion', name, entry_points=True)

    def register(self, name: str, func: Optional[Callable] = None) -> Callable:
        """Register ``func`` under ``name``; usable as a decorator when ``func`` is omitted."""
        return self._registry.register(name, func=func)

    def register_all(self, builders: Mapping[str, Callable]) -> None:
        """Register each ``name: builder`` of ``builders``."""
        for name, builder in builders.items():
            self.register(name, func=builder)

    def get(self, name: str) -> Callable:
        """Return the builder registered as ``name``, or raise a ``ValueError`` listing the valid names."""
        if name not in self._registry:
            raise ValueError(f'Unknown {self.name} name {name!r}. Valid names: {", ".join(self.names())}.')
        return self._registry.get(name)

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._registry.get_all())

    def __contains__(self, name: str) -> bool:
        return name in self._registry

    def build(self, name: str, kwargs: Optional[Mapping[str, Any]] = None, *, where: str = '', **extra: Any) -> Any:
        """Build ``name`` with ``kwargs`` from a config plus ``extra`` arguments supplied by the code.

        Args:
            name (str): Registered name.
            kwargs (Mapping[str, Any], optional): Keyword arguments from the config.
            where (str): Config path of ``kwargs`` for error messages, e.g. ``'algorithms.ema'``.
            **extra: Arguments the caller provides (e.g. the tokenizer for a dataloader); not user keys.
        """
        kwargs = dict(kwargs or {})
        self.check(name, kwargs, where=where, provided=extra.keys())
        return self.get(name)(**kwargs, **extra)

    def check(self, name: str, kwargs: Optional[Mapping[str, Any]] = None, *, where: str = '', provided=()) -> None:
        """Raise a ``ValueError`` if ``name`` is unknown or ``kwargs`` has a key its builder does not take."""
        check_kwargs(self.get(name), kwargs or {}, where=where or f'{self.name}.{name}', provided=provided)
