"""``python -m tools.bench trainer_cost``: each variant takes away exactly the part it names, and the
plain loop trains with the recipe's optimizer and flips (what the ratios are taken against)."""

import torch

from lit_accel.cli import LitAccelCLI
from lit_accel.data import make_synthetic_cifar
from lit_accel.models import LiteCNN
from tools import plain_loop
from tools.bench import fits, trainer_cost


def test_each_variant_removes_one_more_part_of_the_recipe(monkeypatch):
    runs = []
    monkeypatch.setattr(fits, "timed_fit", lambda s, args, callbacks=None, **_: runs.append(args) or {})
    variants = trainer_cost.variants(trainer_cost.parse_args(["--smoke"]))
    assert list(variants)[0] == "plain loop (channels_last)"
    for run in list(variants.values())[1:]:
        run()
    parsed = [LitAccelCLI(args=args[1:], run=False) for args in runs]
    names = [[type(c).__name__ for c in cli.trainer.callbacks] for cli in parsed]
    assert "DivergenceGuard" in names[0] and "ThroughputMeter" in names[0]
    step_saves = [
        [c for c in cli.trainer.callbacks if type(c).__name__ == "ModelCheckpoint" and c._every_n_train_steps]
        for cli in parsed
    ]
    assert [len(saves) for saves in step_saves] == [1, 0, 0, 0]
    assert names[1] == names[0]  # only the step checkpoint went
    assert "DivergenceGuard" not in names[2] and "ThroughputMeter" not in names[2]
    assert [cli.trainer.logger is not None for cli in parsed] == [True, True, True, False]
    assert all(cli.model.channels_last and isinstance(cli.model.net, LiteCNN) for cli in parsed)
    assert {cli.datamodule.batch_size for cli in parsed} == {16}


def test_plain_loop_takes_the_recipes_optimizer_and_flips_only(monkeypatch):
    made = []
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: made.append(k) or real_adamw(*a, **k))
    crops = []
    real_augment = plain_loop._augment
    monkeypatch.setattr(plain_loop, "_augment", lambda x, padding=4: crops.append(padding) or real_augment(x, padding))
    images, labels = make_synthetic_cifar(64, seed=0)
    plain_loop.train(LiteCNN(), images, labels, 16, 0, 2, lr=0.004, optimizer_name="adamw", random_crop=False)
    assert made == [{"lr": 0.004, "weight_decay": 0.01}] and crops == [0, 0]
    flipped = plain_loop._augment(torch.arange(4).view(1, 1, 1, 4).repeat(64, 1, 1, 1), 0)
    assert {tuple(row) for row in flipped[:, 0, 0].tolist()} == {(0, 1, 2, 3), (3, 2, 1, 0)}
