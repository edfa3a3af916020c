"""Numerical kernels shared by the families: exact count samplers and small dense linear algebra."""
