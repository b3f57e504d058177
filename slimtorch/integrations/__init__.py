"""Glue to the training frameworks users already run: DeepSpeed (``deepspeed``), Hugging Face (``hf``)."""
