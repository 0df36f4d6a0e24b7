"""The only code that decodes video: decoding and sampling, dataset indexing, the synthetic sample data."""
