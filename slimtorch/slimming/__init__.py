"""Slimming: pruned rows, channels and attention heads removed, leaving a smaller dense model
(:func:`slim`, :func:`slim_report`)."""
from .slim import SlimReport, slim, slim_report

__all__ = ["slim", "slim_report", "SlimReport"]
