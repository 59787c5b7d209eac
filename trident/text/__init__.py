"""Text-level generation logic shared by the Triton models: detokenization and stop sequences."""
from .detokenizer import IncrementalDetokenizer
from .stops import StopSequenceMatcher

__all__ = ["IncrementalDetokenizer", "StopSequenceMatcher"]
