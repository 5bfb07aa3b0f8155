"""Generation with the latent cache."""
