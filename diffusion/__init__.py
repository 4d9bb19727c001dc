"""CommonCanvas: latent diffusion training on Creative-Commons data with Composer."""
