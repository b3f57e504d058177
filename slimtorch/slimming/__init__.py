"""Slimming: pruned rows, channels and attention heads removed, leaving a smaller dense model
(:func:`slim`, :func:`slim_report`, :func:`save_slim`, :func:`load_slim`)."""
from .checkpoint import load_slim, save_slim
from .slim import SlimReport, slim, slim_report

__all__ = ["slim", "slim_report", "SlimReport", "save_slim", "load_slim"]
