"""The cross-modal stage (Section 2.4, eq 18): one encoder per modality learns to predict the
multimodal model's latent Gaussian from that modality alone, and (optionally) a cluster head per
modality learns the model's q(c|X) from it, so a cheap modality (a photo) predicts an expensive one.

The multimodal model is frozen here. The stage works on the run's state and checkpoints through its
driver, :class:`pima_hpc.train.trainer.Trainer`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pima_hpc.data.base import batch_loader
from pima_hpc.model.elbo import cluster_distillation, crossmodal_kl
from pima_hpc.model.crossmodal import CrossModalEncoders
from pima_hpc.runtime import to_device
from pima_hpc.train.amplitude import fit_amplitude_models
from pima_hpc.train.precision import autocast
from pima_hpc.train.stage import Stage


class CrossModalStage(Stage):
    """The unimodal encoders and cluster heads, their optimizer, and the stage's epochs."""

    def __init__(self, run):
        super().__init__(run)
        torch.manual_seed(self.cfg.seed + 1)
        self.encoders = CrossModalEncoders(self.spec, self.cfg.model, self.cfg.crossmodal.cluster_head).to(self.device)
        if self.cfg.train.sync_batchnorm and self.ctx.world_size > 1:  # CUDA only, checked by the trainer
            self.encoders = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.encoders)
        self.net = self.ctx.wrap_ddp(self.encoders)
        self.optimizer = torch.optim.Adam(self.encoders.parameters(), lr=self.cfg.crossmodal.lr)

    def _clip(self, module) -> None:
        params = list(module.parameters())
        if self.cfg.crossmodal.grad_clip > 0 and params:  # a part may be empty (no cluster or amplitude heads)
            torch.nn.utils.clip_grad_norm_(params, self.cfg.crossmodal.grad_clip)

    def _forward(self, idx) -> None:
        batch = to_device(self.train_data.read_batch(idx), self.device)
        for name in self.spec.names:
            self.encoders(name, batch[name])
            if name in self.encoders.classifiers:
                self.encoders.classifiers[name](batch[name])

    def fit(self) -> None:
        """Train epochs until crossmodal.epochs, then mark the run done."""
        x = self.cfg.crossmodal
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        while self.state.stage == "crossmodal" and self.state.epoch < x.epochs:
            epoch = self.state.epoch
            tic = time.perf_counter()
            self.encoders.train()
            batches = self.train_data.batch_index_lists(x.batch_size, epoch, self.cfg.seed + 7, shuffle=True)
            counts = self.train_data.global_counts(x.batch_size)
            bar = self.run.progress(len(batches), f"cross-modal {epoch + 1}/{x.epochs}")
            partial = self.run.resume_partial()
            keys = [f"{term}_{n}" for term in ("kl", "distill") for n in self.spec.names
                    if term == "kl" or n in self.encoders.classifiers]
            sums = np.array([partial.get(k, 0.0) for k in keys])
            start = self.state.step
            for step, batch in enumerate(batch_loader(self.train_data, batches[start:], self.cfg.data.num_workers),
                                         start):
                batch = to_device(batch, self.device)
                with torch.no_grad():
                    mu, logvar = self.model.encode(batch)
                    # the heads' teacher: the multimodal model's own q(c | X) at z = mu (with the
                    # default joint posterior it counts the experts' likelihoods too)
                    log_gamma = self.model.cluster_log_posterior(batch, mu, logvar, mu)
                # The networks' losses are independent, so one Adam over all of them equals the
                # paper's sequential per-modality training, with one pass over the data.
                with autocast(self.cfg.train.precision, self.device):
                    predicted = {n: self.net(n, batch[n]) for n in self.spec.names}
                    logits = {n: head(batch[n]) for n, head in self.encoders.classifiers.items()}
                terms = {f"kl_{n}": crossmodal_kl(mu, logvar, *(v.to(mu.dtype) for v in predicted[n]))
                         for n in self.spec.names}
                terms.update({f"distill_{n}": cluster_distillation(log_gamma, logits[n].to(log_gamma.dtype)) for n in logits})
                loss = sum(t.sum() for t in terms.values()) * (self.ctx.world_size / float(counts[step]))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # clipped apart, so that a big eq-18 step does not shrink the cluster heads' steps
                for part in (self.encoders.encoders, self.encoders.classifiers):
                    self._clip(part)
                self.optimizer.step()
                self.state.step = step + 1
                sums += [float(terms[k].detach().sum()) for k in keys]
                self.run.keep_partial(dict(zip(keys, sums)))
                self.run.check_finite(terms, loss, f"stage crossmodal, epoch {epoch + 1}, step {step + 1}")
                bar.update(1)
            bar.close()
            self.run.recompute_batchnorm(self.encoders, self._forward, x.precise_bn_batches,
                                      x.batch_size, epoch)
            amplitude = fit_amplitude_models(self.model, self.encoders, self.train_data, self.eval_batch,
                                             self.collective, self.device)
            self.state.partial_sums = None
            tot = self.collective.allreduce_sum([np.append(sums, len(self.train_data))])[0]
            metrics = {k: float(v / tot[-1]) for k, v in zip(keys, tot[:-1])}
            metrics.update(amplitude)
            metrics.update(epoch=epoch + 1, seconds=time.perf_counter() - tic)
            self.state.history.append({"stage": "crossmodal", **metrics})
            self.state.epoch, self.state.step = epoch + 1, 0
            self.run.save()
            self.run.epoch_done("crossmodal", "cross-modal epoch", epoch + 1, x.epochs, metrics)
        if self.state.stage == "crossmodal":
            self.state.stage = "done"
            self.run.save()
