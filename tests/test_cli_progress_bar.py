"""The progress bar of ``lit-accel``: the run's version as a whole number (issue 26, item 6)."""

from lightning.pytorch.callbacks import RichProgressBar

from helpers import TINY_CLI_ARGS
from lit_accel.cli import LitAccelCLI


def test_the_progress_bar_shows_the_version_as_a_whole_number(in_tmp_dir):
    """Lightning's rich bar prints numbers with ".3f": v_num 0.000 for version_0."""
    cli = LitAccelCLI(args=[*TINY_CLI_ARGS, "--trainer.enable_progress_bar", "true"], run=False)
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, RichProgressBar)
    assert bar.get_metrics(cli.trainer, cli.model)["v_num"] == "0"


def test_a_rich_progress_bar_named_in_the_callbacks_keeps_its_settings(in_tmp_dir):
    named = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.RichProgressBar",
        "--trainer.callbacks.refresh_rate",
        "7",
    ]
    cli = LitAccelCLI(args=[*TINY_CLI_ARGS, "--trainer.enable_progress_bar", "true", *named], run=False)
    bar = cli.trainer.progress_bar_callback
    assert bar.refresh_rate == 7, "the configured bar, not a new one"
    assert bar.get_metrics(cli.trainer, cli.model)["v_num"] == "0"
