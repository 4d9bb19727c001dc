"""Training entry point: ``composer train.py yamls/<config>.yaml [key=value ...]``.

``composer -n N`` starts N processes; a one-process run may also be started as ``python train.py ...`` (the same
run, without the launcher's import of Composer, about 15 s on a 2-core machine).

The yaml is composed with Hydra (overrides use Hydra's grammar); everything else is in ``diffusion.train``.
"""

from diffusion.train import main

if __name__ == '__main__':
    main()
