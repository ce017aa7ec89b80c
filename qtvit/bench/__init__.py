"""Benchmarks: ``qtvit bench <name>`` (see :mod:`qtvit.bench.cli`). ``attention``, ``models`` and
``pareto`` run on one sweep runner (:mod:`qtvit.bench.runner`: interleaved timing, skips with
predictions, JSON with an environment header naming the git commit). Each is also a function::

    from qtvit.bench.attention import AttentionBenchConfig, run_attention_benchmark
    doc = run_attention_benchmark(AttentionBenchConfig(kernels=("relu", "qt"), tokens=(1024,)), echo=print)
"""
