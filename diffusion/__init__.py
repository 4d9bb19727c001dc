"""CommonCanvas: latent diffusion training on Creative-Commons data with Composer.

The package is built in layers. A module may import modules of its own layer or of a layer below it, never of a
layer above, and no chain of imports may lead back to where it started. :data:`LAYERS` lists them from the bottom:

1. ``utils``: small helpers and the ``Registry`` class; imports nothing of the package.
2. ``config``: the typed config schema, yaml loading and validation.
3. ``checkpointing``: SHA-256 manifests, the trust check, the run-folder names and ``RunConfigInCheckpoint``.
4. ``data``: datasets, image decoding, licenses, the batch contract, synthetic data.
5. ``models``: the ComposerModels and their parts.
6. ``parallelism``: FSDP set-up and the generic FSDP helpers (parameter names, gathering, full parameters).
7. ``algorithms``: Composer algorithms (attention backend, gradient checkpointing, compilation, sharded EMA) and
   ``optim`` (parameter groups, TF32, 8-bit AdamW).
8. ``evaluation``: the evaluation library (prompt sets, prompt following, image metrics, sample folders).
9. ``callbacks``: Composer callbacks, which evaluate and export during training.
10. ``registry``: the named registries that configs pick components from.
11. ``builders``: config to ``Trainer``.
12. ``commands``: ``diffusion.train`` and the command-line entry points (``diffusion.pipeline``,
    ``diffusion.inference``, ``python -m diffusion.evaluation.metrics``, ``.human_eval`` and ``.finetune_report``);
    nothing imports them but each other.

``tests/test_layers.py`` checks every import of the package against :data:`LAYERS`, imports inside functions
included, so a deferred import cannot hide a circle or an upward dependency.
"""

# (layer, modules) from the bottom layer to the top. 'pkg.*' is a package and everything in it; any other entry is
# that one module. A module belongs to its most specific entry ('diffusion.evaluation.metrics' beats
# 'diffusion.evaluation.*').
LAYERS = (
    ('utils', ('diffusion', 'diffusion.utils')),
    ('config', ('diffusion.config',)),
    ('checkpointing', ('diffusion.checkpointing',)),
    ('data', ('diffusion.data.*',)),
    ('models', ('diffusion.models.*',)),
    ('parallelism', ('diffusion.parallelism',)),
    ('algorithms', ('diffusion.algorithms.*', 'diffusion.optim')),
    ('evaluation', ('diffusion.evaluation.*',)),
    ('callbacks', ('diffusion.callbacks.*',)),
    ('registry', ('diffusion.registry',)),
    ('builders', ('diffusion.builders',)),
    (
        'commands',
        (
            'diffusion.train',
            'diffusion.pipeline.*',
            'diffusion.inference.*',
            'diffusion.evaluation.metrics',
            'diffusion.evaluation.human_eval',
            'diffusion.evaluation.finetune_report',
        ),
    ),
)
