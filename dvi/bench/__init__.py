"""Benchmarks behind `dvi bench ...`: plain functions that measure, aggregate and write reports."""
