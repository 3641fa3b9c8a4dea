"""Training data: local files → tokens → packed samples → deterministic data-parallel micro-batches."""
from .dataset import TokenSamples, load_texts, tokenize
from .loader import IGNORE_INDEX, Batch, MicroBatchPlan, MicroBatchStream, collate
from .tokenizer import byte_level_tokenizer, check_shared_vocab, load_tokenizer, tokenizer_fingerprint

__all__ = ["TokenSamples", "load_texts", "tokenize", "IGNORE_INDEX", "Batch", "MicroBatchPlan", "MicroBatchStream",
           "collate", "byte_level_tokenizer", "check_shared_vocab", "load_tokenizer", "tokenizer_fingerprint"]
