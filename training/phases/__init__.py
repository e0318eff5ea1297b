"""One module per training phase (decoder, joint, scst), each a `Phase` that training/skeleton.py runs.

A phase imports no other phase: what two phases share lives below them, in training/
(tests/test_imports.py keeps it so).
"""
