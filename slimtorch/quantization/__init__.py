"""Post-training quantization: primitives (pure qparam math) and observers; the quantize() entry point comes later."""
