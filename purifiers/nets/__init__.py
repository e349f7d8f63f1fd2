"""Re-implementations of the score networks the papers' public checkpoints were trained with (score_sde's DDPM++ and
NCSN++, NCSNv2, NVlabs EDM's SongUNet and DhariwalUNet, guided-diffusion's ADM), under the reference
implementations' parameter names so that those checkpoints load as they are (see :mod:`purifiers.priors.checkpoints`)."""
