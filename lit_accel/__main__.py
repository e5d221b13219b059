"""``python -m lit_accel`` is ``lit-accel`` (e.g. for ``torchrun -m lit_accel fit …``)."""

from lit_accel.commands import run

run()
