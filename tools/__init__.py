"""Maintainers' tools: the benchmarks (``python -m tools.bench CASE``), the GPU check
(``python -m tools.gpu_check``), the plain PyTorch loop the benchmarks compare against
(``tools/plain_loop.py``, standalone) and a writer of the synthetic set as a CIFAR-format folder."""
