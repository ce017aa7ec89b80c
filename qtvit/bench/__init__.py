"""Benchmarks: ``qtvit bench <name>`` (:mod:`qtvit.bench.cli`), each also a function such as
:func:`qtvit.bench.attention.run_attention_benchmark`; what they measure and how: docs/BENCHMARKS.md."""
