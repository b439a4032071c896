"""Benchmark cases for `lossforge bench`, one module per family (see lossforge.bench.Case)."""
