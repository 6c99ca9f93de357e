"""Benchmarks of hugeshmd against baselines measured in the same run; see README.md here.

Run them with ``python -m benchmarks.run [--quick] [--only NAME] [--out DIR]``.
"""
