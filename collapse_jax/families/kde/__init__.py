"""Kernel density estimation: Gaussian KDEs refitted to their own samples."""
