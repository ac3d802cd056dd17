"""Benchmarks, validation, traces and kernel experiments. Nothing in the product imports these."""
