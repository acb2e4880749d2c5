"""Benchmarks shipped with the package: ``laftr fsd-bench`` (:mod:`laftr.bench.fsd`)."""
