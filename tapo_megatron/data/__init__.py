"""Data stage: problem files -> ``Query`` records, and the tokenizers every stage shares."""
from tapo_megatron.data.queries import BadRow, DataError, QueryFile, load_queries
from tapo_megatron.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

__all__ = ["BadRow", "DataError", "HFTokenizer", "QueryFile", "Tokenizer", "load_queries", "load_tokenizer"]
