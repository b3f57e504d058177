"""Structured pruning during training: patterns, criteria, schedules, callbacks and the report."""
from .access import whole as whole_parameter
from .callbacks import PruningCallbacks, prepare_pruning
from .report import LayerReport, SparsityReport, sparsity_report

__all__ = ["prepare_pruning", "PruningCallbacks", "sparsity_report", "SparsityReport", "LayerReport", "whole_parameter"]
