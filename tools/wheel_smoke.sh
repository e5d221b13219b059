#!/usr/bin/env bash
# The package as a user gets it: build the wheel, install it into a fresh virtual environment (no
# repository on the path), and from an empty folder train the shipped recipe by name, test its
# checkpoint with the default recipe (no --config), and resolve a strategy file by name.
# Seconds of training; building the wheel fetches setuptools unless WHEEL_SMOKE_NO_ISOLATION=1.
#   tools/wheel_smoke.sh            # run by .ci/run; by hand from anywhere in the repository
# The virtual environment sees the current Python's packages (torch, lightning, … are not
# reinstalled), so the check below that lit_accel is imported from the wheel, not from an editable
# install of the repository, is what makes it a test of the wheel.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/lit_accel_wheel.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
unset PYTHONPATH  # the repository must not be importable

# Build from a copy of the working tree's files (tracked and new, not ignored): no stale build/ of
# the repository can leak into the wheel, and nothing is written into the repository.
mkdir "$tmp/src"
(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - --) | tar -xf - -C "$tmp/src"
isolation=()
[[ "${WHEEL_SMOKE_NO_ISOLATION:-0}" == 1 ]] && isolation=(--no-build-isolation)
"$python" -m pip wheel --quiet --no-deps "${isolation[@]}" -w "$tmp/dist" "$tmp/src"
wheel=("$tmp"/dist/lit_accel-*.whl)
"$python" - "${wheel[0]}" <<'EOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
for name in ("lit_accel/configs/cifar10.yaml", "lit_accel/configs/strategy/ddp.yaml", "lit_accel/configs/precision/bf16-mixed.yaml"):
    assert name in names, f"the wheel lacks {name}"
EOF

"$python" -m venv --system-site-packages "$tmp/venv"
venv_python="$tmp/venv/bin/python"
lit_accel="$tmp/venv/bin/lit-accel"
"$venv_python" -m pip install --quiet --no-deps --no-index --ignore-installed "${wheel[0]}"

mkdir "$tmp/empty"
cd "$tmp/empty"
"$venv_python" - "$tmp/venv" <<'EOF'
import sys
from pathlib import Path
import lit_accel
where = Path(lit_accel.__file__).resolve()
assert Path(sys.argv[1]).resolve() in where.parents, f"lit_accel imported from {where}, not from the wheel"
print(f"lit_accel {lit_accel.__version__} from {where.parent}")
EOF

tiny=(--data.synthetic true --data.synthetic_size 320 --data.val_size 64 --data.synthetic_test_size 64
      --trainer.max_epochs 1 --trainer.limit_train_batches 1 --trainer.limit_val_batches 1
      --trainer.limit_test_batches 1 --trainer.enable_progress_bar false --trainer.enable_model_summary false)
"$lit_accel" fit --config cifar10 "${tiny[@]}" 2>&1 | tee ../fit.log
"$lit_accel" test --ckpt_path last "${tiny[@]}"  # no --config: the default recipe
"$lit_accel" fit --config cifar10 --config strategy/ddp --config precision/bf16-mixed --print_config > ddp.yaml

"$venv_python" - <<'EOF'
from pathlib import Path
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

versions = sorted(Path("runs").glob("*/version_*"))  # the recipe's logger names the folder
assert [v.name for v in versions] == ["version_0", "version_1"], versions  # fit, then test
saved = yaml.safe_load((versions[0] / "config.yaml").read_text())
callbacks = {c["class_path"].rsplit(".", 1)[-1] for c in saved["trainer"]["callbacks"]}
assert {"ThroughputMeter", "DivergenceGuard", "ValidationFigures"} <= callbacks, callbacks
assert saved["model"]["lr_scheduler"]["class_path"].endswith("WarmupDecayLR"), saved["model"]["lr_scheduler"]
events = EventAccumulator(str(versions[0]), size_guidance={"scalars": 0, "images": 0})
events.Reload()
# One step logs no scalar of the meter (3 warm-up steps) or the guard (nothing went wrong): the
# meter's end-of-fit summary and the figures show the callbacks ran.
assert "ThroughputMeter summary" in Path("../fit.log").read_text(), "the meter did not run"
assert events.Tags()["images"], "the recipe's figures were not drawn"
tested = EventAccumulator(str(versions[1]), size_guidance={"scalars": 0})
tested.Reload()
assert "test/acc" in tested.Tags()["scalars"], tested.Tags()["scalars"]
ddp = yaml.safe_load(Path("ddp.yaml").read_text())
assert ddp["trainer"]["strategy"] == "ddp" and ddp["trainer"]["precision"] == "bf16-mixed", ddp["trainer"]
assert sorted(p.name for p in Path(".").iterdir()) == ["ddp.yaml", "runs"], list(Path(".").iterdir())
print("wheel smoke: the recipe trained (meter, guard, figures), tested; strategy/ddp resolved by name")
EOF
