"""ncf_jax: Neural Collaborative Filtering (NeuMF) in JAX/Flax, MLPerf NCF rules."""

__version__ = '0.1.0'
