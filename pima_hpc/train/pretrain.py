"""Initialisation from every modality (``train.init: pretrain``): a short autoencoder pre-training without
the mixture, then a Gaussian mixture fitted to the fused latent means (VaDE's recipe, with PIMA's
fusion).

Pre-training: the encoders of every modality, fused by the product of experts (eqs 7-8), and a
data-driven decoder per modality at z = mu: the image decoders of eq 12 and, for each curve, a small
network decoder built for this stage alone (the experts need clusters, which do not exist yet), so
the code learns what every modality says, not only what helps the images. Each modality's
likelihood is Gaussian with its own variance, set in closed form at every step to the global batch's
mean squared residual per value (floored at model.image_noise_floor), so no modality outweighs
another by its units; ``train.pretrain_balance: modalities`` also divides each modality's term by its
number of values, so a 784-pixel image and a 20-point curve count alike; ``images`` reconstructs the
images alone (the curves take part through the fusion only). Then a diagonal
GaussianMixture (scikit-learn, k-means++ starts) on a subsample of the fused means, gathered from
every rank through the collective so every rank fits the identical mixture, sets the cluster means,
variances and weights. Labels are never read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from scipy.special import logsumexp
from sklearn.mixture import GaussianMixture

from pima_hpc.collective import gather_subsample
from pima_hpc.errors import ConfigError
from pima_hpc.model.networks import CurveDecoder
from pima_hpc.runtime import to_device
from pima_hpc.train.augment import PRETRAIN_STREAM, epoch_moves, moved_batch

log = logging.getLogger("pima")

# The fused posterior's variance at the start of training, as a share of the mixture's mean cluster variance.
SAMPLE_VARIANCE_SHARE = 0.1


def start_encoder_variances(model, fused_var: np.ndarray) -> None:
    """Make every encoder's log-variance output the constant that gives the fused posterior (eqs 7-8) the
    variance ``fused_var`` (latent_dim,).

    Pre-training reads z = mu with these heads held constant (every modality weighs the same in the
    fused mean); random heads would give samples that spread each code over several clusters at the
    first training step (measured on MNIST pairs: a mixture 84 % accurate at the start fell to 21 % in
    one epoch). The same constant for every modality leaves the fused means unchanged. With D
    modalities fused, each expert gets D * fused_var (precisions add); training then learns them."""
    latent = model.cfg.latent_dim
    per_expert = torch.as_tensor(np.log(len(model.names) * np.asarray(fused_var)))
    for enc in model.encoders.values():
        enc.head.weight.data[latent:] = 0.0
        enc.head.bias.data[latent:] = per_expert.to(enc.head.bias.dtype)


def pretrain_decoders(model, seed: int) -> dict:
    """One data-driven decoder per modality: the model's image decoders and new curve decoders (their
    weights drawn from their own generator, so the model's other initial weights do not change)."""
    decoders = dict(model.decoders.items())
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed + 31)
        for name in model.curve_names:
            decoders[name] = CurveDecoder(model.spec[name], model.cfg.latent_dim).to(
                model.cluster_means.device)
    return decoders


class AutoencoderPretraining:
    """Train the encoders and every modality's decoder on the reconstruction at z = mu with calibrated
    variances, epoch by epoch; :meth:`result` gives the negative log-likelihood per sample of each epoch
    (mean over its steps) and each modality's final noise std (normalised units).

    ``augment="affine"``: the encoders see every image moved at random, the decoders reconstruct it as stored
    (pima_hpc/train/augment.py). Measured on MNIST images (seed 4, 10 epochs, one UMAP): the start 94.7 % against
    92.3 % on validation; reconstructing the moved image instead (DEC-DA's recipe) gave 79.4-89.4 % (docs/method.md).

    Resumable at epoch boundaries: :meth:`state_dict` after an epoch and :meth:`load_state_dict` into a fresh
    instance (built on the model as checkpointed then) continue exactly as if never stopped, because an
    epoch's batches and image moves are drawn from (seed, epoch) and nothing here reads the global generators.
    """

    def __init__(self, model, reader, ctx, epochs: int, batch_size: int, lr: float, seed: int,
                 balance: str = "values", augment: str = "none"):
        self.model, self.reader, self.ctx = model, reader, ctx
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self.balance, self.augment = balance, augment
        self.losses: list[float] = []
        self.decoders = pretrain_decoders(model, seed) if epochs > 0 else {}
        self.names = [n for n in model.names
                      if n in self.decoders and (balance != "images" or n in model.image_names)]
        self.var = np.ones(len(self.names))
        self.extra = torch.nn.ModuleList([self.decoders[n] for n in model.curve_names if n in self.decoders])
        self.params = [p for m in (model.encoders, model.decoders, self.extra) for p in m.parameters()]
        self.optimizer = torch.optim.Adam(self.params, lr=lr) if self.names else None
        if self.names:  # log-variance 0 for every expert (idempotent: a resumed model already has it)
            start_encoder_variances(model, np.full(model.cfg.latent_dim, 1.0 / len(model.names)))

    @property
    def done(self) -> bool:
        return not self.names or len(self.losses) >= self.epochs

    def run(self, stop_requested=None, on_stop=None, after_epoch=None) -> dict:
        """The remaining epochs. ``stop_requested()`` is this rank's stop flag; it rides each step's sum of
        squared errors across ranks (no extra collective), and when any rank's is set every rank calls
        ``on_stop(where)`` after that same step, which must raise (the epoch is then lost, the last
        :meth:`state_dict` is not). ``after_epoch()`` runs after every epoch."""
        while not self.done:
            self.epoch(len(self.losses), stop_requested, on_stop)
            if after_epoch is not None:
                after_epoch()
        return self.result()

    def epoch(self, epoch: int, stop_requested=None, on_stop=None) -> None:
        model, reader, ctx, names = self.model, self.reader, self.ctx, self.names
        counts = reader.global_counts(self.batch_size)
        floor = model.cfg.image_noise_floor ** 2
        dims = np.array([float(np.prod(model.spec[n].shape)) for n in names])
        latent = model.cfg.latent_dim
        model.train()
        self.extra.train()
        total = 0.0
        moves = epoch_moves(self.augment, reader.num_global, self.seed, epoch, PRETRAIN_STREAM)
        for step, idx in enumerate(reader.batch_index_lists(self.batch_size, epoch, self.seed + 23, shuffle=True)):
            batch = to_device(reader.read_batch(idx), ctx.device)
            # the encoders see the moved images (train.augment), the decoders reconstruct the batch as stored
            mu, _ = model.encode(moved_batch(batch, model.image_names, idx, moves))
            sse = [((batch[n] - self.decoders[n](mu)) ** 2).flatten(1).sum(1).sum() for n in names]
            # sigma_m^2 in closed form from the global batch (every rank the same): the likelihood's
            # maximiser, so each modality's term is scale-free.
            flag = float(bool(stop_requested())) if stop_requested is not None else 0.0
            sums = ctx.collective.allreduce_sum([np.array([float(v.detach()) for v in sse] + [flag])])[0]
            stop, sums = sums[-1] > 0, sums[:-1]
            self.var = np.maximum(sums / (float(counts[step]) * dims), floor)
            weight = 1.0 / (2.0 * self.var) / (dims if self.balance == "modalities" else 1.0)
            loss = sum(float(w) * v for w, v in zip(weight, sse)) / float(counts[step])
            self.optimizer.zero_grad(set_to_none=True)
            (loss * ctx.world_size).backward()
            ctx.average_gradients(self.params)
            for enc in model.encoders.values():  # the log-variance heads stay constant (start_encoder_variances)
                enc.head.weight.grad[latent:] = 0.0
                enc.head.bias.grad[latent:] = 0.0
            self.optimizer.step()
            # the global batch's negative log-likelihood per sample at those variances (the same on every rank)
            nll = 0.5 * dims * (np.log(2 * np.pi * self.var) + 1.0)
            total += float((nll / dims if self.balance == "modalities" else nll).sum())
            if stop and on_stop is not None:
                on_stop(f"pre-training epoch {epoch + 1}, step {step + 1}")
        self.losses.append(total / max(1, len(counts)))
        if ctx.is_root:
            log.info("pre-training %d/%d  negative log-likelihood per sample %.4g  noise std %s", epoch + 1,
                     self.epochs, self.losses[-1], ", ".join(f"{n} {np.sqrt(v):.3g}" for n, v in zip(names, self.var)))

    def result(self) -> dict:
        if not self.names:
            return {"pretrain_losses": []}
        return {"pretrain_losses": list(self.losses),
                "pretrain_noise_std": {n: float(np.sqrt(v)) for n, v in zip(self.names, self.var)}}

    def state_dict(self) -> dict:
        """What an epoch-boundary checkpoint needs beyond the model: the curve decoders, the optimizer, the
        losses so far and the last noise variances (tensors and plain containers: weights_only loads it)."""
        return {"decoders": self.extra.state_dict(), "optimizer": self.optimizer.state_dict(),
                "losses": list(self.losses), "var": [float(v) for v in self.var]}

    def load_state_dict(self, state: dict) -> None:
        self.extra.load_state_dict(state["decoders"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.losses = [float(v) for v in state["losses"]]
        self.var = np.asarray(state["var"], dtype=np.float64)


def pretrain_autoencoder(model, reader, ctx, epochs: int, batch_size: int, lr: float, seed: int,
                         balance: str = "values", augment: str = "none", stop_requested=None, on_stop=None) -> dict:
    """All of :class:`AutoencoderPretraining` in one call (no checkpoints between epochs)."""
    return AutoencoderPretraining(model, reader, ctx, epochs, batch_size, lr, seed, balance,
                                  augment).run(stop_requested, on_stop)


@torch.no_grad()
def fused_means(model, reader, batch_size: int, device) -> np.ndarray:
    """The fused posterior means (eqs 7-8) of a split in eval mode, this rank's rows: (N, latent_dim) float64."""
    model.eval()
    return np.concatenate([model.encode(to_device(b, device))[0].double().cpu().numpy()
                           for b in reader.iter_batches(batch_size, shuffle=False)])


# Starts of the Gaussian mixture in a UMAP embedding; the one of highest likelihood is kept (scikit-learn's n_init).
# Measured on MNIST images (seed 2, codes pre-trained with moved images): about one start in four finds the
# 94.9 %-pure clustering, the others one that merges two digits and splits a third (81 %), at a lower likelihood
# (21.29 against 21.51), so 3 starts often missed it and 20 (0.75^20 = 0.3 %) rarely do.
EMBEDDING_MIXTURE_INITS = 20


def require_umap() -> None:
    """One ConfigError naming the extra when umap-learn is missing (checked when the stage is built, before
    pre-training). Found without importing it: the trainer's process never loads umap or numba."""
    import importlib.util
    if importlib.util.find_spec("umap") is None:
        raise ConfigError("config key 'train.pretrain_embedding': umap needs umap-learn; install it with "
                          "pip install 'pima-hpc[umap]', or set train.pretrain_embedding=none")


def umap_mixture(sample: np.ndarray, n_clusters: int, seed: int, neighbors: int) -> np.ndarray:
    """Responsibilities (N, K) of a full-covariance GaussianMixture fitted to a UMAP embedding of ``sample``.

    UMAP (umap-learn) keeps each code's nearest neighbours together in an ``n_clusters``-dimensional
    embedding with ``min_dist=0``, so classes that bend through the code space become compact blobs a
    mixture can separate (N2D, McConville et al. 2020). Measured on MNIST images (10 pre-training
    epochs, seed 0, test split): a mixture on the codes themselves 77.4 %, on their UMAP embedding 94.5 %.
    """
    return umap_mixtures(sample, n_clusters, [seed], neighbors)[0]


def umap_mixtures(sample: np.ndarray, n_clusters: int, seeds: list[int], neighbors: int,
                  stop_requested=None, poll_s: float = 0.2) -> list[np.ndarray] | None:
    """:func:`umap_mixture` once per random state in ``seeds`` (UMAP's and the mixture's), in order; each
    equals :func:`umap_mixture` with that random state alone (tested).

    They run in a child process (spawned, one per call): UMAP's numba-parallel code changes process-wide
    state of the process it runs in, after which training rounded differently (~1e-6) from a resumed run
    that never called it, so a stopped run did not resume bit for bit (tests/test_faults.py). The child
    leaves the trainer's process as it was; one child for every restart compiles numba's code once.

    ``stop_requested`` (a callable) is polled every ``poll_s`` seconds while the child works; when it turns
    true the child is killed and None returned. UMAP with its restarts takes minutes on MNIST, longer than
    Slurm's signal lead time, so a stop cannot wait for it. The child ignores SIGTERM and SIGUSR1 (sent to a
    whole process group they reach it too): whether to stop is the trainer's decision, and the child dies
    with the trainer's call.
    """
    require_umap()
    import multiprocessing
    import tempfile
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="pima-umap-") as folder:
        # the codes go through a file, not the process's arguments: CPython writes those into a pipe whose read end
        # it holds itself until the write ends, so a child that died before reading megabytes of them hung start()
        codes = Path(folder) / "codes.npy"
        np.save(codes, np.ascontiguousarray(sample))
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_umap_child, args=(send, str(codes), n_clusters, list(seeds), neighbors),
                                name="pima-umap", daemon=True)
        child.start()
        send.close()  # the child's copy of the write end is then the only one: its death is an end of file
        return _umap_result(child, receive, stop_requested, poll_s)


# How long a UMAP child that has sent its result may take to exit before it is killed.
CHILD_EXIT_S = 30.0


def _umap_result(child, receive, stop_requested, poll_s: float) -> list[np.ndarray] | None:
    """What the UMAP child sends back, None after a stop request (the child killed), or one RuntimeError."""
    from multiprocessing.connection import wait
    try:
        while True:
            ready = wait([receive, child.sentinel], poll_s)
            if receive in ready:  # the result, or the end of file of a child that died (recv raises EOFError)
                break
            if ready:  # the child exited and its pipe did not say so
                raise EOFError
            if stop_requested is not None and stop_requested():
                return None
        ok, value = receive.recv()
        child.join(CHILD_EXIT_S)  # its exit runs finalizers (joblib's semaphore): killed now, the semaphore leaks
    except EOFError:
        child.join()
        raise RuntimeError(f"the UMAP child process died (exit code {child.exitcode}) before it returned the "
                           f"clusters; if the system killed it for memory, lower train.umap_restarts") from None
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receive.close()
    if not ok:
        raise RuntimeError(f"UMAP failed in its child process:\n{value}")
    return value


def _umap_mixtures_here(sample: np.ndarray, n_clusters: int, seeds: list[int], neighbors: int) -> list[np.ndarray]:
    """:func:`umap_mixtures` in this process (the child's side)."""
    import umap
    import warnings
    out = []
    for seed in seeds:
        with warnings.catch_warnings():  # "n_jobs overridden by random_state": determinism is the point
            warnings.simplefilter("ignore", UserWarning)
            emb = umap.UMAP(n_components=n_clusters, n_neighbors=neighbors, min_dist=0.0,
                            random_state=seed).fit_transform(sample)
            gmm = GaussianMixture(n_components=n_clusters, covariance_type="full", n_init=EMBEDDING_MIXTURE_INITS,
                                  random_state=seed).fit(emb)
            out.append(gmm.predict_proba(emb))
    return out


def _umap_child(send, codes: str, n_clusters: int, seeds: list[int], neighbors: int) -> None:
    """The child's side of :func:`umap_mixtures`: the result, or the failure's traceback, back through ``send``."""
    import signal
    import traceback
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    try:
        result = (True, _umap_mixtures_here(np.load(codes), n_clusters, seeds, neighbors))
    except Exception:
        result = (False, traceback.format_exc())
    send.send(result)
    send.close()


def restart_seeds(seed: int, restarts: int) -> list[int]:
    """The random states of ``restarts`` UMAP restarts of a run with ``seed``; the first is ``seed`` itself (one
    restart is the single embedding of earlier versions), the others 1000 apart so runs' restarts differ."""
    return [seed + 1000 * r for r in range(restarts)]


def most_reproducible(partitions: list[np.ndarray]) -> tuple[int, np.ndarray]:
    """The partition that agrees best with the others: the index of the one with the highest mean adjusted Rand
    index (scikit-learn) against the rest, and every partition's mean ARI. Ties go to the earlier one.

    Clusterings found again from other random starts are the stable ones (clustering stability, von Luxburg
    2010); an embedding that merged two classes and split a third is an outlier among its restarts. Measured
    on MNIST images (the codes of seed 4 after 12 pre-training epochs with a cosine-decayed rate, 5
    restarts): the restart 80.7 % pure had mean ARI 0.85, the four 92.5-94.7 % pure ones 0.92-0.94
    (docs/method.md). No label is read."""
    from sklearn.metrics import adjusted_rand_score
    n = len(partitions)
    if n == 1:
        return 0, np.ones(1)
    ari = np.array([[adjusted_rand_score(partitions[i], partitions[j]) for j in range(n)] for i in range(n)])
    mean = (ari.sum(1) - np.diag(ari)) / (n - 1)
    return int(np.argmax(mean)), mean


def mixture_from_responsibilities(sample: np.ndarray, resp: np.ndarray, reg: float = 1e-4, full: bool = False) -> dict:
    """Gaussian mixture moments (weights, means, covariances) of ``sample`` under ``resp`` (an M-step):
    diagonal variances (K, l), or with ``full`` full covariances (K, l, l); ``reg`` is added to the diagonal."""
    n = resp.sum(0) + 1e-12
    means = resp.T @ sample / n[:, None]
    if full:
        cov = np.einsum("nk,ni,nj->kij", resp, sample, sample, optimize=True) / n[:, None, None]
        cov = cov - np.einsum("ki,kj->kij", means, means) + reg * np.eye(sample.shape[1])
        return {"weights": n / n.sum(), "means": means, "covariances": 0.5 * (cov + np.swapaxes(cov, 1, 2))}
    var = resp.T @ sample ** 2 / n[:, None] - means ** 2
    return {"weights": n / n.sum(), "means": means, "covariances": np.maximum(var, 0.0) + reg}


def mean_log_likelihood(sample: np.ndarray, fit: dict) -> float:
    """Mean log-density of ``sample`` under the mixture ``fit``, diagonal or full (what GaussianMixture.score
    reports)."""
    cov = fit["covariances"]
    if cov.ndim == 3:
        from scipy.stats import multivariate_normal
        log_dens = np.stack([multivariate_normal(m, c).logpdf(sample) for m, c in zip(fit["means"], cov)], axis=1)
    else:
        log_dens = -0.5 * (((sample[:, None, :] - fit["means"]) ** 2 / cov).sum(-1) + np.log(2 * np.pi * cov).sum(-1))
    return float(logsumexp(log_dens + np.log(fit["weights"]), axis=1).mean())


@torch.no_grad()
def fit_latent_mixture(model, reader, batch_size: int, collective, device, seed: int,
                       max_rows: int = 20000, embedding: str = "none", neighbors: int = 30,
                       restarts: int = 1, stop_requested=None) -> dict | None:
    """Set the mixture prior (means, covariances, weights) from a Gaussian mixture of the fused means.

    ``embedding="none"``: a GaussianMixture on the codes (diagonal or full, as ``model.cluster_covariance``). ``"umap"``: the clusters are found in a
    UMAP embedding of the codes (:func:`umap_mixture`), and the prior is their moments in the code space
    (:func:`mixture_from_responsibilities`); with ``restarts`` > 1 the embedding and its mixture are found that many
    times from other random states and the most reproducible clustering is kept (:func:`most_reproducible`).
    Rank 0 fits and broadcasts, so every rank holds the identical mixture.

    ``stop_requested`` (rank 0's stop flag, a callable) ends the UMAP fit early: every rank then returns None
    and the model is unchanged (the mixture on the codes themselves takes seconds and is not interrupted).
    """
    sample = gather_subsample(collective, fused_means(model, reader, batch_size, device), max_rows)
    fit = None
    if collective.is_root:
        fit = (_fit_in_umap_embedding(sample, model, seed, neighbors, restarts, stop_requested) if embedding == "umap"
               else _fit_to_codes(sample, model, seed))
    fit = collective.broadcast_object(fit)
    if fit.get("stopped"):
        return None
    cov = np.asarray(fit["covariances"])
    per_axis = np.diagonal(cov, axis1=1, axis2=2) if cov.ndim == 3 else cov
    start_encoder_variances(model, SAMPLE_VARIANCE_SHARE * per_axis.mean(0))
    model.cluster_means.copy_(torch.as_tensor(fit["means"], dtype=model.cluster_means.dtype))
    model.set_covariances(cov)
    model.pi_logits.data.copy_(torch.as_tensor(np.log(fit["weights"]), dtype=model.pi_logits.dtype))
    return {"gmm_mean_log_likelihood": fit["mean_log_likelihood"], "gmm_converged": fit["converged"],
            "gmm_samples": int(len(sample)), "cluster_weights": np.asarray(fit["weights"]).tolist(),
            "embedding": embedding, **({"umap_restarts": fit["umap_restarts"]} if "umap_restarts" in fit else {})}


def _fit_to_codes(sample: np.ndarray, model, seed: int) -> dict:
    """A GaussianMixture (k-means++ starts) on the codes themselves, diagonal or full as the model's prior."""
    gmm = GaussianMixture(n_components=model.cfg.n_clusters, covariance_type="full" if model.full_covariance else "diag",
                          init_params="k-means++", n_init=3, reg_covar=1e-4, random_state=seed).fit(sample)
    return {"weights": gmm.weights_, "means": gmm.means_, "covariances": gmm.covariances_,
            "mean_log_likelihood": float(gmm.score(sample)), "converged": bool(gmm.converged_)}


def _fit_in_umap_embedding(sample: np.ndarray, model, seed: int, neighbors: int, restarts: int,
                           stop_requested) -> dict:
    """The clusters of the most reproducible of ``restarts`` UMAP embeddings, as moments of the codes; ``{"stopped":
    True}`` when ``stop_requested`` ended the embedding first."""
    seeds = restart_seeds(seed, restarts)
    log.info("finding %d clusters in a UMAP embedding of %d codes (%d restart%s, in a child process)",
             model.cfg.n_clusters, len(sample), restarts, "s" if restarts > 1 else "")
    resps = umap_mixtures(sample, model.cfg.n_clusters, seeds, neighbors, stop_requested)
    if resps is None:
        return {"stopped": True}
    chosen, mean_ari = most_reproducible([r.argmax(1) for r in resps])
    fit = mixture_from_responsibilities(sample, resps[chosen], full=model.full_covariance)
    fit["mean_log_likelihood"], fit["converged"] = mean_log_likelihood(sample, fit), True
    if restarts > 1:
        fit["umap_restarts"] = {"random_states": seeds, "mean_ari": mean_ari.tolist(), "chosen": seeds[chosen]}
        log.info("UMAP restarts: kept random state %d, the clustering most like the others (mean adjusted "
                 "Rand index %s)", seeds[chosen], ", ".join(f"{s} {a:.3f}" for s, a in zip(seeds, mean_ari)))
    return fit
