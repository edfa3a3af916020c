"""The language-model family: OPT, decoding, corpora and the recursive fine-tuning study."""
