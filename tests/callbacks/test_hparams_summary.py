"""HParamsSummary: flattening, the summary TensorBoard's HParams tab reads, and when it is written."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lit_accel.callbacks.hparams_summary import HParamsSummary, flatten_hparams


# ---------------------------------------------------------------------- pure functions
def test_flatten_turns_class_paths_and_nesting_into_columns() -> None:
    params = {
        "net": {"class_path": "pkg.Net", "init_args": {"width": 32, "act": None}},
        "optimizer": argparse.Namespace(class_path="torch.optim.SGD", init_args=argparse.Namespace(lr=0.1)),
        "schedule": {"milestones": [1, 2], "gamma": torch.tensor(0.5)},
        "flag": True,
        "kind": torch.nn.Linear,
        "_class_path": "internal",
    }
    assert flatten_hparams(params, prefix="model") == {
        "model/net": "pkg.Net",
        "model/net/width": 32,
        "model/net/act": "None",
        "model/optimizer": "torch.optim.SGD",
        "model/optimizer/lr": 0.1,
        "model/schedule/milestones": "[1, 2]",
        "model/schedule/gamma": 0.5,
        "model/flag": True,
        "model/kind": "torch.nn.modules.linear.Linear",
    }


# ---------------------------------------------------------------------- real Trainer runs
class Model(BoringModel):
    """Lightning's demo model, with hyperparameters as LightningCLI would record them."""

    def __init__(self, lr: float = 0.1, net: dict | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()


class Data(BoringDataModule):
    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()


def _session_hparams(log_dir: str) -> list[dict[str, Any]]:
    """Every hparams "session start" in a run folder, decoded as TensorBoard's HParams plugin does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    events = EventAccumulator(log_dir)
    events.Reload()
    sessions = []
    for tag, content in events.PluginTagToContent(metadata.PLUGIN_NAME).items():
        if tag == metadata.SESSION_START_INFO_TAG:
            info = metadata.parse_session_start_info_plugin_data(content)
            sessions.append({name: _value(v) for name, v in info.hparams.items()})
        assert tag != metadata.EXPERIMENT_TAG, "an experiment definition would hide other runs' columns"
    return sessions


def _value(value: Any) -> Any:
    kind = value.WhichOneof("kind")
    return getattr(value, kind)


def _trainer(tmp_path: Path, callbacks: list, logger: Any = None, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        max_epochs=1,
        log_every_n_steps=1,
        limit_train_batches=2,
        limit_val_batches=1,
        limit_test_batches=1,
        logger=logger if logger is not None else TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False),
        **kwargs,
    )


def test_fit_writes_model_data_and_trainer_settings_once(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [HParamsSummary()], accumulate_grad_batches=2)
    net = {"class_path": "pkg.Net", "init_args": {"width": 16}}
    model = Model(lr=0.05, net=net)
    trainer.fit(model, datamodule=Data(batch_size=4))
    trainer.test(model, datamodule=Data(batch_size=4))  # the same run folder: not written again
    (session,) = _session_hparams(trainer.logger.log_dir)
    assert session["model/lr"] == 0.05 and session["model/net"] == "pkg.Net" and session["model/net/width"] == 16
    assert session["data/batch_size"] == 4
    assert session["trainer/strategy"] == "SingleDeviceStrategy" and session["trainer/precision"] == "32-true"
    assert session["trainer/world_size"] == 1 and session["trainer/accumulate_grad_batches"] == 2
    assert "HParamsSummary" in session["trainer/callbacks"]


def test_test_run_in_a_new_folder_gets_its_own_row_without_trainer_settings(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [HParamsSummary(include_trainer=False)])
    trainer.test(Model(), datamodule=Data())
    (session,) = _session_hparams(trainer.logger.log_dir)
    assert session == {"model/lr": 0.1, "model/net": "None", "data/batch_size": 8}


def test_test_of_a_checkpoint_shows_the_hparams_it_was_trained_with(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path / "fit", [HParamsSummary()], accumulate_grad_batches=2)
    trainer.fit(Model(lr=0.05), datamodule=Data(batch_size=4))
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    tester = _trainer(tmp_path / "test", [HParamsSummary()])
    tester.test(Model(lr=0.9), datamodule=Data(batch_size=16), ckpt_path=str(tmp_path / "trained.ckpt"))
    (session,) = _session_hparams(tester.logger.log_dir)
    assert session["model/lr"] == 0.05 and session["data/batch_size"] == 4
    assert session["checkpoint"] == str(tmp_path / "trained.ckpt")
    # The training's trainer settings, not the test's (no accumulation)
    assert session["trainer/accumulate_grad_batches"] == 2


def test_a_checkpoint_without_trainer_settings_gives_no_trainer_columns(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path / "fit", [])  # no HParamsSummary while training
    trainer.fit(Model(lr=0.05), datamodule=Data(batch_size=4))
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    tester = _trainer(tmp_path / "test", [HParamsSummary()])
    tester.test(Model(lr=0.9), datamodule=Data(batch_size=16), ckpt_path=str(tmp_path / "trained.ckpt"))
    (session,) = _session_hparams(tester.logger.log_dir)
    assert session["model/lr"] == 0.05 and not [k for k in session if k.startswith("trainer/")]


def test_warns_about_lightnings_placeholder_hp_metric(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb")  # default_hp_metric=True
    with pytest.warns(UserWarning, match="default_hp_metric: false"):
        _trainer(tmp_path, [HParamsSummary()], logger=logger).validate(Model(), datamodule=Data())


def test_without_tensorboard_it_warns_and_writes_nothing(tmp_path: Path) -> None:
    """fit then test with a CSVLogger only: one warning, and the run folder holds the CSV logger's
    own files and nothing else (no event file anywhere, no hyperparameter columns in its hparams)."""
    trainer = _trainer(tmp_path, [HParamsSummary()], logger=CSVLogger(tmp_path))
    with pytest.warns(UserWarning, match="writes to TensorBoard only") as caught:
        trainer.fit(Model(), datamodule=Data())
        trainer.test(Model(), datamodule=Data())
    assert len([w for w in caught if "writes to TensorBoard only" in str(w.message)]) == 1
    files = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    csv_logger_files = {"lightning_logs/version_0/hparams.yaml", "lightning_logs/version_0/metrics.csv"}
    assert "lightning_logs/version_0/hparams.yaml" in files and files <= csv_logger_files, files
    hparams = (tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text()
    assert "model/" not in hparams and "trainer/" not in hparams, hparams


def test_holds_no_state_and_pickles() -> None:
    summary = HParamsSummary(include_trainer=False)
    assert summary.state_dict() == {}
    assert pickle.loads(pickle.dumps(summary)).include_trainer is False


def test_include_trainer_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="include_trainer='no' is not allowed: use true or false"):
        HParamsSummary(include_trainer="no")
