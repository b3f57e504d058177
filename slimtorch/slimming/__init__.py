"""Slimming: pruned rows, channels and heads removed, leaving a smaller dense model (work in progress: the layer
surgery of :mod:`.surgery` is here; the coupling analysis and ``slim()`` build on it)."""
