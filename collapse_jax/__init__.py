"""collapse_jax: a JAX toolkit for studying model collapse."""

__version__ = "0.1.0"
