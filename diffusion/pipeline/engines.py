"""Schedulers of the pipeline's work: the launcher's ranks, or Ray Data on a Ray cluster (or a local one).

A stage describes its work once, as a :class:`UnitWork` (an optional CPU ``decode`` of a unit and a ``build``
that returns the per-unit function, building any model once per process), and as plain tasks for its global
passes (the filter stage's partitions). The ranks engine runs unit ``u`` on rank ``u % N``; the Ray engine
builds on Ray Data: ``ray.data.from_items`` of the unit indexes, then for a stage with a model (caption,
precompute) ``Dataset.map_batches`` as CPU tasks for the decode (so a model never waits for JPEG decoding) feeding
``map_batches`` with an ``ActorPoolStrategy`` of ``workers`` actors (``num_gpus`` each, ``max_restarts`` /
``max_task_retries`` so a killed actor is restarted and its unit redone), and for a CPU-only stage (ingest,
filter) ``map_batches`` tasks (``max_retries``: a task whose worker died runs again). Either way the per-unit
function writes the unit's shards exactly as the ranks engine does; a redone unit starts from an empty folder.

``DIFFUSION_PIPELINE_FAULT_ONCE=<file>`` is fault injection for tests: the first unit processed after the file is
found missing creates it and ends its worker process with ``os._exit`` after one sample, leaving a half-written unit.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

__all__ = [
    'ENGINES',
    'FAULT_ENV',
    'UnitWork',
    'actor_gpus',
    'ensure_ray',
    'inject_fault',
    'ray_map_tasks',
    'ray_run_units',
]

ENGINES = ('ranks', 'ray')
FAULT_ENV = 'DIFFUSION_PIPELINE_FAULT_ONCE'
# Attempts of a task (or of a unit on a restarted actor) before the stage fails.
MAX_RETRIES = 3
# CPUs asked by a decode task and by a model actor without GPUs: half a core each, so that actors on every core
# of a CPU-only cluster still leave room for the decode tasks that feed them (whole cores would deadlock).
CPU_SHARE = 0.5
# Variables of the driver that its Ray workers need too: object-store endpoints and credentials, hub settings,
# the import path.
FORWARDED_ENV = ('AWS_', 'S3_', 'GCS_', 'GOOGLE_', 'OCI_', 'AZURE_', 'HF_', 'DIFFUSION_', 'PYTHONPATH')


@dataclass
class UnitWork:
    """One stage's per-unit work, shared by every engine.

    Args:
        build (callable): Returns ``process(unit, decoded)``, which yields the unit's samples (or ``Drop``) in order;
            called once per process (an actor builds its model here).
        decode (callable, optional): ``decode(unit)``, the CPU part (reading, decoding images); its result, which
            must pickle, is passed to ``process``. ``None`` when the stage has no separate decode.
        num_gpus (float, optional): GPUs per Ray actor; ``None`` for a model stage that takes one GPU per actor when
            the Ray cluster has GPUs and none on a CPU-only cluster. Default: ``0``.
    """

    build: Callable[[], Callable[[int, Any], Iterable[Any]]]
    decode: Optional[Callable[[int], Any]] = None
    num_gpus: Optional[float] = 0


def actor_gpus(num_gpus: Optional[float], cluster_resources: dict[str, float]) -> float:
    """GPUs per actor: ``num_gpus``, or for ``None`` one when the cluster has a GPU. The cluster decides, not the
    driver's machine: a driver on a CPU head node must still give the actors of a GPU cluster their GPUs."""
    if num_gpus is not None:
        return num_gpus
    return 1 if cluster_resources.get('GPU', 0) >= 1 else 0


def ensure_ray(address: Optional[str] = None) -> Any:
    """Connect to the Ray cluster at ``address`` (``'auto'``: the running one), or start a local one; returns ray."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True
    return ray


def _runtime_env() -> dict[str, Any]:
    # Not the fault marker: it travels with the work, and Ray keeps worker processes per runtime environment, so a
    # variable that comes and goes would make Ray start (and import the stack in) new workers for that stage.
    forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV) and k != FAULT_ENV}
    return {'env_vars': forwarded}


def inject_fault(marker: Optional[str], samples: Iterable[Any]) -> Iterable[Any]:
    """Pass ``samples`` through; when ``marker`` names a missing file, create it and die after the first sample."""
    if not marker or os.path.exists(marker):
        yield from samples
        return
    for sample in samples:
        yield sample
        with open(marker, 'w') as f:
            f.write(str(os.getpid()))
        os._exit(17)


def _unit_task(batch: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """A Ray Data task of a CPU-only stage: one unit per batch, its function built in the task."""
    import cloudpickle

    runner, work, fault = cloudpickle.loads(payload)
    process = work.build()
    units = [int(u) for u in batch['unit']]
    for unit in units:
        runner._run_unit(unit, lambda u: inject_fault(fault, process(u, None)))
    return {'unit': units}


class _UnitActor:
    """A Ray Data actor: builds the stage's per-unit function once, then processes one unit per batch."""

    def __init__(self, payload: bytes):
        import cloudpickle

        self.runner, self.work, self.fault = cloudpickle.loads(payload)
        self.process = self.work.build()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        units = [int(u) for u in batch['unit']]
        decoded = [pickle.loads(p) for p in batch['decoded']] if 'decoded' in batch else [None] * len(units)
        for unit, data in zip(units, decoded):
            self.runner._run_unit(unit, lambda u, data=data: inject_fault(self.fault, self.process(u, data)))
        return {'unit': units}


def _decode_batch(batch: dict[str, Any], decode: Callable[[int], Any]) -> dict[str, Any]:
    units = [int(u) for u in batch['unit']]
    return {'unit': units, 'decoded': [pickle.dumps(list(decode(u)), protocol=5) for u in units]}


def ray_run_units(
    runner: Any, units: Sequence[int], work: UnitWork, *, workers: Optional[int], address: Optional[str]
) -> None:
    """Process ``units`` with Ray Data: CPU decode tasks feeding an actor pool that writes each unit."""
    import cloudpickle

    ray = ensure_ray(address)
    from ray.data import ActorPoolStrategy

    if not units:
        return
    num_gpus = actor_gpus(work.num_gpus, ray.cluster_resources())
    dataset = ray.data.from_items([{'unit': u} for u in units], override_num_blocks=len(units))
    if work.decode is not None:
        dataset = dataset.map_batches(
            _decode_batch,
            fn_kwargs={'decode': work.decode},
            batch_size=1,
            num_cpus=CPU_SHARE,
            max_retries=MAX_RETRIES,
            runtime_env=_runtime_env(),
        )
    payload = cloudpickle.dumps((runner, work, os.environ.get(FAULT_ENV)))
    if work.decode is None and not num_gpus:
        dataset = dataset.map_batches(
            _unit_task,
            fn_kwargs={'payload': payload},
            batch_size=1,
            num_cpus=1,
            concurrency=workers,
            max_retries=MAX_RETRIES,
            runtime_env=_runtime_env(),
        )
    else:
        resource = 'GPU' if num_gpus else 'CPU'
        size = workers or max(1, int(ray.available_resources().get(resource, 1) // max(num_gpus, 1)))
        dataset = dataset.map_batches(
            _UnitActor,
            fn_constructor_args=(payload,),
            compute=ActorPoolStrategy(size=size),
            batch_size=1,
            num_cpus=1 if num_gpus else CPU_SHARE,
            num_gpus=num_gpus or None,
            max_restarts=-1,
            max_task_retries=MAX_RETRIES,
            runtime_env=_runtime_env(),
        )
    done = sorted(int(row['unit']) for row in dataset.take_all())
    if done != sorted(units):
        raise RuntimeError(f'Ray finished units {done[:10]}..., expected {len(units)} units.')


def _task_batch(batch: dict[str, Any], fn: Callable[[Any], Any], items: Sequence[Any], fault: Optional[str]):
    indexes = [int(i) for i in batch['index']]
    for index in indexes:
        for _ in inject_fault(fault, [None]):
            pass
        fn(items[index])
    return {'index': indexes}


def ray_map_tasks(
    fn: Callable[[Any], Any], items: Sequence[Any], *, workers: Optional[int], address: Optional[str]
) -> None:
    """Run ``fn(item)`` for every item as Ray Data tasks (retried when a worker dies); ``fn`` writes its output."""
    ray = ensure_ray(address)
    if not items:
        return
    dataset = ray.data.from_items([{'index': i} for i in range(len(items))], override_num_blocks=len(items))
    dataset = dataset.map_batches(
        _task_batch,
        fn_kwargs={'fn': fn, 'items': list(items), 'fault': os.environ.get(FAULT_ENV)},
        batch_size=1,
        num_cpus=1,
        concurrency=workers,
        max_retries=MAX_RETRIES,
        runtime_env=_runtime_env(),
    )
    done = sorted(int(row['index']) for row in dataset.take_all())
    if done != list(range(len(items))):
        raise RuntimeError(f'Ray finished {len(done)} of {len(items)} tasks.')
