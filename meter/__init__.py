"""Everything about joules: sources, sampler, attribution, ledger and store, reports.

Imports nothing from ``proxy`` or ``sim``.
"""
