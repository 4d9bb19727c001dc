"""Training entry point: ``composer train.py yamls/<config>.yaml [key=value ...]``.

``composer -n N`` starts N processes; a one-process run may also be started as ``python train.py ...`` (the same
run, without the launcher's import of Composer, about 15 s on a 2-core machine).

The yaml is composed with Hydra (overrides use Hydra's grammar); everything else is in ``diffusion.train``.
"""

from diffusion.utils import start_composer_env_probe  # imports Composer: most of the start-up

# The Trainer's CPU-name probe (a second interpreter, about 1 s) runs while the rest is imported and built.
start_composer_env_probe()

from diffusion.train import main  # noqa: E402

if __name__ == '__main__':
    main()
