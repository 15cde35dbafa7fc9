"""Diffusion components. Only the image spaces are re-exported here; the denoiser, objectives,
samplers and FLOP counts are imported by their own paths (`lidit_jax.diffusion.dit`,
`.objectives`, `.samplers`, `.flops`)."""
from lidit_jax.diffusion.vae import VAE, PixelSpace, load_vae, make_image_space

__all__ = ["load_vae", "VAE", "PixelSpace", "make_image_space"]
