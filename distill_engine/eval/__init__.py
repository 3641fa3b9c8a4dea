"""Evaluation of a distilled student against its teacher, black-box generation, and the embedded demo.

``evaluate`` (exported as ``de.evaluate``) compares per slice: perplexities, exact KL(teacher‖student),
top-1/top-5 agreement and the top-k objective KL, and flags coverage failures and suspicious wins.
``generate`` writes teacher completions for black-box (sequence-level) distillation.
"""
from .evaluate import EvalConfig, evaluate
from .generate import GenerateConfig, generate

__all__ = ["EvalConfig", "evaluate", "GenerateConfig", "generate"]
