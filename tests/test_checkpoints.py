"""LastAfterEveryValidation: last.ckpt holds the newest state, whatever the monitored metric does."""

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lit_accel.checkpoints import LastAfterEveryValidation


class FlatAccuracy(BoringModel):
    """Logs the same val/acc every epoch: only the first validation is a new best."""

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", 0.5)
        return super().validation_step(batch, batch_idx)


def _fit(tmp_path, **trainer_kwargs) -> dict:
    checkpoint = LastAfterEveryValidation(
        dirpath=tmp_path, monitor="val/acc", mode="max", save_top_k=1, save_last=True, enable_version_counter=False
    )
    trainer = pl.Trainer(
        accelerator="cpu", callbacks=[checkpoint], logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_train_batches=4, limit_val_batches=2, **trainer_kwargs,
    )
    trainer.fit(FlatAccuracy())
    return {"final_step": trainer.global_step, "last": torch.load(tmp_path / "last.ckpt", weights_only=False)}


def test_last_follows_validations_that_do_not_improve(tmp_path):
    run = _fit(tmp_path, max_epochs=3)
    assert run["last"]["global_step"] == run["final_step"] == 12  # not 4, the step of the only best


def test_last_is_the_final_state_when_fit_ends_between_validations(tmp_path):
    run = _fit(tmp_path, max_steps=6, val_check_interval=4)
    assert run["last"]["global_step"] == run["final_step"] == 6
