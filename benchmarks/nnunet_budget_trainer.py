"""nnU-Net v2 trainer that fits its training into a wall-clock budget (for benchmarks/peers.py).

``python benchmarks/peers.py setup`` copies this file into the nnU-Net venv's
``nnunetv2/training/nnUNetTrainer/`` folder, where ``nnUNetv2_train -tr nnUNetTrainer_PeersBudget``
finds the class by name. It is a subclass: nnU-Net's own files stay unpatched. It imports
nnunetv2, so it runs only inside that venv (never imported by useg or its tests).

What changes against ``nnUNetTrainer`` (everything else, network, plans, augmentation, loss,
deep supervision, SGD with Nesterov momentum and its initial LR, is nnU-Net's):

* the budget (``PEERS_BUDGET_S`` seconds) starts when ``on_train_start`` (data loaders,
  unpacking) has finished and ends training: no epoch starts that is not expected to finish in it;
* epoch 0 is a probe of ``PEERS_PROBE_ITERS`` iterations (default 5; fewer when they take more
  than 1/``PEERS_TARGET_EPOCHS`` of the budget, at least 1); from its measured time the
  iterations per epoch are set so that about ``PEERS_TARGET_EPOCHS`` epochs (default 20) fit the
  budget, at most nnU-Net's 250;
* after every epoch the number of epochs that still fit is re-estimated from the last epoch's
  time, and the poly schedule ``lr = lr0 * (1 - epoch / num_epochs) ** 0.9`` is stretched to it,
  so the LR anneals fully inside the budget (as ``useg train --time-budget`` does);
* ``PEERS_VAL_ITERS`` validation iterations per epoch (default 2; nnU-Net uses 50), only for its
  pseudo-Dice log: the model kept is the final one, as nnU-Net's default ``checkpoint_final.pth``;
* the full validation of the fold's cases after training is skipped (``PEERS_FULL_VAL=1`` keeps
  it): it only feeds nnU-Net's post-processing choice, which the benchmark does not use;
* ``peers_budget.json`` in the fold folder records epochs, iterations and times.
"""

from __future__ import annotations

import json
import os
import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


class nnUNetTrainer_PeersBudget(nnUNetTrainer):  # noqa: N801  (nnU-Net's naming, found by class name)
    """nnUNetTrainer with a wall-clock budget and a poly schedule stretched to the epochs that fit."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008  (nnU-Net's signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_s = float(os.environ.get("PEERS_BUDGET_S", "600"))
        self.probe_iters = max(1, _env_int("PEERS_PROBE_ITERS", 5))
        self.target_epochs = max(1, _env_int("PEERS_TARGET_EPOCHS", 20))
        self.num_iterations_per_epoch = self.probe_iters
        self.num_val_iterations_per_epoch = max(1, _env_int("PEERS_VAL_ITERS", 2))
        self.num_epochs = 1000  # replaced after the probe epoch
        self.peers_log = {"budget_s": self.budget_s, "epochs": [], "iterations": 0}

    def _replan(self, epoch_s: float, iters: int, elapsed_s: float) -> None:
        """Set the iterations per epoch (after the probe) and the epochs that still fit."""
        if self.current_epoch == 1:  # the probe has run: size the epochs from its time per iteration
            per_iter = epoch_s / iters
            want = self.budget_s / self.target_epochs / per_iter
            self.num_iterations_per_epoch = int(min(250, max(1, want)))
            epoch_s = per_iter * self.num_iterations_per_epoch
        remaining = self.budget_s - elapsed_s
        fit = int(remaining // epoch_s) if epoch_s > 0 else 0
        self.num_epochs = self.current_epoch + max(0, fit)
        self.lr_scheduler.max_steps = max(self.num_epochs, 1)

    def run_training(self):
        setup_t0 = time.perf_counter()
        self.on_train_start()
        start = time.perf_counter()
        self.peers_log["setup_s"] = round(start - setup_t0, 2)
        while self.current_epoch < self.num_epochs:
            t0, iters = time.perf_counter(), self.num_iterations_per_epoch
            self.on_epoch_start()
            self.on_train_epoch_start()
            lr = self.optimizer.param_groups[0]["lr"]
            train_outputs = self._train_epoch(iters)
            iters = len(train_outputs)
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()  # increments current_epoch
            epoch_s = time.perf_counter() - t0
            self.peers_log["iterations"] += iters
            self.peers_log["epochs"].append({"iters": iters, "seconds": round(epoch_s, 2), "lr": lr})
            self._replan(epoch_s, iters, time.perf_counter() - start)
            self.print_to_log_file(f"peers budget: {self.num_epochs} epochs fit, "
                                   f"{self.num_iterations_per_epoch} iterations each")
        self.peers_log["train_s"] = round(time.perf_counter() - start, 2)
        self.on_train_end()
        with open(os.path.join(self.output_folder, "peers_budget.json"), "w", encoding="utf-8") as f:
            json.dump(self.peers_log, f, indent=1)

    def _train_epoch(self, iters: int) -> list[dict]:
        """``iters`` training steps; the probe epoch also stops at its share of the budget."""
        t0, outputs = time.perf_counter(), []
        share = self.budget_s / self.target_epochs
        for _ in range(iters):
            if self.current_epoch == 0 and outputs and time.perf_counter() - t0 > share:
                break
            outputs.append(self.train_step(next(self.dataloader_train)))
        return outputs

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get("PEERS_FULL_VAL") == "1":
            return super().perform_actual_validation(save_probabilities)
        self.print_to_log_file("peers budget: full validation of the fold skipped")
        return None
