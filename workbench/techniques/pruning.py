"""pruning: being written (nothing registered yet)."""
