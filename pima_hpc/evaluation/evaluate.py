"""Cluster read-outs of a trained model and their scores on every split, and per-cluster reports.

An :class:`Evaluator` needs the model, the cross-modal networks (if trained), the split readers
and the collective: counts are contingency tables, which add across ranks, so the scores of a
distributed run equal one process's. Labels are read here for scoring only.

Read-outs (docs/method.md, "Evaluation"): ``multimodal`` = argmax p(c | z = mu) (the paper's, the
latent clustering); ``multimodal_joint`` = argmax q(c | X); ``bayes_<curve>`` = eq 19 from one
curve's experts; ``crossmodal_<m>`` from modality m alone (cluster head), and
``crossmodal_latent_<m>`` = the paper's argmax p(c | z = mu~_m).
"""

from __future__ import annotations

import numpy as np
import torch

from pima_hpc.collective import gather_subsample
from pima_hpc.evaluation.metrics import contingency, fit_cluster_to_label, table_metrics
from pima_hpc.model.experts import build_expert
from pima_hpc.runtime import to_device

SPLITS = ("train", "val", "test")


def curve_scores(sse: float, inside: float, n: float, points: float, spread: float, units: str) -> dict:
    """RMSE, R^2 (1 - SSE / the spread around the average curve), +-2 sd coverage over ``points`` points of
    ``n`` curves."""
    return {"rmse": float(np.sqrt(sse / points)), "r2": float(1.0 - sse / spread) if spread > 0 else float("nan"),
            "coverage": float(inside / points), "n": int(n), "points": int(points), "units": units}


class Evaluator:
    def __init__(self, model, crossmodal, splits: dict, collective, device, batch_size: int, seed: int = 0):
        """``splits``: {"train": reader, "val": reader or None, "test": reader or None}; ``seed`` draws
        the samples shown in figures."""
        self.model, self.crossmodal = model, crossmodal
        self.splits = {k: v for k, v in splits.items() if v is not None}
        self.collective, self.device, self.batch_size, self.seed = collective, device, batch_size, seed

    # ----- read-outs -----------------------------------------------------------------------------
    def predictors(self) -> dict:
        """Every way the toolkit assigns clusters, by name: ``predict(batch) -> clusters``."""
        model, xm = self.model, self.crossmodal
        preds = {"multimodal": model.predict}
        if model.cfg.cluster_posterior == "joint" and model.curve_names:
            preds["multimodal_joint"] = self.joint_predict
        for name in model.curve_names:
            preds[f"bayes_{name}"] = lambda b, n=name: model.expert_log_posterior(b, [n]).argmax(-1)
        if xm is not None:
            for name in model.names:
                preds[f"crossmodal_{name}"] = lambda b, n=name: self.crossmodal_predict(b, n)
                if xm.classifiers:
                    preds[f"crossmodal_latent_{name}"] = lambda b, n=name: self.crossmodal_latent_predict(b, n)
        return preds

    @torch.no_grad()
    def joint_predict(self, batch):
        """argmax q(c | X): the latent code's p(c | z = mu) and the experts' likelihoods together, the
        q(c) the ELBO trains with (model.cluster_posterior: joint); not the paper's evaluation."""
        mu, logvar = self.model.encode(batch)
        return self.model.cluster_log_posterior(batch, mu, logvar, mu).argmax(-1)

    @torch.no_grad()
    def crossmodal_predict(self, batch, name):
        return self.crossmodal.log_cluster_posterior(self.model, name, batch[name]).argmax(-1)

    @torch.no_grad()
    def crossmodal_latent_predict(self, batch, name):
        """The paper's unimodal prediction, argmax p(c | z = mu~_i) (Section 2.4)."""
        mu, _ = self.crossmodal(name, batch[name])
        return self.model.log_responsibilities(mu).argmax(-1)

    # ----- scores --------------------------------------------------------------------------------
    @torch.no_grad()
    def cluster_table(self, reader, predict) -> np.ndarray:
        """Global contingency table (clusters x labels) of ``predict(batch) -> clusters`` on a split."""
        self.model.eval()
        c, k = self.model.cfg.n_clusters, len(self.model.spec.label_names)
        table = np.zeros((c, k))
        for idx in reader.batch_index_lists(self.batch_size, shuffle=False):
            batch = to_device(reader.read_batch(idx), self.device)
            table += contingency(predict(batch).cpu().numpy(), batch["label"].cpu().numpy(), c, k)
        return self.collective.allreduce_sum([table])[0]

    def accuracy(self, reader, predict=None) -> float:
        """Accuracy of one split mapped on itself (a progress figure, e.g. validation during training)."""
        table = self.cluster_table(reader, predict or self.model.predict)
        return table_metrics(table, fit_cluster_to_label(table))["accuracy"]

    def score(self, predict) -> dict:
        """Metrics per split; the cluster -> label map is fitted on train and reused for val and test."""
        train_table = self.cluster_table(self.splits["train"], predict)
        mapping = fit_cluster_to_label(train_table)
        out = {"mapping": mapping.tolist()}
        for name in SPLITS:
            if name in self.splits:
                table = train_table if name == "train" else self.cluster_table(self.splits[name], predict)
                out[name] = table_metrics(table, mapping)
        return out

    def metrics(self) -> dict:
        """Every read-out's scores (when labels exist), the experts and the mixture weights."""
        # eval mode: BatchNorm running statistics, so a prediction does not depend on its batch
        for module in (self.model, self.crossmodal):
            if module is not None:
                module.eval()
        model, metrics = self.model, {}
        if model.spec.label_names and self.splits["train"].labels() is not None:
            for key, predict in self.predictors().items():
                metrics[key] = self.score(predict)
            from pima_hpc.evaluation.baselines import kmeans_baselines
            metrics["baselines"] = kmeans_baselines(self)
        metrics["experts"] = {n: model.experts[n].describe(model.theta(n)) for n in model.curve_names}
        metrics["expert_noise_std"] = {n: model.log_noise(n).exp().sqrt().tolist() for n in model.curve_names}
        metrics["cluster_weights"] = model.log_pi().exp().tolist()
        metrics["image_noise_std"] = {n: float(getattr(model, f"log_recon_var_{n}").exp().sqrt())
                                      for n in model.image_names}
        if model.network_curve_names:  # normalised units, like the images'
            metrics["network_curve_noise_std"] = {n: float(getattr(model, f"log_recon_var_{n}").exp().sqrt())
                                                  for n in model.network_curve_names}
        if model.amplitude_free:
            metrics["expert_amplitude"] = self.amplitude_report(self.splits["train"])
        if self.crossmodal is not None:
            metrics["crossmodal_quality"] = {
                f"{src}_to_{dst}": {split: self.curve_quality(reader, src, dst) for split, reader in self.splits.items()}
                for src in model.names for dst in model.curve_names + model.network_curve_names if src != dst}
        return metrics

    @torch.no_grad()
    def curve_quality(self, reader, src: str, dst: str) -> dict:
        """Curve ``dst`` predicted from modality ``src`` alone (MoE mean +- 2 sd, eqs 13-14; a network curve:
        decoded at mu~_src, +- 2 sd of eq 12) against the measured one, over every point in physical units: RMSE, R^2 (1 - SSE / the spread of each grid
        point around its mean over samples, so 0 = predicting the average curve) and the share of
        points inside the +-2 sd band. Sums over ranks through the collective."""
        if dst in self.model.point_curves:
            return self.point_curve_quality(reader, src, dst)
        spec = self.model.spec[dst]
        length = spec.shape[0]
        sums = np.zeros(3 + 2 * length)  # SSE, points inside the band, samples, per-point sum y, sum y^2
        for batch in reader.iter_batches(self.batch_size, shuffle=False):
            batch = to_device(batch, self.device)
            if dst in self.model.network_curve_names:  # decoded at the eq-18 code of src
                mean, var = self.model.decoded_curve(dst, self.crossmodal(src, batch[src])[0])
            else:
                mean, var = self.crossmodal.predict_curve(self.model, src, dst, batch[src])
            truth = spec.to_physical(batch[dst]).double()
            err = truth - mean.double()
            sums[0] += float((err ** 2).sum())
            sums[1] += float((err.abs() <= 2 * var.double().clamp_min(0).sqrt()).sum())
            sums[2] += len(truth)
            sums[3:3 + length] += truth.sum(0).cpu().numpy()
            sums[3 + length:] += (truth ** 2).sum(0).cpu().numpy()
        total = self.collective.allreduce_sum([sums])[0]
        sse, inside, n = total[:3]
        sy, syy = total[3:3 + length], total[3 + length:]
        spread = float((syy - sy ** 2 / max(n, 1)).sum())
        return curve_scores(sse, inside, n, n * length, spread, spec.units)

    @torch.no_grad()
    def point_curve_quality(self, reader, src: str, dst: str) -> dict:
        """:meth:`curve_quality` for a curve on per-sample grids, scored on every sample's measured points:
        the MoE mean and variance (eqs 13-14) of the experts evaluated on that sample's grid. R^2 is against
        the best single average curve for those grids (least squares in the hat basis of the reference grid,
        which on a shared grid is the per-point mean), so 0 again means predicting the average curve."""
        model = self.model
        spec, expert, theta = model.spec[dst], model.experts[dst], model.theta(dst)
        hat = build_expert("free", spec.t)  # linear interpolation from the reference grid
        length = len(spec.t)
        noise = model.log_noise(dst).exp().double().cpu().numpy() * spec.scale ** 2  # physical units
        # SSE, points inside the band, samples, points, sum x^2, then the hat-basis sums H^T x and H^T H
        sums = np.zeros(5 + length + length * length)
        for batch in reader.iter_batches(self.batch_size, shuffle=False):
            batch = to_device(batch, self.device)
            w = self.crossmodal.log_cluster_posterior(model, src, batch[src]).exp().double().cpu().numpy()
            x, t, m = model.measured_points(dst, batch)
            e = expert.evaluate_at(t, theta)                                             # (B, C, P)
            mean = np.einsum("bc,bcp->bp", w, e)
            var = np.maximum(np.einsum("bc,bcp->bp", w, noise[None, :, None] + e ** 2) - mean ** 2, 0.0)
            h = hat.candidate_designs(np.where(m > 0, t, spec.t[0]))[:, 0] * m[..., None]   # (B, P, L)
            sums[0] += float((m * (x - mean) ** 2).sum())
            sums[1] += float((m * (np.abs(x - mean) <= 2 * np.sqrt(var))).sum())
            sums[2:5] += [len(x), m.sum(), (m * x ** 2).sum()]
            sums[5:5 + length] += np.einsum("bpl,bp->l", h, m * x)
            sums[5 + length:] += np.einsum("bpl,bpk->lk", h, h).ravel()
        total = self.collective.allreduce_sum([sums])[0]
        sse, inside, n, points, sxx = total[:5]
        u, gram = total[5:5 + length], total[5 + length:].reshape(length, length)
        spread = float(sxx - u @ np.linalg.lstsq(gram, u, rcond=None)[0])
        return curve_scores(sse, inside, n, points, spread, spec.units)

    @torch.no_grad()
    def amplitude_report(self, reader, quantiles=(0.05, 0.5, 0.95)) -> dict:
        """Per curve modality and cluster: the distribution of the samples' profiled amplitudes (free
        expert amplitude), and of the scale parameters they imply in physical units (a_d * theta_c).

        Samples go to their argmax q(c | X); the quantiles are over every rank's amplitudes, gathered
        through the collective.
        """
        model = self.model
        amps = {n: [] for n in model.curve_names}
        assign = []
        for batch in reader.iter_batches(self.batch_size, shuffle=False):
            batch = to_device(batch, self.device)
            mu, logvar = model.encode(batch)
            k = model.cluster_log_posterior(batch, mu, logvar, mu).argmax(-1)
            assign.append(k.cpu().numpy())
            for n in amps:
                amps[n].append(model.amplitudes(n, batch[n]).gather(1, k[:, None])[:, 0].double().cpu().numpy())
        assign = self.gather_rows(np.concatenate(assign).astype(float))
        out = {}
        for n, parts in amps.items():
            a = self.gather_rows(np.concatenate(parts))
            expert, theta = model.experts[n], model.theta(n)
            rows = []
            for k in range(model.cfg.n_clusters):
                sel = a[assign == k]
                row = {"cluster": k, "n": int(len(sel))}
                if len(sel):
                    row.update(mean=float(sel.mean()), sd=float(sel.std()),
                               **{f"q{int(100 * q):02d}": float(np.quantile(sel, q)) for q in quantiles})
                    for i, p in enumerate(expert.param_names):
                        if p in expert.scale_params:
                            row[p] = {f"q{int(100 * q):02d}": float(np.quantile(sel, q) * theta[k, i]) for q in quantiles}
                rows.append(row)
            out[n] = rows
        return out

    def gather_rows(self, local: np.ndarray) -> np.ndarray:
        """Every rank's 1-D array concatenated in rank order, through the one collective."""
        return gather_subsample(self.collective, np.asarray(local, dtype=np.float64)[:, None])[:, 0]
