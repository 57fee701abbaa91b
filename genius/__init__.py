"""GENIUS as a plain library: encoders, quantizer, ID codec, trie, decoder, beam search.

No Ray and no gRPC imports here: everything runs in one process, e.g. in a notebook.
"""
from genius.modality import Modality

__all__ = ["Modality"]
