"""Drop-in integrations with trainers users already have (optional extras).

``distill_engine.integrations.hf`` -- a Hugging Face ``Trainer`` subclass (needs transformers + accelerate).
``distill_engine.integrations.trl`` -- a loss hook for TRL's GKD/distillation trainer (needs trl).

Nothing here is imported by ``import distill_engine``: each submodule imports its framework on its own import.
"""
