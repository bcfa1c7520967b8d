"""tera.kernels."""
