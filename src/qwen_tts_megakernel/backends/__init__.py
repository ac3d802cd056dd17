"""Backends behind one contract (base.py): reference, graphed reference, megakernel."""
