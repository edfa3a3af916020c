"""The Gaussian family: fit-and-resample of a multivariate Gaussian (Theorem 3.1)."""
