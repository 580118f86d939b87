"""The data layer: the embedded corpus (Austen, the World English Bible, Brown), the user's own text
files or a Hugging Face dataset, a fixed split by document, and token blocks.

    corpus = load_corpus()                       # austen, bible, brown; fetched once, then cached
    blocks = token_blocks(tok, corpus.train("austen"), block_size=1024)
    bpt = bytes_per_token(tok, corpus.heldout("brown"))
"""

from zoo.data.blocks import bytes_per_token, count_tokens, encode_texts, token_blocks
from zoo.data.cache import cache_dir
from zoo.data.corpus import Corpus, load_corpus, load_documents
from zoo.data.document import Document
from zoo.data.fetch import SourceUnavailable
from zoo.data.sources import EMBEDDED_SOURCES, OUT_OF_DOMAIN
from zoo.data.split import split_documents

__all__ = [
    "Corpus",
    "Document",
    "EMBEDDED_SOURCES",
    "OUT_OF_DOMAIN",
    "SourceUnavailable",
    "bytes_per_token",
    "cache_dir",
    "count_tokens",
    "encode_texts",
    "load_corpus",
    "load_documents",
    "split_documents",
    "token_blocks",
]
