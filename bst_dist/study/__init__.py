"""The quality study: several runs under one token budget, trained and evaluated alike, one JSON
a run and a report (docs/quality.md). spec.py reads a study file, runner.py runs it, report.py
writes the tables and plots."""
