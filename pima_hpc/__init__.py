"""pima-hpc: distributed training of physics-informed multimodal autoencoders (PIMA).

The model and its math (``pima_hpc.model``) know nothing about ranks, MPI, Slurm or Ray.
Every cross-worker sum goes through :mod:`pima_hpc.collective`.
"""

__version__ = "0.1.0"
