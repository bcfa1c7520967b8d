"""tera.runtime."""
