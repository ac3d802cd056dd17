"""Test fixtures: server subprocesses, a stub LLM. Nothing in the product imports these."""
