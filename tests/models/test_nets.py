import pytest
import torch

from lit_accel.models import BatchNormCNN, ResNet9, SeedCNN


@pytest.mark.parametrize("net_class", [SeedCNN, BatchNormCNN, ResNet9])
def test_logits_shape_and_fsdp_units(net_class):
    kwargs = {"width": 8} if net_class is ResNet9 else {}
    net = net_class(num_classes=7, **kwargs)
    out = net(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 7)
    units = net.fsdp_units()
    assert units and all(any(u is m for m in net.modules()) for u in units)


def test_batchnorm_cnn_is_seed_cnn_with_batchnorm():
    seed, bn = SeedCNN(), BatchNormCNN()
    kinds = lambda net: [type(m).__name__ for m in net.modules() if type(m).__name__ != "Sequential"][1:]
    assert [k for k in kinds(bn) if k != "BatchNorm2d"] == kinds(seed)
    assert kinds(bn).count("BatchNorm2d") == 2


def test_seed_cnn_is_the_baseline_architecture():
    net = SeedCNN()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 32, (3, 3), (0, 0)),
        (32, 64, (3, 3), (0, 0)),
    ]
    assert [(l.in_features, l.out_features) for l in linears] == [(2304, 128), (128, 10)]
    dropout = [m for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropout) == 1 and dropout[0].p == 0.2


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: SeedCNN(num_classes=1), "num_classes"),
        (lambda: SeedCNN(dropout=1.0), "dropout"),
        (lambda: BatchNormCNN(width=0), "width"),
        (lambda: ResNet9(logit_scale=0), "logit_scale"),
    ],
)
def test_bad_arguments_raise(make, name):
    with pytest.raises(ValueError, match=f"{name}=.* is not allowed"):
        make()
