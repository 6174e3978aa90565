"""pima-hpc: distributed training toolkit for physics-informed multimodal autoencoders."""

from setuptools import find_packages, setup

setup(
    name="pima-hpc",
    version="0.1.0",
    description="Distributed training of physics-informed multimodal autoencoders (PIMA)",
    python_requires=">=3.10",
    packages=find_packages(include=["pima_hpc", "pima_hpc.*"]),
    install_requires=[
        # Install torch==2.13.0 (CPU wheel) first; this range accepts it without pulling CUDA builds.
        "torch>=2.1,<2.14",
        "numpy>=1.24",
        "scipy>=1.10",
        "h5py>=3.8",
        "omegaconf>=2.3",
        "PyYAML>=6.0",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "tensorboard>=2.12",
        "python-hostlist>=1.21",  # Slurm nodelist / tasks-per-node syntax  # event files of every run (pima_hpc/train/tracking.py)
    ],
    extras_require={
        "mpi": ["mpich", "mpi4py>=3.1"],
        "tune": ["ray[tune,train]>=2.9"],
        "mlflow": ["mlflow-skinny>=2.10"],  # logging.mlflow: URI
        "umap": ["umap-learn>=0.5"],  # train.pretrain_embedding: umap
        "test": ["pytest>=7", "pytest-timeout", "mlflow-skinny>=2.10"],
    },
    entry_points={"console_scripts": ["pima=pima_hpc.cli:main"]},
)
