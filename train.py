"""Training entry point: ``composer train.py yamls/<config>.yaml [key=value ...]``.

The yaml is composed with Hydra (overrides use Hydra's grammar); everything else is in ``diffusion.train``.
"""

from diffusion.train import main

if __name__ == '__main__':
    main()
