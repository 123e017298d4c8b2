"""kubelora operator (Kopf). Built in a later issue; the spec it validates with lives in kubelora_trainer.spec."""
