"""The math: Lloyd-Max codebooks (centroids.py), seeded rotations (rotation.py), TurboQuant's
mse and prod quantizers (quantizer.py), split keys with outlier channels (outliers.py) and
upstream vLLM's uniform values (uniform.py). No vLLM, no kernels."""
