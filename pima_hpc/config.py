"""Typed, strictly validated run configuration (YAML files plus ``key=value`` overrides).

The schema is the dataclasses below; OmegaConf merges a YAML file and dotted overrides onto it
and rejects unknown keys and wrong types. :func:`load_config` turns every such problem into one
:class:`ConfigError` naming the key (with a did-you-mean) and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from pima_hpc.errors import ConfigError


def _check(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"config key {key!r}: {msg}")


def _choice(value, key: str, choices):
    _check(value in choices, key, f"must be one of {list(choices)}, got {value!r}")


@dataclass
class DataConfig:
    # "digits": scikit-learn's bundled 8x8 digits + X2 = c t + noise (no download, the default).
    # "hdf5": a dataset built by `pima data ...` (a file or a directory of shards).
    source: str = "digits"
    path: Optional[str] = None
    # Embedded-digits options: noise std on X2 (ERRATA 7 reads the paper's numbers as std).
    curve_noise: float = 0.01
    curve_points: int = 20
    # Load the whole split into memory (small data) or stream from HDF5; "auto" decides by size.
    in_memory: str = "auto"
    num_workers: int = 0
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # Train on these modalities only (null: all). One modality is PIMA without fusion (VaDE on images
    # alone); the cross-modal stage is then skipped.
    modalities: Optional[list[str]] = None

    def __post_init__(self):
        _choice(self.source, "data.source", ("digits", "hdf5"))
        _check(self.modalities is None or (len(self.modalities) >= 1 and len(set(self.modalities)) ==
                                           len(self.modalities)), "data.modalities",
               f"must be null or a list of distinct modality names, got {self.modalities}")
        _check(self.source != "hdf5" or bool(self.path), "data.path", "is required when data.source=hdf5")
        _check(self.curve_noise >= 0, "data.curve_noise", f"must be >= 0, got {self.curve_noise}")
        _check(self.curve_points >= 4, "data.curve_points", f"must be >= 4, got {self.curve_points}")
        _choice(self.in_memory, "data.in_memory", ("auto", "yes", "no"))
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass
class ModelConfig:
    latent_dim: int = 3
    n_clusters: int = 10
    image_channels: list[int] = field(default_factory=lambda: [32, 64])
    curve_channels: list[int] = field(default_factory=lambda: [8, 16])
    decoder_channels: list[int] = field(default_factory=lambda: [32, 16])
    # Add a unit-Gaussian prior expert to the product of experts (eqs 7-8).
    prior_expert: bool = False
    # Physics expert for every curve modality, by registered name (pima_hpc.model.experts).
    expert: str = "affine"
    # Keyword arguments of the expert, e.g. {degree: 3} (polynomial) or {knots: 8} (bspline).
    expert_options: Dict[str, Any] = field(default_factory=dict)
    # "fixed" (eq 11): the cluster's curve itself; "free": each curve is a_d E_c(t) + noise, with a
    # per-sample amplitude a_d profiled out in closed form, so clusters group curves by shape, not
    # by scale (pima_hpc.model.experts; docs/method.md "Scale-free experts").
    expert_amplitude: str = "fixed"
    # Observation variance of image modalities (eq 12): "unit" (the paper's N(G(z), I)) or "learned"
    # (closed form each epoch: the mean squared residual at z = mu, floored at image_noise_floor^2), so
    # an image's likelihood is not fixed by its units and pixel count against the curves'.
    image_noise: str = "unit"
    image_noise_floor: float = 0.01
    # Curve modalities decoded by a data-driven network from z (the paper's black-box decoder) instead of a
    # physics expert: for curves no law fits. Their likelihood is eq 12's Gaussian, variance as image_noise.
    network_curves: list[str] = field(default_factory=list)
    # "learned": sigma_hat_c^2 from the weighted residuals each epoch; "fixed": expert_noise_std.
    expert_noise: str = "learned"
    expert_noise_std: float = 1.0
    # Floor on the learned expert noise std (in normalised units) so no cluster collapses.
    expert_noise_floor: float = 0.01
    # q(c|X) in the ELBO: "joint" (mean-field optimum incl. the expert likelihood) or "latent" (paper's p(c|z)).
    cluster_posterior: str = "joint"
    # Initial cluster means: distance between the closest pair (expert init) or the radius they
    # are spread on (random init), in latent units.
    cluster_init_scale: float = 4.0
    # "spread": farthest points on a sphere; "physics": laid out like the clusters' expert fits.
    cluster_init_layout: str = "physics"
    # The mixture prior's covariances (eq 10): "diag" (the paper: sigma_c^2 per axis) or "full" (one full
    # covariance per cluster, set by EM only), for clusters that are elongated or tilted in latent space.
    cluster_covariance: str = "diag"

    def __post_init__(self):
        _check(self.latent_dim >= 1, "model.latent_dim", f"must be >= 1, got {self.latent_dim}")
        _check(self.n_clusters >= 2, "model.n_clusters", f"must be >= 2, got {self.n_clusters}")
        for key in ("image_channels", "curve_channels", "decoder_channels"):
            ch = getattr(self, key)
            _check(len(ch) >= 1 and all(c >= 1 for c in ch), f"model.{key}",
                   f"must be a non-empty list of positive ints, got {list(ch)}")
        _choice(self.cluster_init_layout, "model.cluster_init_layout", ("spread", "physics"))
        _choice(self.cluster_posterior, "model.cluster_posterior", ("joint", "latent"))
        _choice(self.cluster_covariance, "model.cluster_covariance", ("diag", "full"))
        _choice(self.expert_noise, "model.expert_noise", ("learned", "fixed"))
        _choice(self.image_noise, "model.image_noise", ("unit", "learned"))
        _check(self.image_noise_floor > 0, "model.image_noise_floor", "must be > 0")
        _check(len(set(self.network_curves)) == len(self.network_curves), "model.network_curves",
               f"names a modality twice: {list(self.network_curves)}")
        _check(self.expert_noise_std > 0, "model.expert_noise_std", "must be > 0")
        _check(self.expert_noise_floor > 0, "model.expert_noise_floor", "must be > 0")
        from pima_hpc.model.experts import AMPLITUDES, EXPERTS, build_expert
        if ":" not in self.expert:  # package.module:ClassName is imported below
            _choice(self.expert, "model.expert", sorted(EXPERTS))
        _choice(self.expert_amplitude, "model.expert_amplitude", AMPLITUDES)
        try:  # on a stand-in grid: names, import paths and options are checked before any data is read
            import numpy as np
            expert = build_expert(self.expert, np.linspace(0.0, 1.0, 64), self.expert_amplitude,
                                  dict(self.expert_options))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"config key 'model.expert' / 'model.expert_options': {exc}") from None
        _check(self.expert_amplitude == "fixed" or expert.n_params >= 2,
               "model.expert_amplitude",
               f"'free' needs an expert with a shape: {self.expert!r} has one parameter, which a free amplitude "
               "absorbs, so every cluster would have the same curve; use expert_amplitude=fixed")


@dataclass
class LossConfig:
    """Weights on the ELBO's terms (1.0 everywhere is the ELBO of ERRATA 3)."""

    recon_weight: float = 1.0
    expert_weight: float = 1.0
    prior_weight: float = 1.0

    def __post_init__(self):
        for f in fields(self):
            _check(getattr(self, f.name) >= 0, f"loss.{f.name}", f"must be >= 0, got {getattr(self, f.name)}")


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    # Epochs with the cluster means held at their initial, well-separated positions before the
    # first EM update (with cluster_posterior=latent, q(c) comes from the experts, eq 19, meanwhile).
    warmup_epochs: int = 1
    # ... and longer, up to max_warmup_epochs, until the latent code alone (p(c|z=mu)) agrees with
    # q(c|X) on this fraction of the training set: an unsupervised check that clusters are formed.
    max_warmup_epochs: int = 5
    warmup_agreement: float = 0.98
    # Cluster initialisation: k-means++ on per-sample expert fits ("experts"), random ("random"), a
    # Gaussian mixture on the fused latent means after an autoencoder pre-training on every modality
    # ("pretrain"), or "auto": experts and pretrain both tried, each followed by init_trial_epochs of
    # training, and the one with the higher validation ELBO kept (labels never read; docs/method.md).
    init: str = "experts"
    # train.init=pretrain/auto: epochs of autoencoder pre-training before the latent Gaussian mixture is fitted.
    pretrain_epochs: int = 5
    # Pre-training likelihood of each modality (calibrated variances either way): "values" = summed over
    # its values (an image of 784 pixels outweighs a 20-point curve); "modalities" = each modality's mean
    # per value, so every modality counts alike; "images" = the images alone are reconstructed.
    pretrain_balance: str = "values"
    # Images moved at random for the encoders, in pre-training and training: "none", or "affine" = a rotation within
    # 10 degrees and a shift within 10 % of each side per image and epoch; the ELBO scores the stored image
    # (pima_hpc/train/augment.py, docs/method.md).
    augment: str = "none"
    # train.init=auto: epochs of ordinary training after each candidate initialisation before they are compared.
    init_trial_epochs: int = 1
    # train.init=pretrain/auto: where the pre-trained codes are clustered: "none" = a diagonal Gaussian mixture on
    # the codes; "umap" = a mixture on a UMAP embedding of them (umap-learn, the pima-hpc[umap] extra), whose
    # clusters then set the prior's moments in the code space (pima_hpc/train/pretrain.py, docs/method.md).
    pretrain_embedding: str = "none"
    # train.pretrain_embedding=umap: UMAP's number of neighbours.
    umap_neighbors: int = 30
    # train.pretrain_embedding=umap: how many times the embedding and its mixture are found (other random states);
    # the clustering that agrees best with the others (mean adjusted Rand index) is kept. 1 or >= 3.
    umap_restarts: int = 1
    # Optional EM updates of the cluster variances and weights (from sum gamma*mu^2).
    em_variances: bool = True
    # One spherical variance shared by all clusters (robust latent-only assignment) or diagonal per cluster.
    tied_variances: bool = False
    em_weights: bool = True
    # Forgetting factor lambda of the experts' least-squares statistics across epochs (recursive least
    # squares): S <- lambda S_prev + S_epoch. 0 = no memory (each epoch's pass alone), 1 = never forget.
    rls_forgetting: float = 0.0
    # Where the EM statistics come from: "exact" = a pass over the training split in eval mode after each
    # epoch; "streaming" = the training steps' own forward passes (Algorithm 1, pima_hpc/train/streaming.py).
    statistics: str = "exact"
    # train.statistics=streaming: sum the experts' information over ranks and re-solve them every this many
    # steps (recursive least squares, pima_hpc/model/rls.py); 0 = once, at the epoch's end.
    rls_sync_steps: int = 0
    ridge: float = 1e-8
    # torch's SyncBatchNorm (CUDA only): BatchNorm statistics over the global batch instead of per rank.
    sync_batchnorm: bool = False
    # Arithmetic of the networks in training steps: "fp32"; "bf16" = torch.autocast to bfloat16 (CPU with
    # AMX/AVX512-BF16, or CUDA); "tf32" = CUDA matmuls and convolutions in TensorFloat-32. The ELBO's closed
    # forms, the EM statistics, evaluation and checkpoints stay float32/float64 (docs/benchmarks.md).
    precision: str = "fp32"
    # BatchNorm running statistics recomputed over this many training batches after each epoch, before
    # the EM pass reads the encoders in eval mode ("precise BN", pima_hpc/train/batchnorm.py); 0 = keep
    # torch's running averages, which lag the weights (MNIST seed 0: 99.26 % -> 99.55 % test).
    precise_bn_batches: int = 64
    # Cap on optimizer steps per multimodal epoch (0 = the whole split): short benchmarks and smoke runs.
    max_steps_per_epoch: int = 0
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    log_every: int = 50
    # tqdm bars on stderr: null (default) = only when stderr is a terminal, so logs stay clean; true/false force it.
    progress: Optional[bool] = None

    def __post_init__(self):
        _check(self.epochs >= 0, "train.epochs", f"must be >= 0, got {self.epochs}")
        _check(self.batch_size >= 2, "train.batch_size", f"must be >= 2, got {self.batch_size}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0")
        _check(self.max_warmup_epochs >= self.warmup_epochs, "train.max_warmup_epochs", "must be >= train.warmup_epochs")
        _check(0.0 <= self.warmup_agreement <= 1.0, "train.warmup_agreement", "must be in [0, 1]")
        _choice(self.init, "train.init", ("experts", "random", "pretrain", "auto"))
        _choice(self.pretrain_balance, "train.pretrain_balance", ("values", "modalities", "images"))
        _choice(self.augment, "train.augment", ("none", "affine"))
        _choice(self.pretrain_embedding, "train.pretrain_embedding", ("none", "umap"))
        _check(self.umap_neighbors >= 2, "train.umap_neighbors", f"must be >= 2, got {self.umap_neighbors}")
        _check(self.umap_restarts == 1 or self.umap_restarts >= 3, "train.umap_restarts",
               f"must be 1 or >= 3 (two restarts cannot outvote each other), got {self.umap_restarts}")
        _check(self.init_trial_epochs >= 1, "train.init_trial_epochs", f"must be >= 1, got {self.init_trial_epochs}")
        _check(self.pretrain_epochs >= 0, "train.pretrain_epochs", f"must be >= 0, got {self.pretrain_epochs}")
        _check(0.0 <= self.rls_forgetting <= 1.0, "train.rls_forgetting", "must be in [0, 1]")
        _choice(self.statistics, "train.statistics", ("exact", "streaming"))
        _choice(self.precision, "train.precision", ("fp32", "bf16", "tf32"))
        _check(self.rls_sync_steps >= 0, "train.rls_sync_steps", "must be >= 0 (0 = at the epoch's end)")
        _check(self.ridge >= 0, "train.ridge", "must be >= 0")
        _check(self.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", "must be >= 0 (0 = no cap)")
        _check(self.precise_bn_batches >= 0, "train.precise_bn_batches", "must be >= 0 (0 = off)")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")


@dataclass
class CrossModalConfig:
    """Section 2.4: unimodal encoders trained to match the frozen multimodal posterior (eq 18)."""

    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    # Gradient-norm clip (0 = off): a sharp multimodal posterior (a confident curve encoder) makes
    # single KL steps huge early on, and an unclipped image encoder can diverge.
    grad_clip: float = 10.0
    # BatchNorm running statistics recomputed over this many training batches at each epoch end
    # ("precise BN"; 0 = keep the running averages of training). The running averages lag the
    # weights, and curve encoders' eval-mode predictions measured 50-90 % where precise ones gave 99 %.
    precise_bn_batches: int = 64
    # Also train a cluster head p~(c|X_i) per modality on KL(q(c|X) || p~(c|X_i)) and use it for
    # cross-modal cluster predictions (docs/method.md); false = the paper's p(c|z=mu~_i) alone.
    cluster_head: bool = True

    def __post_init__(self):
        _check(self.epochs >= 0, "crossmodal.epochs", f"must be >= 0, got {self.epochs}")
        _check(self.precise_bn_batches >= 0, "crossmodal.precise_bn_batches", "must be >= 0 (0 = off)")
        _check(self.batch_size >= 2, "crossmodal.batch_size", f"must be >= 2, got {self.batch_size}")
        _check(self.lr > 0, "crossmodal.lr", f"must be > 0, got {self.lr}")
        _check(self.grad_clip >= 0, "crossmodal.grad_clip", "must be >= 0")


@dataclass
class DistConfig:
    """How ranks talk; the launcher itself (torchrun, srun, mpiexec) is detected from the environment."""

    # torch.distributed backend: "auto" = NCCL on GPUs, gloo on CPUs.
    backend: str = "auto"
    # Where the float64 EM / least-squares sums go: "auto" = MPI under an MPI launcher, else torch.
    collective: str = "auto"
    # Collective and rendezvous timeout: a dead rank makes the others fail after this long.
    timeout_s: float = 300.0

    def __post_init__(self):
        _choice(self.backend, "dist.backend", ("auto", "gloo", "nccl"))
        _choice(self.collective, "dist.collective", ("auto", "torch", "mpi"))
        _check(self.timeout_s > 0, "dist.timeout_s", f"must be > 0, got {self.timeout_s}")


@dataclass
class LoggingConfig:
    """Experiment tracking, on rank 0 (pima_hpc/train/tracking.py); history.csv is always written."""

    # TensorBoard event files in run_dir/tensorboard: per-epoch scalars of both stages, figures at the end.
    tensorboard: bool = True
    # An MLflow tracking URI (e.g. http://host:5000, file:///path/mlruns); null = no MLflow (optional dependency).
    mlflow: Optional[str] = None
    mlflow_experiment: str = "pima"

    def __post_init__(self):
        _check(bool(self.mlflow_experiment), "logging.mlflow_experiment", "must be a non-empty name")


@dataclass
class Config:
    seed: int = 0
    run_dir: str = "runs/default"
    # Which stages `pima train` runs: the multimodal model, the cross-modal encoders, or both.
    stages: list[str] = field(default_factory=lambda: ["multimodal", "crossmodal"])
    device: str = "auto"
    threads: int = 0
    figures: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    crossmodal: CrossModalConfig = field(default_factory=CrossModalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        _check(len(self.stages) >= 1, "stages", "must name at least one stage")
        for s in self.stages:
            _choice(s, "stages[]", ("multimodal", "crossmodal"))
        _choice(self.device, "device", ("auto", "cpu", "cuda"))
        _check(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")
        if self.model.cluster_covariance == "full":  # full covariances have a closed form only
            _check(self.train.em_variances and not self.train.tied_variances, "model.cluster_covariance",
                   "full covariances are set by EM: keep train.em_variances=true and train.tied_variances=false")


def _all_keys(schema, prefix="") -> list[str]:
    keys = []
    for f in fields(schema):
        keys.append(prefix + f.name)
        if is_dataclass(f.type) or (isinstance(f.default_factory, type) and is_dataclass(f.default_factory)):
            keys += _all_keys(f.default_factory, prefix + f.name + ".")
    return keys


def _unknown_key_error(full_key: str) -> ConfigError:
    known = _all_keys(Config)
    guess = difflib.get_close_matches(full_key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    return ConfigError(f"unknown config key {full_key!r}{hint}")


def _translate(err: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError):
        return _unknown_key_error(key)
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"config key {key!r} in {origin}: {msg}")
    return ConfigError(f"{origin}: {str(err).splitlines()[0]}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults), apply ``key=value`` overrides, validate, return it."""
    schema = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            layer = OmegaConf.load(path)
        except Exception as exc:  # yaml errors come in many types
            detail = " ".join(str(exc).split())  # yaml's messages span lines; an error is one line
            raise ConfigError(f"config file {str(path)!r} is not valid YAML ({detail}); fix that line") from None
        if not OmegaConf.is_dict(layer):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, not {type(layer).__name__}")
        layers.append((layer, str(path)))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (for example train.epochs=3)")
        try:
            layers.append((OmegaConf.from_dotlist([item]), f"override {item!r}"))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {item!r}: {str(exc).splitlines()[0]}") from None
    for layer, origin in layers:
        try:
            schema = OmegaConf.merge(schema, layer)
        except OmegaConfBaseException as exc:
            raise _translate(exc, origin) from None
    try:
        return OmegaConf.to_object(schema)
    except OmegaConfBaseException as exc:
        raise _translate(exc, "config") from None


def to_dict(cfg: Config) -> dict[str, Any]:
    return asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: temp file then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    tmp.replace(path)


def config_hash(cfg: Config, sections=("data", "model")) -> str:
    """Hash of the sections that determine checkpoint compatibility (model shapes, data)."""
    d = to_dict(cfg)
    blob = json.dumps({k: d[k] for k in sections}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
