"""Benchmarks: each module prints a table and writes JSON under benchmarks/results/ (see docs/BENCHMARKS.md)."""
