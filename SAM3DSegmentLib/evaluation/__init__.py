"""Evaluation: measuring engines on data, never needed to segment.

Holds the metrics (``metrics``: Dice, NSD, HD95 on the whole volume), datasets of
image/label pairs (``datasets``), the seeded simulated user (``simulated_user``), the oracle
measurement double (``oracle``), the evaluation with correction rounds (``correction_rounds``),
the peers' pipelines for comparison (``baselines``), speed and memory benchmarks
(``benchmark``) and overlay montages (``montage``). Imports any layer below it; only
``commands`` imports it.
"""
