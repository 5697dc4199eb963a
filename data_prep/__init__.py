"""Data preparation: text and image shards, cached vision features, synthetic data."""
