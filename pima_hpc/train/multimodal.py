"""The multimodal stage: Algorithm 1, streaming EM + Adam (Section 2.3, eqs 13-17).

Per epoch: Adam runs over this rank's batches of the training split, then an EM pass in eval mode
(or the statistics the training steps gathered, train.statistics=streaming) sets the cluster means
(and optionally variances and weights) and solves the experts' least squares (eq 17). During the
warm-up the cluster means stay at their physics-ordered anchors, which pulls every sample's latent
code to the cluster its physics says it belongs to, until the latent code alone agrees with q(c|X)
(see closed_form_updates and docs/method.md). With the paper's q(c) = p(c|z)
(model.cluster_posterior=latent) the warm-up takes q(c) from the experts (eq 19).

Every loss is a per-sample mean over the GLOBAL batch, so the learning rate does not depend on batch
size or rank count. The stage works on the run's state and checkpoints through its driver,
:class:`pima_hpc.train.trainer.Trainer`.
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
import torch

from pima_hpc.data.base import batch_loader
from pima_hpc.errors import ConfigError
from pima_hpc.model.pima import elbo_from_terms
from pima_hpc.runtime import to_device
from pima_hpc.train import em
from pima_hpc.train.augment import TRAIN_STREAM, epoch_moves, moved_batch
from pima_hpc.train.precision import autocast
from pima_hpc.train.stage import Stage

log = logging.getLogger("pima")


def step_seed(*parts: int) -> int:
    """A generator per (seed, stage, epoch, step, rank): exact resume needs no RNG state for the noise."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _injected_nan_step() -> int | None:
    """Test hook (tests/test_faults.py, docs/reliability.md): ``PIMA_FAULT_INJECT=nan_at_step:N`` turns
    the ``recon`` term to NaN at multimodal step N, counted from 1 over the whole run
    (``epoch * steps_per_epoch + step + 1``), on every rank. Read once, when the stage is built."""
    spec = os.environ.get("PIMA_FAULT_INJECT", "")
    if not spec:
        return None
    kind, _, n = spec.partition(":")
    if kind != "nan_at_step" or not n.isdigit() or int(n) < 1:
        raise ConfigError(f"PIMA_FAULT_INJECT={spec!r}: expected nan_at_step:N with N >= 1 (or unset it)")
    return int(n)


class MultimodalStage(Stage):
    """PIMA's encoders, decoders, mixture and experts trained together (the run's first stage)."""

    def __init__(self, run):
        super().__init__(run)
        self.val_data = run.val_data
        # Closed-form EM replaces Adam for whatever it sets (otherwise the two would fight).
        self.model.cluster_logvars.requires_grad_(not self.cfg.train.em_variances)
        self.model.pi_logits.requires_grad_(not self.cfg.train.em_weights)
        self.net = self.ctx.wrap_ddp(self.model)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad],
                                          lr=self.cfg.train.lr, weight_decay=self.cfg.train.weight_decay)
        self.curve_memory = None  # the experts' statistics kept across epochs (train.rls_forgetting > 0)
        self.streaming = self._streaming_statistics()
        self.nan_at_step = _injected_nan_step()
        # train.init=pretrain's pre-training while it runs (its epoch checkpoints hold its state), and the
        # state a resumed run continues it from
        self.pretraining = None
        self.pretraining_resumed = None
        if self.cfg.train.pretrain_embedding == "umap" and self.cfg.train.init in ("pretrain", "auto"):
            from pima_hpc.train.pretrain import require_umap
            require_umap()  # fail now, not after the pre-training
        if self.cfg.train.augment != "none" and not self.model.image_names:
            raise ConfigError(f"config key 'train.augment': {self.cfg.train.augment} moves images, and the modalities "
                              f"{list(self.model.names)} include none; set train.augment=none")

    def _streaming_statistics(self):
        """train.statistics=streaming: the EM statistics of the training pass (pima_hpc/train/streaming.py)."""
        t = self.cfg.train
        if t.statistics != "streaming":
            return None
        opaque = [n for n in self.model.curve_names if not self.model.experts[n].has_information_form]
        if opaque:
            raise ConfigError(f"config key 'train.statistics': streaming needs experts with an information form "
                              f"(linear or piecewise-linear laws); model.expert={self.cfg.model.expert} has none: "
                              "set train.statistics=exact")
        steps = len(self.train_data.global_counts(t.batch_size))
        if t.max_steps_per_epoch:
            steps = min(steps, t.max_steps_per_epoch)
        from pima_hpc.train.streaming import TrainingPassStatistics
        return TrainingPassStatistics(self.model, steps, t.rls_forgetting, t.rls_sync_steps)

    @torch.no_grad()
    def _multimodal_forward(self, idx) -> None:
        gen = torch.Generator().manual_seed(step_seed(self.cfg.seed, 11, int(idx[0]), self.ctx.rank))
        self.model(to_device(self.train_data.read_batch(idx), self.device), gen)

    def _check_expert_fit(self, max_curves: int = 2000) -> dict:
        """Median per-sample R^2 of the chosen expert on (up to) ``max_curves`` of this rank's training
        curves; rank 0 warns when the law cannot describe them (pima_hpc/model/fit_quality.py)."""
        from pima_hpc.model.fit_quality import POOR_MEDIAN_R2, per_sample_r2
        reader = self.train_data
        take = np.linspace(0, len(reader) - 1, min(max_curves, len(reader))).astype(int)
        batch = reader.read_batch(reader.indices[take])
        out = {}
        for name in self.model.curve_names:
            x, grid, mask = self.model.measured_points(name, batch)
            median = float(np.median(per_sample_r2(self.model.experts[name], x, grid, mask)))
            out[name] = median
            if self.run.is_root and median < POOR_MEDIAN_R2:
                log.warning("model.expert=%s fits the curves of modality %r poorly (median per-sample R^2 %.3f on %d "
                            "training curves): compare experts with `pima data fit-experts DATA`, or use model.expert=free or "
                            "model.network_curves=[%s]",
                            self.cfg.model.expert, name, median, len(x), name)
        return out

    def initialise(self) -> None:
        if self.model.curve_names:
            self._check_expert_fit()
        kind = self.cfg.train.init
        if kind == "experts" and not self.model.curve_names:
            kind = "random"  # no curve to fit: the means stay where the model put them
        info = self._initialise_by_trial() if kind == "auto" else self._initialise(kind)
        self.state.initialized = True
        self.state.init = info

    def _initialise(self, kind: str, checkpoints: bool = True) -> dict:
        """One initialisation (train.init): the mixture prior, then the experts from its responsibilities.
        ``checkpoints``: pre-training saves a checkpoint after each epoch (not inside train.init=auto's trial)."""
        bs, t = self.eval_batch, self.cfg.train
        info = {"method": kind}
        if kind == "experts":
            info.update(em.initialise_from_experts(self.model, self.train_data, bs, self.collective, self.device,
                                                   self.cfg.seed))
        else:
            if kind == "pretrain":
                from pima_hpc.train.pretrain import fit_latent_mixture
                info.update(self._pretrain(checkpoints))
                # the mixture is fitted in eval mode: BatchNorm statistics the same on every rank first
                self.run.recompute_batchnorm(self.model, self._multimodal_forward, t.precise_bn_batches,
                                             t.batch_size, 0)
                fit = fit_latent_mixture(self.model, self.train_data, bs, self.collective, self.device, self.cfg.seed,
                                         embedding=t.pretrain_embedding, neighbors=t.umap_neighbors,
                                         restarts=t.umap_restarts, stop_requested=lambda: self.run.signals.requested)
                if fit is None:  # a signal during the UMAP fit (minutes): the pre-training's checkpoints stand
                    from pima_hpc.train.signals import StopRequested
                    raise StopRequested("the mixture fit after pre-training", self._pretraining_kept(
                        len(info["pretrain_losses"]), checkpoints))
                info.update(fit)
            _, curves = em.em_pass(self.model, self.train_data, bs, self.collective, self.device)
            if curves:  # the experts from the mixture's responsibilities (eq 17)
                for name, st in curves.items():
                    self.model.solve_expert(name, st, t.ridge, self.cfg.model.expert_noise,
                                            self.cfg.model.expert_noise_floor)
        if self.cfg.model.image_noise == "learned" and self.model.decoded_names:
            info["image_noise_std"] = em.update_image_noise(self.model, self.train_data, bs, self.collective,
                                                            self.device)
        return info

    def _pretrain(self, checkpoints: bool) -> dict:
        """The autoencoder pre-training of train.init=pretrain, stoppable after any step.

        With ``checkpoints`` every epoch ends in a checkpoint (ckpt-pretrain-e<N>) that a resumed run
        continues exactly; a stop signal ends the run after the current step with that checkpoint the
        newest (no epoch done: none, and the run starts over). Without, the caller owns the checkpoint."""
        from pima_hpc.train.pretrain import AutoencoderPretraining
        from pima_hpc.train.signals import StopRequested
        t = self.cfg.train
        pre = AutoencoderPretraining(self.model, self.train_data, self.ctx, t.pretrain_epochs, t.batch_size, t.lr,
                                     self.cfg.seed, t.pretrain_balance, t.augment)
        if checkpoints and self.pretraining_resumed is not None:
            pre.load_state_dict(self.pretraining_resumed)
        self.pretraining_resumed = None

        def stop(where: str) -> None:
            raise StopRequested(where, self._pretraining_kept(len(pre.losses), checkpoints))

        self.pretraining = pre if checkpoints else None
        try:
            result = pre.run(lambda: self.run.signals.requested, stop, self.run.save if checkpoints else None)
            if self.run.stop_agreed():  # a signal during the last step: before the minutes of the mixture fit
                stop(f"the end of pre-training (epoch {len(pre.losses)})")
        finally:
            self.pretraining = None
        return result

    @staticmethod
    def _pretraining_kept(epochs_done: int, checkpoints: bool) -> str:
        """Where a run stopped during the initialisation goes on: the newest pre-training checkpoint, or the start."""
        if checkpoints and epochs_done:
            return f"resumes from the checkpoint after pre-training epoch {epochs_done}"
        return "the initialisation starts over when the run is resumed"

    def _initialise_by_trial(self) -> dict:
        """train.init=auto: each candidate initialisation, then train.init_trial_epochs of ordinary training;
        the candidate whose model then has the higher mean ELBO on the validation split (the training split
        when there is none) is kept, as it was right after its initialisation. Labels are never read.

        A stop signal during a trial leaves a checkpoint of the model as it was before any candidate, so
        the resumed run repeats the choice exactly."""
        candidates = ["experts", "pretrain"] if self.model.curve_names else ["pretrain"]
        if len(candidates) == 1:
            return {**self._initialise(candidates[0]), "method": "auto", "chosen": candidates[0],
                    "why": "one modality: there is no curve to seed clusters from"}
        from copy import deepcopy

        from pima_hpc.train.signals import StopRequested
        start = self._snapshot()
        scored, kept = {}, {}
        reader = self.val_data if self.val_data is not None else self.train_data
        for kind in candidates:
            self._restore(start)
            try:
                info = self._initialise(kind, checkpoints=False)
                kept[kind] = (self._snapshot(), info)
                for epoch in range(self.cfg.train.init_trial_epochs):
                    self.state.epoch, self.state.step = epoch, 0
                    self.train_epoch(epoch)
                    self.state.epoch = epoch + 1
                    self.closed_form_updates()
            except StopRequested as stop:  # a signal's checkpoint must hold the model as it was before any candidate
                self._restore(start)
                self.run.save()
                raise StopRequested(stop.where, "the initialisation starts over when the run is resumed") from None
            scored[kind] = self.validation_elbo(reader)
        chosen = max(candidates, key=lambda k: scored[k])
        snapshot, info = kept[chosen]
        self._restore(snapshot)
        split = "validation" if reader is self.val_data else "training"
        why = (f"{split} ELBO per sample after {self.cfg.train.init_trial_epochs} trial epoch(s): " +
               ", ".join(f"{k} {v:.6g}" for k, v in scored.items()))
        if self.run.is_root:
            log.info("train.init=auto chose %s (%s)", chosen, why)
        return {**deepcopy(info), "method": "auto", "chosen": chosen, "why": why, "trial_elbo": scored,
                "candidates": {k: kept[k][1] for k in candidates}}

    def _snapshot(self) -> dict:
        """The model, optimizer and run state, copied (a candidate initialisation is undone from it)."""
        from copy import deepcopy
        return {"model": deepcopy(self.model.state_dict()), "optimizer": deepcopy(self.optimizer.state_dict()),
                "state": deepcopy(self.run.state), "memory": deepcopy(self.curve_memory),
                "streaming": deepcopy(self.streaming)}

    def _restore(self, snap: dict) -> None:
        from copy import deepcopy
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(deepcopy(snap["optimizer"]))
        self.run.state.copy_from(snap["state"])  # in place: the tracker holds the same state
        self.curve_memory = deepcopy(snap["memory"])
        self.streaming = deepcopy(snap["streaming"])

    def closed_form_updates(self, exact: bool = False) -> None:
        """The EM half of Algorithm 1 (eq 16 and optional variances/weights) and eq 17 for the experts.

        During the warm-up the cluster means stay at their initial, well-separated positions. From
        ``warmup_epochs`` on, the M-step is tried: if the latent code alone, p(c|z=mu), then names
        the same cluster as q(c|X) on ``warmup_agreement`` of the training set (an unsupervised
        check that the clusters have formed in latent space) it is kept and the warm-up ends;
        otherwise the means go back to their anchors, at most until ``max_warmup_epochs``.

        With train.statistics=streaming the statistics are those the epoch's training steps gathered,
        unless ``exact`` (the run's last update, so the saved means and experts match its encoders).
        """
        t = self.cfg.train
        m = self.cfg.model
        if m.image_noise == "learned" and self.model.decoded_names:
            em.update_image_noise(self.model, self.train_data, self.eval_batch, self.collective, self.device)
        if self.streaming is not None and not exact:
            self.streaming.sync(self.collective)
            self.streaming.solve_experts(self.model, t.ridge, m.expert_noise, m.expert_noise_floor)
            latent = self.streaming.latent
        else:
            latent, curves = em.em_pass(self.model, self.train_data, self.eval_batch, self.collective, self.device,
                                        self.curve_memory, t.rls_forgetting)
            for name, st in curves.items():
                self.model.solve_expert(name, st, t.ridge, m.expert_noise, m.expert_noise_floor)
            self.curve_memory = curves if t.rls_forgetting > 0 else None
        epoch = self.state.epoch
        if self.state.warm and epoch < t.warmup_epochs:
            return
        anchors = {k: v.detach().clone() for k, v in self.model.state_dict().items()
                   if k in ("cluster_means", "cluster_logvars", "cluster_scale_tril", "pi_logits")}
        self.model.m_step(latent, t.em_variances, t.em_weights, t.tied_variances)
        if self.state.warm:
            agreement = em.agreement(self.model, self.train_data, self.eval_batch, self.collective, self.device)
            self.state.agreement.append(agreement)
            if agreement >= t.warmup_agreement or epoch >= t.max_warmup_epochs:
                self.state.warm = False
            else:
                self.model.load_state_dict(anchors, strict=False)

    def train_epoch(self, epoch: int) -> dict:
        t, w = self.cfg.train, self.cfg.loss
        warm = self.state.warm
        self.model.train()
        batches = self.train_data.batch_index_lists(t.batch_size, epoch, self.cfg.seed, shuffle=True)
        counts = self.train_data.global_counts(t.batch_size)
        if t.max_steps_per_epoch:  # every rank plans the same number of steps, so all stop together
            batches = batches[:t.max_steps_per_epoch]
        # A resume mid-epoch (from a signal's checkpoint) continues the epoch's sums: exact metrics.
        sums = self.run.resume_partial()
        seen = int(sums.pop("_seen", 0))
        bar = self.run.progress(len(batches), f"epoch {epoch + 1}/{t.epochs}")
        start = self.state.step
        bar.update(start)
        if self.streaming is not None and start == 0:
            self.streaming.start_epoch()
        moves = epoch_moves(t.augment, self.train_data.num_global, self.cfg.seed, epoch, TRAIN_STREAM)
        loader = batch_loader(self.train_data, batches[start:], self.cfg.data.num_workers)
        for step, batch in enumerate(loader, start):
            batch = to_device(batch, self.device)
            seen += len(batches[step])
            gen = torch.Generator().manual_seed(step_seed(self.cfg.seed, 0, epoch, step, self.ctx.rank))
            # Warm-up with the paper's p(c|z) needs the experts' opinion (eq 19): untrained encoders
            # carry no cluster information yet. The joint q(c) already includes it.
            use_experts = warm and self.cfg.model.cluster_posterior == "latent" and self.model.curve_names
            q_c = self.model.expert_log_posterior(batch).exp().detach() if use_experts else None
            # train.augment: the encoders see moved images, the ELBO scores the stored ones (pima_hpc/train/augment.py)
            encoded = moved_batch(batch, self.model.image_names, batches[step], moves)
            with autocast(t.precision, self.device):
                out = self.net(batch, gen, q_c, return_codes=self.streaming is not None, seen=encoded)
            if self.streaming is not None:
                terms, mu, logvar = out
                self.streaming.add(self.model, batch, mu, logvar)
            else:
                terms = out
            if self.nan_at_step == epoch * len(batches) + step + 1:
                terms = {**terms, "recon": terms["recon"] * float("nan")}
            per_sample = elbo_from_terms(terms, w.recon_weight, w.expert_weight, w.prior_weight)
            # Sum over this rank's samples / global count, times world size: DDP's gradient average
            # then equals the gradient of the per-sample mean over the global batch.
            loss = -per_sample.sum() * (self.ctx.world_size / float(counts[step]))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.state.step = step + 1
            with torch.no_grad():
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.sum())
                sums["elbo"] = sums.get("elbo", 0.0) + float(per_sample.sum())
            self.run.keep_partial({**sums, "_seen": seen})
            self.run.check_finite(terms, loss, f"stage multimodal, epoch {epoch + 1}, step {step + 1}")
            if self.streaming is not None and self.streaming.due(step, len(batches)):
                self.streaming.sync(self.collective)
                self.streaming.solve_experts(self.model, t.ridge, self.cfg.model.expert_noise,
                                             self.cfg.model.expert_noise_floor)
            bar.update(1)
            if not bar.disable and step % t.log_every == 0:
                bar.set_postfix(loss=f"{float(loss.detach()) / self.ctx.world_size:.3f}")
        bar.close()
        self.run.recompute_batchnorm(self.model, self._multimodal_forward, t.precise_bn_batches, t.batch_size,
                                     epoch)
        self.state.partial_sums = None
        keys = sorted(sums)
        # Means over the samples this epoch actually visited (a step cap or a resume visits fewer).
        totals = self.collective.allreduce_sum([np.array([sums.get(k, 0.0) for k in keys] + [seen])])[0]
        return {f"train_{k}": float(v / totals[-1]) for k, v in zip(keys, totals[:-1])}

    @torch.no_grad()
    def validation_elbo(self, reader) -> float:
        """Mean per-sample ELBO on a split with fixed noise draws (the unsupervised selection metric)."""
        self.model.eval()
        total = 0.0
        for i, idx in enumerate(reader.batch_index_lists(self.eval_batch, shuffle=False)):
            batch = to_device(reader.read_batch(idx), self.device)
            gen = torch.Generator().manual_seed(step_seed(self.cfg.seed, 99, i, self.ctx.rank))
            total += float(elbo_from_terms(self.model(batch, gen)).sum())
        s = self.collective.allreduce_sum([np.array([total, len(reader)])])[0]
        self.model.train()
        return float(s[0] / s[1])

    def fit(self) -> None:
        """Initialise once, then train epochs until train.epochs; hand over to the next stage."""
        t = self.cfg.train
        if not self.state.initialized:
            self.initialise()
            self.run.save()
        while self.state.stage == "multimodal" and self.state.epoch < t.epochs:
            epoch = self.state.epoch
            tic = time.perf_counter()
            metrics = self.train_epoch(epoch)
            self.state.epoch, self.state.step = epoch + 1, 0
            last = epoch + 1 == t.epochs
            if last:
                # The final pass ends any warm-up: the saved means and experts match the encoders.
                self.state.warm = False
            self.closed_form_updates(exact=last)
            metrics["epoch"] = epoch + 1
            metrics["seconds"] = time.perf_counter() - tic
            # Validation on the model as it will be used: means and experts re-estimated by EM first
            # (measured against the means of the epoch's start, accuracy read 86 % where it was 99 %).
            if self.val_data is not None:
                metrics["val_elbo"] = self.validation_elbo(self.val_data)
                if self.val_data.labels() is not None and self.spec.label_names:
                    metrics["val_accuracy"] = self.run.evaluator.accuracy(self.val_data)
            self.state.history.append(metrics)
            best = metrics.get("val_elbo", -math.inf) > self.state.best_val_elbo
            if best:
                self.state.best_val_elbo = metrics["val_elbo"]
            if (epoch + 1) % t.checkpoint_every == 0 or epoch + 1 == t.epochs:
                self.run.save(best=best)
            self.run.epoch_done("multimodal", "epoch", epoch + 1, t.epochs, metrics)
        if self.state.stage == "multimodal":
            if t.epochs == 0:  # no epoch ran its closed-form pass: make the experts match the data
                self.state.warm = False
                self.closed_form_updates(exact=True)
            self.state.stage = "crossmodal" if "crossmodal" in self.run.stages else "done"
            self.state.epoch, self.state.step = 0, 0
            self.run.save()
