"""Client-side entry points: the ``omnistage`` command line.

Importing this package loads neither torch, transformers, diffusers nor ray.
"""
