"""Differential privacy on the device: the accountants and the Gaussian mechanism (accounting)
and the persistent, locked privacy ledger every release is charged to (ledger).
"""
