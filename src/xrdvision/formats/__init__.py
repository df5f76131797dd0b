"""On-disk formats between stages: atomic writes, the CSV tables, the patterns archive, measured scans.

One home per format: every stage reads and writes its files through these modules, so a column check or
an error message about a malformed file is written once.
"""
