"""sola_stream: training-free SoLA compression of LLMs, one decoder block at a time."""

__version__ = "0.2.0"


def load(path, dtype=None, device="cpu"):
    """A torch CausalLM from a compressed (or dense) sola_stream output directory."""
    from .loading import load as _load

    return _load(path, dtype=dtype, device=device)
