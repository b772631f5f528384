"""Pure math: whitening, decomposition, rank allocation, one block's compression."""
