"""Stable Diffusion 1.5: the latent teacher, text-to-image pairs, evaluation and the one-step pipeline export."""
