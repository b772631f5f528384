"""Scoring models block by block: perplexity, zero-shot tasks, lm-eval configs, reports."""
