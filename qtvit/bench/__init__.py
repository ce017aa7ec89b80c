"""Benchmarks: ``qtvit bench <name>`` (see :mod:`qtvit.bench.cli`), each writing JSON with an
environment header (:mod:`qtvit.bench.env`) and sharing the timing and peak-memory protocol of
:mod:`qtvit.bench.timing`.

The attention benchmark is also a function::

    from qtvit.bench.attention import AttentionBenchConfig, run_attention_benchmark
    doc = run_attention_benchmark(AttentionBenchConfig(kernels=("relu", "qt"), tokens=(1024,)), echo=print)
"""
