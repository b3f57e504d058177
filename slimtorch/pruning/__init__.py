"""Structured pruning during training: patterns, criteria, schedules, callbacks and the report."""
from .callbacks import PruningCallbacks, prepare_pruning
from .report import LayerReport, SparsityReport, sparsity_report

__all__ = ["prepare_pruning", "PruningCallbacks", "sparsity_report", "SparsityReport", "LayerReport"]
