"""tera.topologies."""
