"""Offline stages: data, embeddings, CF, tokenizer, recommender, evaluation and reports."""
