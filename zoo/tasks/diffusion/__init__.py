"""Diffusion (BinaryDM): a DDPM UNet trained with the epsilon-prediction loss, sampled with DDIM."""
