"""One trainer for one process or many: Algorithm 1 (streaming EM + Adam), then Section 2.4.

Per epoch: an EM pass in eval mode sets the cluster means (and optionally variances and
weights) and solves the experts' least squares (eq 17); then Adam runs over this rank's batches
on the rest. During the warm-up the cluster means stay at their physics-ordered anchors, which
pulls every sample's latent code to the cluster its physics says it belongs to, until the latent
code alone agrees with q(c|X) (see closed_form_updates and docs/method.md). With the paper's
q(c) = p(c|z) (model.cluster_posterior=latent) the warm-up takes q(c) from the experts (eq 19).

Distribution enters only through ``ctx`` (:class:`pima_hpc.runtime.Context`: rank, world size,
device, the collective, and its DDP wrapping of the networks); every loss is a per-sample mean
over the GLOBAL batch, so the learning rate does not depend on batch size or rank count.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pima_hpc.config import Config, ConfigError, config_hash, save_config, to_dict
from pima_hpc.data.base import spec_to_dict
from pima_hpc.errors import NonFiniteError, ResumeError
from pima_hpc.evaluation.evaluate import Evaluator
from pima_hpc.model.elbo import cluster_distillation, crossmodal_kl
from pima_hpc.model.pima import PIMA, CrossModalEncoders, elbo_from_terms
from pima_hpc.runtime import Context, to_device
from pima_hpc.train import em
from pima_hpc.train.amplitude import fit_amplitude_models
from pima_hpc.train.batchnorm import broadcast_batchnorm_stats, precise_batchnorm
from pima_hpc.train.checkpoint import CheckpointManager, atomic_write_text
from pima_hpc.train.signals import SignalFlag, StopRequested
from pima_hpc.train.splits import has_split, open_run_split
from pima_hpc.train.state import changed_keys, rng_state, set_rng_state

log = logging.getLogger("pima")

def _step_seed(*parts: int) -> int:
    # A generator per (seed, stage, epoch, step, rank): exact resume needs no RNG state for the noise.
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _injected_nan_step() -> int | None:
    """Test hook (tests/test_faults.py, docs/reliability.md): ``PIMA_FAULT_INJECT=nan_at_step:N`` turns
    the ``recon`` term to NaN at multimodal step N, counted from 1 over the whole run
    (``epoch * steps_per_epoch + step + 1``), on every rank. The only place the variable is read."""
    spec = os.environ.get("PIMA_FAULT_INJECT", "")
    if not spec:
        return None
    kind, _, n = spec.partition(":")
    if kind != "nan_at_step" or not n.isdigit() or int(n) < 1:
        raise ConfigError(f"PIMA_FAULT_INJECT={spec!r}: expected nan_at_step:N with N >= 1 (or unset it)")
    return int(n)


class Trainer:
    def __init__(self, cfg: Config, ctx: Context | None = None, report=None):
        """``ctx`` is the run context (one process by default; it wraps the networks in DDP when
        distributed); ``report(stage, epoch, metrics)`` is called on every rank after each epoch
        (Ray Tune hooks in here).
        """
        self.cfg = cfg
        self.ctx = ctx or Context()
        self.collective = self.ctx.collective
        self.device = self.ctx.device
        self.report = report
        self.run_dir = Path(cfg.run_dir)
        # Passes without gradients (EM, evaluation, statistics) hold no activations for backward,
        # so four training batches fit in the memory one training step needs.
        self.eval_batch = cfg.train.batch_size * 4
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)

        rank, world = self.ctx.rank, self.ctx.world_size
        self.train_data = open_run_split(cfg.data, "train", rank, world)
        self.val_data = open_run_split(cfg.data, "val", rank, world) if has_split(cfg.data, "val") else None
        self.test_data = open_run_split(cfg.data, "test", rank, world) if has_split(cfg.data, "test") else None
        self.spec = self.train_data.spec
        self.stages = list(cfg.stages)
        if len(self.spec.names) == 1 and "crossmodal" in self.stages:
            # one modality: its cross-modal encoder would be the multimodal one again
            log.info("one modality (%s): PIMA without fusion; the cross-modal stage is skipped", self.spec.names[0])
            self.stages.remove("crossmodal")
        if not self.stages:
            raise ConfigError("config key 'stages': with one modality only the multimodal stage exists; "
                              "set stages=[multimodal]")

        self.model = PIMA(self.spec, cfg.model).to(self.device)
        if cfg.train.sync_batchnorm and world > 1:
            if self.device.type != "cuda":
                # torch's SyncBatchNorm raises on CPU tensors, and only at the first training step.
                raise ConfigError("config key 'train.sync_batchnorm': torch's SyncBatchNorm needs CUDA devices; "
                                  "on CPU set train.sync_batchnorm=false (BatchNorm then uses each rank's "
                                  "batch statistics and rank 0's running statistics, see docs/distributed.md)")
            self.model.encoders = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model.encoders)
            self.model.decoders = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model.decoders)
        # Closed-form EM replaces Adam for whatever it sets (otherwise the two would fight).
        self.model.cluster_logvars.requires_grad_(not cfg.train.em_variances)
        self.model.pi_logits.requires_grad_(not cfg.train.em_weights)
        self.net = self.ctx.wrap_ddp(self.model)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad],
                                          lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.crossmodal = None
        self.xm_optimizer = None
        self.curve_memory = None
        self.streaming = self._streaming_statistics()
        self._streaming_rows = None  # every rank's pending streaming sums, gathered for a mid-epoch checkpoint
        self.ckpt = CheckpointManager(self.run_dir, cfg.train.keep_checkpoints)
        self.state = {"stage": "multimodal", "epoch": 0, "step": 0, "initialized": False, "warm": True,
                      "history": [], "best_val_elbo": -math.inf, "init": {}}
        self.signals = SignalFlag()
        self.nan_at_step = _injected_nan_step()
        self.tracker = None  # rank 0's history.csv / TensorBoard / MLflow, opened by run()

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

    # ----- bookkeeping -------------------------------------------------------------------------
    @property
    def is_root(self) -> bool:
        return self.ctx.rank == 0

    def _progress(self, total, desc):
        from tqdm.auto import tqdm
        show = self.cfg.train.progress
        if show is None:  # a bar redrawn into a redirected log only floods it
            show = sys.stderr.isatty()
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not (self.is_root and show))

    def _payload(self) -> dict:
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": json.loads(json.dumps(self.state)),
            "config_hash": config_hash(self.cfg),
            "config": {k: v for k, v in to_dict(self.cfg).items() if k in ("data", "model")},  # names a mismatch
            "rng": rng_state(),
            "spec": spec_to_dict(self.spec),  # `pima predict` needs units and normalisation, not the data
            "curve_memory": ({n: {k: torch.from_numpy(v) for k, v in st.values.items()}
                              for n, st in self.curve_memory.items()} if self.curve_memory else None),
            "streaming": self.streaming.state(self._streaming_rows) if self.streaming is not None else None,
        }
        if self.crossmodal is not None:
            payload["crossmodal"] = self.crossmodal.state_dict()
            payload["xm_optimizer"] = self.xm_optimizer.state_dict()
        return payload

    def save(self, best: bool = False) -> None:
        s = self.state
        name = f"ckpt-{s['stage']}-e{s['epoch']:04d}-s{s['step']:06d}"
        # Never write a checkpoint a resume would choke on: non-finite weights stop the run instead.
        bad = [f"{m}.{k}" for m, module in (("model", self.model), ("crossmodal", self.crossmodal))
               if module is not None for k, v in module.state_dict().items()
               if v.is_floating_point() and not torch.isfinite(v).all()]
        if self._agree([float(bool(bad))])[0] > 0:
            raise NonFiniteError(f"non-finite parameters ({', '.join(bad[:4]) or 'on another rank'}) at {name}; "
                                 f"not saved, the last good checkpoint in {self.run_dir / 'checkpoints'} is kept; "
                                 "lower train.lr or check the data for NaN/Inf")
        self._streaming_rows = None
        if self.streaming is not None and self.streaming.pending:  # mid-epoch: every rank's pending sums
            rows = np.zeros((self.ctx.world_size, len(self.streaming.pending_vector())))
            rows[self.ctx.rank] = self.streaming.pending_vector()
            self._streaming_rows = self.collective.allreduce_sum([rows])[0] if self.ctx.world_size > 1 else rows
        partial = self.state.get("partial_sums")
        if partial is not None:  # mid-epoch (a signal): rank 0 writes every rank's running sums
            rows = np.zeros((self.ctx.world_size, len(partial["values"])))
            rows[self.ctx.rank] = partial["values"]
            rows = self.collective.allreduce_sum([rows])[0] if self.ctx.world_size > 1 else rows
            partial["per_rank"] = rows.tolist()
        if self.is_root:
            self.ckpt.save(self._payload(), name, best)
        self.collective.barrier()

    def _keep_partial(self, sums: dict[str, float]) -> None:
        """Record this rank's running sums of the epoch after each step, for a checkpoint mid-epoch."""
        self.state["partial_sums"] = {"keys": list(sums), "values": [float(v) for v in sums.values()]}

    def _resume_partial(self) -> dict[str, float]:
        """This rank's running sums of an epoch resumed mid-way ({} at an epoch start), so the
        epoch's metrics come out as if it had never stopped."""
        partial = self.state.pop("partial_sums", None) if self.state["step"] else None
        if not partial or "per_rank" not in partial:
            return {}
        rows = partial["per_rank"]
        if len(rows) != self.ctx.world_size:
            log.warning("resumed mid-epoch on %d ranks, checkpointed on %d: this epoch's train metrics cover "
                        "only its remaining steps", self.ctx.world_size, len(rows))
            return {}
        return dict(zip(partial["keys"], rows[self.ctx.rank]))

    def try_resume(self) -> bool:
        """Continue from the run directory's newest good checkpoint, if it has one."""
        found = self.ckpt.load_latest() if self.ckpt.exists() else None
        if found is None:
            return False
        payload, path = found
        if payload.get("config_hash") != config_hash(self.cfg):
            changed = changed_keys(payload.get("config"), to_dict(self.cfg))
            raise ResumeError(f"run directory {str(self.run_dir)!r} holds a checkpoint ({path.name}) of a different "
                              f"model or data config{' (' + changed + ')' if changed else ''}; use a new run_dir, "
                              "or restore those settings (the run's config.yaml has them)")
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.state = payload["state"]
            set_rng_state(payload["rng"])
            if "crossmodal" in payload:
                self._build_crossmodal()
                self.crossmodal.load_state_dict(payload["crossmodal"])
                self.xm_optimizer.load_state_dict(payload["xm_optimizer"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:  # e.g. written by another pima-hpc version
            raise ResumeError(f"checkpoint {str(path)!r} does not fit this model ({type(exc).__name__}: "
                              f"{(str(exc).splitlines() or [''])[0][:160]}); use a new run_dir") from None
        if payload.get("streaming") and self.streaming is not None:
            if not self.streaming.load_state(payload["streaming"], self.ctx.rank, self.ctx.world_size):
                log.warning("resumed mid-epoch on %d ranks, checkpointed on another number: the streaming "
                            "statistics are summed into the totals (equal up to rounding)", self.ctx.world_size)
        if payload.get("curve_memory"):
            self.curve_memory = em.new_curve_statistics(self.model)
            for n, vals in payload["curve_memory"].items():
                self.curve_memory[n].set_arrays([v.numpy() for v in vals.values()])
        log.info("resumed from %s (stage %s, epoch %d, step %d)", path, self.state["stage"],
                 self.state["epoch"], self.state["step"])
        return True

    def _agree(self, flags: list[float]) -> np.ndarray:
        """Combine per-rank flags (stop request, non-finite) so every rank takes the same branch."""
        if self.ctx.world_size == 1:
            return np.asarray(flags, dtype=np.float64)
        return self.collective.allreduce_sum([np.asarray(flags, dtype=np.float64)])[0]

    def _recompute_batchnorm(self, module, forward, n_batches: int, batch_size: int, epoch: int) -> None:
        """End of an epoch: precise BatchNorm statistics from ``n_batches`` fixed training batches, or
        (n_batches = 0) torch's running averages made identical on every rank."""
        if n_batches == 0:
            broadcast_batchnorm_stats(module, self.collective)
            return
        batches = self.train_data.batch_index_lists(batch_size, epoch, self.cfg.seed + 11)[:n_batches]
        precise_batchnorm(module, forward, batches, self.collective)

    @torch.no_grad()
    def _multimodal_forward(self, idx) -> None:
        gen = torch.Generator().manual_seed(_step_seed(self.cfg.seed, 11, int(idx[0]), self.ctx.rank))
        self.model(to_device(self.train_data.read_batch(idx), self.device), gen)

    # ----- the multimodal stage ----------------------------------------------------------------
    def _check_expert_fit(self, max_curves: int = 2000) -> dict:
        """Median per-sample R^2 of the chosen expert on (up to) ``max_curves`` of this rank's training
        curves; rank 0 warns when the law cannot describe them (pima_hpc/model/fit_quality.py)."""
        from pima_hpc.model.fit_quality import POOR_MEDIAN_R2, per_sample_r2
        reader = self.train_data
        take = np.linspace(0, len(reader) - 1, min(max_curves, len(reader))).astype(int)
        batch = reader.read_batch(reader.indices[take])
        out = {}
        for name in self.model.curve_names:
            x = self.spec[name].to_physical(batch[name].double().numpy())
            median = float(np.median(per_sample_r2(self.model.experts[name], x)))
            out[name] = median
            if self.is_root and median < POOR_MEDIAN_R2:
                log.warning("model.expert=%s fits the curves of modality %r poorly (median per-sample R^2 %.3f on %d "
                            "training curves): compare experts with `pima data fit-experts DATA`, or use model.expert=free",
                            self.cfg.model.expert, name, median, len(x))
        return out

    def initialise(self) -> None:
        if self.model.curve_names:
            self._check_expert_fit()
        bs = self.eval_batch
        if self.cfg.train.init == "experts" and self.model.curve_names:
            info = em.initialise_from_experts(self.model, self.train_data, bs, self.collective, self.device,
                                              self.cfg.seed)
        elif self.cfg.train.init == "pretrain":
            from pima_hpc.train.pretrain import fit_latent_mixture, pretrain_autoencoder
            t = self.cfg.train
            losses = pretrain_autoencoder(self.model, self.train_data, self.ctx, t.pretrain_epochs, t.batch_size,
                                          t.lr, self.cfg.seed)
            info = {"pretrain_losses": losses,
                    **fit_latent_mixture(self.model, self.train_data, bs, self.collective, self.device, self.cfg.seed)}
            latent, curves = em.em_pass(self.model, self.train_data, bs, self.collective, self.device)
            if curves:  # the experts from the mixture's responsibilities (eq 17)
                em.apply_expert_solve(self.model, curves, t.ridge, self.cfg.model.expert_noise,
                                      self.cfg.model.expert_noise_floor)
        else:
            latent, curves = em.em_pass(self.model, self.train_data, bs, self.collective, self.device)
            if curves:
                em.apply_expert_solve(self.model, curves, self.cfg.train.ridge, self.cfg.model.expert_noise,
                                      self.cfg.model.expert_noise_floor)
            info = {}
        if self.cfg.model.image_noise == "learned" and self.model.image_names:
            info["image_noise_std"] = em.update_image_noise(self.model, self.train_data, bs, self.collective,
                                                            self.device)
        self.state["initialized"] = True
        self.state["init"] = info

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
        if m.image_noise == "learned" and self.model.image_names:
            em.update_image_noise(self.model, self.train_data, self.eval_batch, self.collective, self.device)
        if self.streaming is not None and not exact:
            self.streaming.sync(self.collective)
            self.streaming.solve_experts(self.model, t.ridge, m.expert_noise, m.expert_noise_floor)
            latent = self.streaming.latent
        else:
            latent, curves = em.em_pass(self.model, self.train_data, self.eval_batch, self.collective, self.device,
                                        self.curve_memory, t.rls_forgetting)
            em.apply_expert_solve(self.model, curves, t.ridge, m.expert_noise, m.expert_noise_floor)
            self.curve_memory = curves if t.rls_forgetting > 0 else None
        epoch = self.state["epoch"]
        if self.state["warm"] and epoch < t.warmup_epochs:
            return
        anchors = {k: v.detach().clone() for k, v in self.model.state_dict().items()
                   if k in ("cluster_means", "cluster_logvars", "pi_logits")}
        em.apply_gmm_m_step(self.model, latent, t.em_variances, t.em_weights, t.tied_variances)
        if self.state["warm"]:
            agreement = em.agreement(self.model, self.train_data, self.eval_batch, self.collective, self.device)
            self.state.setdefault("agreement", []).append(agreement)
            if agreement >= t.warmup_agreement or epoch >= t.max_warmup_epochs:
                self.state["warm"] = False
            else:
                self.model.load_state_dict(anchors, strict=False)

    def _epoch_done(self, stage: str, label: str, epoch: int, total: int, metrics: dict) -> None:
        """Log an epoch's metrics (rank 0) and hand them to the report hook (every rank)."""
        if self.is_root:
            log.info("%s %d/%d  %s", label, epoch, total,
                     "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
            if self.tracker is not None:
                self.tracker.epoch(self.state["history"])
        if self.report:
            self.report(stage, epoch, metrics)

    def _clip(self, module) -> None:
        params = list(module.parameters())
        if self.cfg.crossmodal.grad_clip > 0 and params:  # a part may be empty (no cluster or amplitude heads)
            torch.nn.utils.clip_grad_norm_(params, self.cfg.crossmodal.grad_clip)

    def _check_finite(self, terms: dict, loss: torch.Tensor, where: str) -> None:
        bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
        if not torch.isfinite(loss):
            bad.append("loss")
        flag = self._agree([self.signals.requested, float(bool(bad))])
        if flag[1] > 0:
            raise NonFiniteError(f"non-finite values at {where} (terms: {', '.join(bad) or 'on another rank'}); "
                                 f"the last good checkpoint in {self.run_dir / 'checkpoints'} is kept; "
                                 "lower train.lr or check the data for NaN/Inf")
        if flag[0] > 0:
            self.save()
            raise StopRequested(where)

    def train_epoch(self, epoch: int) -> dict:
        t, w = self.cfg.train, self.cfg.loss
        warm = self.state["warm"]
        self.model.train()
        batches = self.train_data.batch_index_lists(t.batch_size, epoch, self.cfg.seed, shuffle=True)
        counts = self.train_data.global_counts(t.batch_size)
        if t.max_steps_per_epoch:  # every rank plans the same number of steps, so all stop together
            batches = batches[:t.max_steps_per_epoch]
        # A resume mid-epoch (from a signal's checkpoint) continues the epoch's sums: exact metrics.
        sums = self._resume_partial()
        seen = int(sums.pop("_seen", 0))
        bar = self._progress(len(batches), f"epoch {epoch + 1}/{t.epochs}")
        start = self.state["step"]
        bar.update(start)
        if self.streaming is not None and start == 0:
            self.streaming.start_epoch()
        for step in range(start, len(batches)):
            batch = to_device(self.train_data.read_batch(batches[step]), self.device)
            seen += len(batches[step])
            gen = torch.Generator().manual_seed(_step_seed(self.cfg.seed, 0, epoch, step, self.ctx.rank))
            # Warm-up with the paper's p(c|z) needs the experts' opinion (eq 19): untrained encoders
            # carry no cluster information yet. The joint q(c) already includes it.
            use_experts = warm and self.cfg.model.cluster_posterior == "latent" and self.model.curve_names
            q_c = self.model.expert_log_posterior(batch).exp().detach() if use_experts else None
            if self.streaming is not None:
                terms, mu, logvar = self.net(batch, gen, q_c, return_codes=True)
                self.streaming.add(self.model, batch, mu, logvar)
            else:
                terms = self.net(batch, gen, q_c)
            if self.nan_at_step == epoch * len(batches) + step + 1:
                terms = {**terms, "recon": terms["recon"] * float("nan")}
            per_sample = elbo_from_terms(terms, w.recon_weight, w.expert_weight, w.prior_weight)
            # Sum over this rank's samples / global count, times world size: DDP's gradient average
            # then equals the gradient of the per-sample mean over the global batch.
            loss = -per_sample.sum() * (self.ctx.world_size / float(counts[step]))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.state["step"] = step + 1
            with torch.no_grad():
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.sum())
                sums["elbo"] = sums.get("elbo", 0.0) + float(per_sample.sum())
            self._keep_partial({**sums, "_seen": seen})
            self._check_finite(terms, loss, f"stage multimodal, epoch {epoch + 1}, step {step + 1}")
            if self.streaming is not None and self.streaming.due(step, len(batches)):
                self.streaming.sync(self.collective)
                self.streaming.solve_experts(self.model, t.ridge, self.cfg.model.expert_noise,
                                             self.cfg.model.expert_noise_floor)
            bar.update(1)
            if not bar.disable and step % t.log_every == 0:
                bar.set_postfix(loss=f"{float(loss.detach()) / self.ctx.world_size:.3f}")
        bar.close()
        self._recompute_batchnorm(self.model, self._multimodal_forward, t.precise_bn_batches, t.batch_size, epoch)
        self.state.pop("partial_sums", None)
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
            gen = torch.Generator().manual_seed(_step_seed(self.cfg.seed, 99, i, self.ctx.rank))
            total += float(elbo_from_terms(self.model(batch, gen)).sum())
        s = self.collective.allreduce_sum([np.array([total, len(reader)])])[0]
        self.model.train()
        return float(s[0] / s[1])

    def fit_multimodal(self) -> None:
        t = self.cfg.train
        if not self.state["initialized"]:
            self.initialise()
            self.save()
        while self.state["stage"] == "multimodal" and self.state["epoch"] < t.epochs:
            epoch = self.state["epoch"]
            tic = time.perf_counter()
            metrics = self.train_epoch(epoch)
            self.state["epoch"], self.state["step"] = epoch + 1, 0
            last = epoch + 1 == t.epochs
            if last:
                # The final pass ends any warm-up: the saved means and experts match the encoders.
                self.state["warm"] = False
            self.closed_form_updates(exact=last)
            metrics["epoch"] = epoch + 1
            metrics["seconds"] = time.perf_counter() - tic
            # Validation on the model as it will be used: means and experts re-estimated by EM first
            # (measured against the means of the epoch's start, accuracy read 86 % where it was 99 %).
            if self.val_data is not None:
                metrics["val_elbo"] = self.validation_elbo(self.val_data)
                if self.val_data.labels() is not None and self.spec.label_names:
                    metrics["val_accuracy"] = self.evaluator.accuracy(self.val_data)
            self.state["history"].append(metrics)
            best = metrics.get("val_elbo", -math.inf) > self.state["best_val_elbo"]
            if best:
                self.state["best_val_elbo"] = metrics["val_elbo"]
            if (epoch + 1) % t.checkpoint_every == 0 or epoch + 1 == t.epochs:
                self.save(best=best)
            self._epoch_done("multimodal", "epoch", epoch + 1, t.epochs, metrics)
        if self.state["stage"] == "multimodal":
            if t.epochs == 0:  # no epoch ran its closed-form pass: make the experts match the data
                self.state["warm"] = False
                self.closed_form_updates(exact=True)
            self.state["stage"] = "crossmodal" if "crossmodal" in self.stages else "done"
            self.state["epoch"], self.state["step"] = 0, 0
            self.save()

    # ----- evaluation --------------------------------------------------------------------------
    @property
    def evaluator(self) -> Evaluator:
        """Read-outs and scores of the model as it is now (pima_hpc.evaluation.evaluate)."""
        return Evaluator(self.model, self.crossmodal, {"train": self.train_data, "val": self.val_data,
                                                       "test": self.test_data},
                         self.collective, self.device, self.eval_batch, self.cfg.seed)

    def evaluate(self) -> dict:
        return self.evaluator.metrics()

    # ----- the cross-modal stage (Section 2.4, eq 18) ------------------------------------------
    def _build_crossmodal(self) -> None:
        torch.manual_seed(self.cfg.seed + 1)
        self.crossmodal = CrossModalEncoders(self.spec, self.cfg.model, self.cfg.crossmodal.cluster_head).to(self.device)
        if self.cfg.train.sync_batchnorm and self.ctx.world_size > 1:  # CUDA only, checked in __init__
            self.crossmodal = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.crossmodal)
        self.xm_net = self.ctx.wrap_ddp(self.crossmodal)
        self.xm_optimizer = torch.optim.Adam(self.crossmodal.parameters(), lr=self.cfg.crossmodal.lr)

    def _crossmodal_forward(self, idx) -> None:
        batch = to_device(self.train_data.read_batch(idx), self.device)
        for name in self.spec.names:
            self.crossmodal(name, batch[name])
            if name in self.crossmodal.classifiers:
                self.crossmodal.classifiers[name](batch[name])

    def fit_crossmodal(self) -> None:
        x = self.cfg.crossmodal
        if self.crossmodal is None:
            self._build_crossmodal()
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        while self.state["stage"] == "crossmodal" and self.state["epoch"] < x.epochs:
            epoch = self.state["epoch"]
            tic = time.perf_counter()
            self.crossmodal.train()
            batches = self.train_data.batch_index_lists(x.batch_size, epoch, self.cfg.seed + 7, shuffle=True)
            counts = self.train_data.global_counts(x.batch_size)
            bar = self._progress(len(batches), f"cross-modal {epoch + 1}/{x.epochs}")
            partial = self._resume_partial()
            keys = [f"{term}_{n}" for term in ("kl", "distill") for n in self.spec.names
                    if term == "kl" or n in self.crossmodal.classifiers]
            sums = np.array([partial.get(k, 0.0) for k in keys])
            for step in range(self.state["step"], len(batches)):
                batch = to_device(self.train_data.read_batch(batches[step]), self.device)
                with torch.no_grad():
                    mu, logvar = self.model.encode(batch)
                    # the heads' teacher: the multimodal model's own q(c | X) at z = mu (with the
                    # default joint posterior it counts the experts' likelihoods too)
                    log_gamma = self.model.cluster_log_posterior(batch, mu, logvar, mu)
                # The networks' losses are independent, so one Adam over all of them equals the
                # paper's sequential per-modality training, with one pass over the data.
                terms = {f"kl_{n}": crossmodal_kl(mu, logvar, *self.xm_net(n, batch[n])) for n in self.spec.names}
                terms.update({f"distill_{n}": cluster_distillation(log_gamma, head(batch[n]))
                              for n, head in self.crossmodal.classifiers.items()})
                loss = sum(t.sum() for t in terms.values()) * (self.ctx.world_size / float(counts[step]))
                self.xm_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # clipped apart, so that a big eq-18 step does not shrink the cluster heads' steps
                for part in (self.crossmodal.encoders, self.crossmodal.classifiers):
                    self._clip(part)
                self.xm_optimizer.step()
                self.state["step"] = step + 1
                sums += [float(terms[k].detach().sum()) for k in keys]
                self._keep_partial(dict(zip(keys, sums)))
                self._check_finite(terms, loss, f"stage crossmodal, epoch {epoch + 1}, step {step + 1}")
                bar.update(1)
            bar.close()
            self._recompute_batchnorm(self.crossmodal, self._crossmodal_forward, x.precise_bn_batches,
                                      x.batch_size, epoch)
            amplitude = fit_amplitude_models(self.model, self.crossmodal, self.train_data, self.eval_batch,
                                             self.collective, self.device)
            self.state.pop("partial_sums", None)
            tot = self.collective.allreduce_sum([np.append(sums, len(self.train_data))])[0]
            metrics = {k: float(v / tot[-1]) for k, v in zip(keys, tot[:-1])}
            metrics.update(amplitude)
            metrics.update(epoch=epoch + 1, seconds=time.perf_counter() - tic)
            self.state["history"].append({"stage": "crossmodal", **metrics})
            self.state["epoch"], self.state["step"] = epoch + 1, 0
            self.save()
            self._epoch_done("crossmodal", "cross-modal epoch", epoch + 1, x.epochs, metrics)
        if self.state["stage"] == "crossmodal":
            self.state["stage"] = "done"
            self.save()

    # ----- the whole run -----------------------------------------------------------------------
    def _check_finished_run(self) -> None:
        """A finished run (stage "done") is final. Running it again only re-evaluates it (as needed
        after a kill between its last checkpoint and metrics.json), and adding the cross-modal stage
        trains that stage; asking for more epochs than it trained is an error, because its final
        closed-form pass has run and training on would not give what a longer run gives."""
        if self.state["stage"] != "done":
            return
        history = self.state["history"]
        trained = {"multimodal": sum("stage" not in h for h in history),
                   "crossmodal": sum(h.get("stage") == "crossmodal" for h in history)}
        asked = {"multimodal": ("train.epochs", self.cfg.train.epochs),
                 "crossmodal": ("crossmodal.epochs", self.cfg.crossmodal.epochs)}
        more = [f"{asked[s][0]}={asked[s][1]} but it trained {trained[s]}" for s in self.stages
                if asked[s][1] > trained[s] and (s == "multimodal" or self.crossmodal is not None)]
        if more:
            raise ResumeError(f"run directory {str(self.run_dir)!r} holds a finished run ({'; '.join(more)}); "
                              "a finished run is not extended: use a new run_dir, or ask for at most the "
                              "epochs it trained to re-evaluate it")
        if not ("crossmodal" in self.stages and self.crossmodal is None):
            log.info("run directory %s holds a finished run: evaluating it again", self.run_dir)

    def run(self) -> dict:
        """Train the configured stages (resuming if the run directory has a checkpoint) and evaluate."""
        tic = time.perf_counter()
        # Resume (or refuse to) before writing anything: a refused config must not overwrite the
        # config.yaml that describes the checkpoints already there.
        self.try_resume()
        self._check_finished_run()
        problem = None
        if self.is_root:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                save_config(self.cfg, self.run_dir / "config.yaml")
            except OSError as exc:
                problem = f"cannot write to {str(self.run_dir)!r} ({exc.strerror or exc})"
        if self._agree([float(problem is not None)])[0] > 0:  # also the barrier: every rank stops together
            raise ConfigError(f"config key 'run_dir': {problem or 'rank 0 cannot write to it'}; "
                              "choose a writable directory")
        if self.is_root:
            from pima_hpc.train.tracking import Tracker
            self.tracker = Tracker(self.cfg, self.run_dir, self.state)
        self.signals.install()
        try:
            if "multimodal" in self.stages and self.state["stage"] == "multimodal":
                self.fit_multimodal()
            elif self.state["stage"] == "multimodal":
                raise ResumeError(f"stage 'crossmodal' needs a trained multimodal model in {str(self.run_dir)!r}; "
                                  "run with stages=[multimodal,crossmodal] first")
            if "crossmodal" in self.stages and self.state["stage"] in ("crossmodal", "done"):
                if self.state["stage"] == "done" and self.crossmodal is None:
                    self.state["stage"], self.state["epoch"], self.state["step"] = "crossmodal", 0, 0
                self.fit_crossmodal()
        finally:
            self.signals.uninstall()
        metrics = self.evaluate()
        metrics["history"] = self.state["history"]
        metrics["init"] = self.state["init"]
        metrics["wall_seconds_this_process"] = time.perf_counter() - tic
        metrics["world_size"] = self.ctx.world_size
        if self.is_root:
            from pima_hpc.evaluation.baselines import below_baselines
            for warning in below_baselines(metrics):
                log.warning("%s: that modality alone already finds these clusters (labels used for scoring only)", warning)
            atomic_write_text(self.run_dir / "metrics.json", json.dumps(metrics, indent=1))
            figures = []
            if self.cfg.figures:
                from pima_hpc.evaluation.figures import write_figures
                figures = write_figures(self.evaluator, metrics, self.run_dir)
            from pima_hpc.evaluation.report import spec_units, write_report
            write_report(self.run_dir, metrics, (self.run_dir / "config.yaml").read_text(), figures,
                         spec_units(self.spec))
            self.tracker.finish(metrics, figures)
        self.collective.barrier()
        return metrics

    def close(self) -> None:
        """Drop the networks before the process group goes (avoids a rare gloo abort at exit)."""
        self.net = self.xm_net = self.optimizer = self.xm_optimizer = None
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        gc.collect()


def summary_line(metrics: dict) -> str:
    """Every read-out's test accuracy, the latent clustering (``multimodal``) first: it is the headline."""
    keys = [k for k, v in metrics.items() if isinstance(v, dict) and isinstance(v.get("test"), dict)
            and "accuracy" in v["test"]]
    keys.sort(key=lambda k: k != "multimodal")
    note = {"multimodal_joint": " (incl. the experts' likelihood)"}
    line = "; ".join(f"{k}{note.get(k, '')} test acc {100 * metrics[k]['test']['accuracy']:.2f}%" for k in keys)
    base = {k: v["test"]["accuracy"] for k, v in metrics.get("baselines", {}).items() if "test" in v}
    if base:
        line += " | baselines: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in base.items())
    return line
