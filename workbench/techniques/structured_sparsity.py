"""structured_sparsity: being written (nothing registered yet)."""
