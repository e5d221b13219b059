"""lit_accel benchmarks: one entry, ``python -m tools.bench CASE [--flags]``, one module per case.

Every case times its variants with :mod:`lit_accel.measure` (rounds that alternate the variants'
order, medians of paired ratios) and prints a Markdown table. Throughput cases (they share flags
and one table, so they can be named together, ``overhead,callbacks``; ``all`` is the six):

==================  ==============================================================================
overhead            tools/plain_loop.py vs ``lit-accel fit`` (recipe callbacks off), same settings
callbacks           lit-accel with ThroughputMeter + DivergenceGuard + DynamicBatchLR vs none
pipeline            preload vs dataloader with 0, 1, 2 workers
precision           32-true vs bf16-mixed vs 16-mixed (runs as bf16-mixed on a CPU)
ddp                 1 vs 2 processes (global images/s; scaling efficiency = ratio / 2); subprocesses
networks            accuracy per second of training of several networks (time to val acc targets)
==================  ==============================================================================

Cases with their own flags (``python -m tools.bench CASE --help``):

==================  ==============================================================================
recipe              whole ``lit-accel fit`` + ``test`` processes of named recipes: time to accuracy
stability           the recipe with its LR x1, x10, x40, with and without DivergenceGuard
callback_overhead   one callback's cost in one fit, switched on and off in adjacent blocks of steps
dynamic_batch       on a plateau: decay the LR or grow the batch (DynamicBatchLR)
batch_curve         images/s against the batch size, and what batch growth would save
sample_seed         cost of seeding each sample's augmentation in the DataLoader pipeline
state_copies        cost of the host copies of a model the callbacks take
trainer_cost        the recipe's ``lit-accel fit`` vs a plain loop with its settings, part by part
image_folder        lit-accel fit on a folder of image files vs ImageFolder + DataLoader; start-up
command_start       a command's parsing (one subcommand's parser or four) and its process's exit
trial_memory        tune's peak-memory column for trials that follow each other in one process
==================  ==============================================================================

Usage::

    python -m tools.bench all                          # every throughput case, quick sizes
    python -m tools.bench overhead,callbacks --reps 9
    python -m tools.bench all --full --device cuda     # the GPU variant
    python -m tools.bench recipe --data_dir DIR        # time to accuracy on any CIFAR-format folder
    python -m tools.bench CASE --smoke                 # seconds: checks the case itself

A note on noise: on a shared machine run-to-run noise is several percent. Only ratios measured in
the same run, with alternating order, mean anything; the medians damp outliers.
"""

THROUGHPUT_CASES = ("overhead", "callbacks", "pipeline", "precision", "ddp", "networks")
OTHER_CASES = (
    "recipe",
    "stability",
    "callback_overhead",
    "dynamic_batch",
    "batch_curve",
    "sample_seed",
    "state_copies",
    "trainer_cost",
    "image_folder",
    "command_start",
    "trial_memory",
)
CASES = THROUGHPUT_CASES + OTHER_CASES
