"""The benchmark suite: quality per step count and speed for every method (``python -m benchmarks``).

Modules: ``suite`` (the command, suites, tables, JSON), ``quality2d`` (2-D distributions, sliced
Wasserstein-2), ``shapes_quality`` (shapes GenEval suite through the quickstart recipes), ``speed``
(training-step ratios, sampling throughput, Inception / Frechet timings), ``common`` (helpers).
``fid_bench.py`` and ``train_step_ratio.py`` are standalone scripts the speed part reuses.
"""
