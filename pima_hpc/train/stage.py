"""What every training stage shares: the run it belongs to and the run's state.

A stage (train/multimodal.py, train/crossmodal.py) owns its networks, optimizer and epochs; the
driver (train/trainer.py) owns the state, checkpoints, resume and signals, and hands itself in.
"""

from __future__ import annotations

from pima_hpc.train.state import TrainingState


class Stage:
    """A stage of the run ``run`` (the driver): config, context, model and data come from it."""

    def __init__(self, run):
        self.run = run
        self.cfg, self.ctx, self.model, self.spec = run.cfg, run.ctx, run.model, run.spec
        self.collective, self.device, self.eval_batch = run.collective, run.device, run.eval_batch
        self.train_data = run.train_data

    @property
    def state(self) -> TrainingState:
        """The run's training state (the driver's: a resume replaces it, so it is never copied here)."""
        return self.run.state
