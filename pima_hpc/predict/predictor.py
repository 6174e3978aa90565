"""Predictions of a trained run for samples that carry any subset of its modalities.

Which read-out, by what is given (docs/method.md, "Prediction"):

* every modality: ``multimodal``, argmax p(c | z = mu) at the fused posterior mean (eqs 7-8, 15),
  the assignment `pima evaluate` scores;
* one modality m: ``crossmodal_<m>``, the cross-modal networks of Section 2.4 (the cluster head
  p~(c | X_m) where trained, else p(c | z = mu~_m)); absent curves are the mixture of experts under
  those weights (eqs 13-14) with the amplitude model of a free-amplitude expert;
* several but not all: ``multimodal_masked``, the product of the given modalities' experts
  (eqs 7-8 with the missing-modality mask), p(c | z = mu) and the experts' mixture at it.

Absent images are decoded from the latent mean the read-out used. Everything is returned in
physical units (curves with their +-2 sd band from the MoE variance).
"""

from __future__ import annotations

import torch

from pima_hpc.errors import UserError
from pima_hpc.predict.trained import TrainedRun


class Predictor:
    def __init__(self, run: TrainedRun, present: list[str]):
        self.run, self.model, self.crossmodal = run, run.model, run.crossmodal
        self.present = [n for n in self.model.names if n in present]
        unknown = [n for n in present if n not in self.model.names]
        if unknown:
            raise UserError(f"modality {unknown[0]!r} is not one of the run's modalities {self.model.names}")
        self.absent = [n for n in self.model.names if n not in self.present]
        if not self.absent:
            self.readout = "multimodal"
        elif len(self.present) == 1:
            if self.crossmodal is None:
                raise UserError(f"run {str(run.run_dir)!r} has no finished cross-modal stage (its checkpoint is at "
                                f"stage {run.stage!r}), which predicting from {self.present[0]!r} alone needs; "
                                "train it with stages=[multimodal,crossmodal], or give every modality")
            self.readout = f"crossmodal_{self.present[0]}"
        else:
            self.readout = "multimodal_masked"
        if run.stage == "multimodal":
            raise UserError(f"run {str(run.run_dir)!r} has not finished its multimodal stage (newest checkpoint "
                            f"{run.checkpoint.name}); let `pima train` finish it first")

    @property
    def absent_curves(self) -> list[str]:
        return [n for n in self.absent if n in self.model.curve_names or n in self.model.network_curve_names]

    @property
    def absent_images(self) -> list[str]:
        return [n for n in self.absent if n in self.model.image_names]

    def _full_batch(self, batch: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor]:
        """The batch with zeros for absent modalities and the (B, D) presence mask of eqs 7-8."""
        n = len(next(iter(batch.values())))
        ref = next(iter(batch.values()))
        full = {m.name: batch[m.name] if m.name in batch else torch.zeros((n, *m.shape), device=ref.device)
                for m in self.model.spec.modalities}
        mask = torch.tensor([[float(m in batch) for m in self.model.names]], device=ref.device).expand(n, -1)
        return full, mask

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> dict:
        """{"log_posterior": (B, C), "cluster": (B,), "curves": {name: (mean, sd)}, "images": {name: x}}."""
        model, xm = self.model, self.crossmodal
        if self.readout.startswith("crossmodal_"):
            src = self.present[0]
            log_post = xm.log_cluster_posterior(model, src, batch[src])
            z, _ = xm(src, batch[src])
            curves = {d: xm.predict_curve(model, src, d, batch[src]) for d in self.absent_curves
                      if d in model.curve_names}
        else:
            full, mask = self._full_batch(batch)
            z, _ = model.encode(full, None if not self.absent else mask)
            log_post = model.log_responsibilities(z)
            curves = {d: model.predict_curve(d, log_post.exp()) for d in self.absent_curves if d in model.curve_names}
        # network curves: decoded at the code (mu, or mu~ of the one given modality), with eq 12's variance
        curves.update({d: model.decoded_curve(d, z) for d in self.absent_curves if d in model.network_curve_names})
        images = {n: model.spec[n].to_physical(model.decoders[n](z)) for n in self.absent_images}
        return {"log_posterior": log_post, "cluster": log_post.argmax(-1),
                "curves": {d: (mean, var.clamp_min(0).sqrt()) for d, (mean, var) in curves.items()},
                "images": images}
