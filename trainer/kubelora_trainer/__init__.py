"""kubelora trainer: spec, storage, data, models, LoRA export; the program the pods run."""
__version__ = "0.1.0"
