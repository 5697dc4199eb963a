"""GhostVis: an open trainer for vision-language models."""

__version__ = "0.1.0"


def load_pretrained(path, device="cpu"):
    """Load an exported checkpoint directory: returns (model in eval mode, tokenizer, config)."""
    from ghostvis.checkpoint_io import load_pretrained as _load

    return _load(path, device=device)
