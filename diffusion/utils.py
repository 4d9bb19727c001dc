"""Small helpers shared across the package: named registries, config-key and value checks against builders,
writable output folders, unwrapping DDP, Composer's environment probe started early."""

from __future__ import annotations

import collections.abc
import enum
import inspect
import os
import pathlib
import tempfile
import threading
import types
import typing
from typing import Any, Callable, Collection, Literal, Mapping, Optional, Union

import catalogue
from composer.core import Time
from composer.utils import collect_env
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    'ConfigError',
    'Registry',
    'TIME_STRINGS',
    'accepted_keys',
    'check_kwargs',
    'check_value',
    'check_writable_folder',
    'describe_type',
    'forwards_kwargs',
    'is_time_string',
    'parameter_types',
    'start_composer_env_probe',
    'unwrap_model',
    'wait_for_composer_env_probe',
]


class ConfigError(ValueError):
    """A config (or command-line) value that cannot work; the message is one line naming the key and what it takes.

    The commands print it as that one line instead of a traceback.
    """


# What a Composer duration or interval accepts, for messages.
TIME_STRINGS = (
    'a Composer time string such as 10ba (batches), 1ep (epochs), 1000sp (samples) or 0.5dur (a fraction of '
    'max_duration)'
)


def is_time_string(value: Any) -> bool:
    """Whether ``value`` is a string that Composer reads as a time (``'10ba'``, ``'1ep'``, ``'0.5dur'``)."""
    if not isinstance(value, str):
        return False
    try:
        Time.from_timestring(value)
    except ValueError:
        return False
    return True


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


def parameter_types(builder: Callable) -> dict[str, Any]:
    """The annotation of each keyword ``builder`` accepts, following :func:`forwards_kwargs`.

    Annotations that cannot be resolved (a name imported only for type checkers) are left out, and so unchecked.
    """
    params = inspect.signature(builder).parameters
    target = builder.__init__ if inspect.isclass(builder) else builder
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - any failure to resolve leaves the values unchecked, never fails the build
        hints = {n: p.annotation for n, p in params.items() if not isinstance(p.annotation, str)}
    found = {}
    for name, param in params.items():
        if name in hints and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            found[name] = hints[name]
            # Composer types many durations as plain strings (EMA's half_life='1000ba', ema_start='0.0dur'): a string
            # parameter with a time default, or named an interval, takes a time string.
            if hints[name] in (str, Optional[str]) and (is_time_string(param.default) or name.endswith('interval')):
                found[name] = Union[str, Time, None] if hints[name] == Optional[str] else Union[str, Time]
    forwarded = getattr(builder, '__forwards_kwargs__', None)
    if forwarded is not None and any(p.kind is p.VAR_KEYWORD for p in params.values()):
        targets, exclude = forwarded
        for forwarded_to in targets:
            for name, annotation in parameter_types(forwarded_to).items():
                if name not in exclude:
                    found.setdefault(name, annotation)
    return found


_SEQUENCES = (
    list,
    tuple,
    set,
    frozenset,
    collections.abc.Sequence,
    collections.abc.MutableSequence,
    collections.abc.Collection,
    collections.abc.Iterable,
    collections.abc.Set,
)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def _is_union(origin: Any) -> bool:
    return origin is Union or origin is types.UnionType


def _matches(value: Any, annotation: Any, alone: bool = True) -> bool:
    """Whether a config value fits ``annotation``; ``alone`` is false inside a union with other members."""
    if annotation is Any or annotation is inspect.Parameter.empty or isinstance(annotation, typing.TypeVar):
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if _is_union(origin):
        if Time in args and isinstance(value, str):
            return is_time_string(value)
        return any(_matches(value, arg, alone=False) for arg in args)
    if origin is Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is Time:
        return isinstance(value, Time) or is_time_string(value)
    base = origin or annotation
    if base in _SEQUENCES:
        if isinstance(value, (str, bytes)) or not isinstance(value, (collections.abc.Sequence, collections.abc.Set)):
            return False
        if base is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if base in _MAPPINGS:
        return isinstance(value, collections.abc.Mapping) and (
            len(args) != 2 or all(_matches(v, args[1]) for v in value.values())
        )
    if isinstance(base, type):
        if isinstance(value, base):
            return True
        if issubclass(base, enum.Enum):
            return any(value in (member.value, member.name) for member in base)
        if issubclass(base, pathlib.PurePath):
            return isinstance(value, str)
        # A class a config cannot spell (a tokenizer, a tensor): alone, the builder may convert the value; beside
        # config types in a union (float or Tensor), the value must be one of those.
        return alone
    return True  # Callable, Protocols and other forms: not checked


def _spellable(annotation: Any) -> bool:
    """Whether a yaml value can be of this type: not a class such as a Tensor or a tokenizer."""
    base = typing.get_origin(annotation) or annotation
    if not isinstance(base, type) or base in (bool, int, float, str, Time, *_SEQUENCES, *_MAPPINGS):
        return True
    return issubclass(base, (enum.Enum, pathlib.PurePath))


def describe_type(annotation: Any) -> str:
    """What ``annotation`` accepts, in config words: ``'an integer'``, ``'true or false'``, ``'a list of ...'``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if _is_union(origin):
        if Time in args:
            return TIME_STRINGS
        # Classes a config cannot spell (the Tensor of `float or Tensor`) are left out when a config type is there.
        spellable = [arg for arg in args if arg is not type(None) and _spellable(arg)]
        parts = []
        for arg in spellable or [arg for arg in args if arg is not type(None)]:
            if describe_type(arg) not in parts:
                parts.append(describe_type(arg))
        described = ' or '.join(parts)
        return f'{described} or null' if type(None) in args else described
    if origin is Literal:
        return 'one of ' + ', '.join(repr(a) for a in args)
    names = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string', type(None): 'null'}
    if annotation in names:
        return names[annotation]
    if annotation is Time:
        return TIME_STRINGS
    base = origin or annotation
    if base in _SEQUENCES:
        element = args[0] if args and (base is not tuple or args[-1] is Ellipsis or len(set(args)) == 1) else None
        if base is tuple and args and args[-1] is not Ellipsis:
            return f'a list of {len(args)} values ({", ".join(describe_type(a) for a in args)})'
        return 'a list' + (f' ({describe_type(element)} each)' if element not in (None, Any) else '')
    if base in _MAPPINGS:
        return 'a mapping of keys to values'
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return 'one of ' + ', '.join(repr(member.value) for member in base)
    return f'a {getattr(base, "__name__", str(base))}'


def check_value(value: Any, annotation: Any, *, where: str) -> None:
    """Raise a :class:`ConfigError` when ``value`` does not fit ``annotation``, naming ``where`` and what it takes."""
    if not _matches(value, annotation):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + '...'
        raise ConfigError(f'Invalid {where}={shown}: expected {describe_type(annotation)}.')


def check_kwargs(builder: Callable, kwargs: Mapping[str, Any], *, where: str, provided: Collection[str] = ()) -> None:
    """Raise a :class:`ConfigError` naming the first key of ``kwargs`` that ``builder`` does not accept, or whose
    value does not fit the annotation of its parameter (``batch_size: int`` given ``'sixteen'``).

    Args:
        builder (Callable): Function or class whose signature decides the valid keys and their types.
        kwargs (Mapping[str, Any]): Keyword arguments from a config.
        where (str): Config path of ``kwargs``, used in the message (e.g. ``'algorithms.ema'``).
        provided (Collection[str]): Keys that the code supplies itself; a config may not set them.
    """
    names, accepts_any = accepted_keys(builder)
    valid = [n for n in names if n not in provided]
    annotations = parameter_types(builder)
    for key, value in kwargs.items():
        if key in provided:
            raise ConfigError(f'{where}.{key} is set by the trainer and cannot be given in the config.')
        if key not in valid and not accepts_any:
            raise ConfigError(f'Unknown key {where}.{key}. Valid keys: {", ".join(valid) or "(none)"}.')
        if key in annotations:
            check_value(value, annotations[key], where=f'{where}.{key}')


def check_writable_folder(folder: str, *, what: str) -> None:
    """Raise a :class:`ConfigError` naming ``folder`` unless a file can be written in it (it is created if missing).

    Commands call it before loading a model, which takes minutes for SD2, so that a typo or a read-only disk fails
    at once. ``what`` names the option in the message (``'--out'``).
    """
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix='.write-check-'):
            pass
    except OSError as error:
        raise ConfigError(f'{what} {folder}: cannot write there ({error.strerror or error}).') from None


def unwrap_model(model: Any) -> Any:
    """The ComposerModel inside a ``DistributedDataParallel`` wrapper (Composer wraps ``state.model`` under DDP)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


_ENV_PROBE: Optional[threading.Thread] = None


def _probe_cpu_model() -> None:
    try:
        collect_env.get_cpu_model()
    except Exception:  # the Trainer asks again and fails, or not, as it would have without the probe
        pass


def start_composer_env_probe() -> None:
    """Start Composer's CPU-name probe in a background thread, so that building the ``Trainer`` does not wait for it.

    ``Trainer.__init__`` calls ``composer.utils.collect_env.get_composer_env_dict()``, whose ``get_cpu_model()``
    runs py-cpuinfo, which starts a second Python interpreter to read the CPU's name: about 1.2 s of CPU on a 2-core
    VM, most of a tiny run's ``Trainer`` build, for a value the Trainer does not log (it logs the Composer version
    and commit). ``get_cpu_model`` keeps its answer (``functools.lru_cache``), so calling it here, in a thread while
    the entry point imports the rest of the package and builds the model, fills that cache with the same answer.
    ``train.py`` starts it; :func:`wait_for_composer_env_probe` joins it before the ``Trainer`` is built, so the
    probe never runs twice. Does nothing when the answer is already cached, a probe was started, or Composer's
    ``get_cpu_model`` keeps no cache.
    """
    global _ENV_PROBE
    cached = getattr(collect_env.get_cpu_model, 'cache_info', None)  # without Composer's cache it would run twice
    if _ENV_PROBE is None and cached is not None and cached().currsize == 0:
        _ENV_PROBE = threading.Thread(target=_probe_cpu_model, name='composer-env-probe', daemon=True)
        _ENV_PROBE.start()


def wait_for_composer_env_probe() -> None:
    """Wait for the probe of :func:`start_composer_env_probe`, if one was started (at once if it finished)."""
    if _ENV_PROBE is not None:
        _ENV_PROBE.join()


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
        """Return the builder registered as ``name``, or raise a :class:`ConfigError` listing the valid names."""
        if name not in self._registry:
            raise ConfigError(f'Unknown {self.name} name {name!r}. Valid names: {", ".join(self.names())}.')
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
        """Raise a :class:`ConfigError` if ``name`` is unknown, or ``kwargs`` has a key its builder does not take or a
        value that does not fit the key's annotation."""
        check_kwargs(self.get(name), kwargs or {}, where=where or f'{self.name}.{name}', provided=provided)
