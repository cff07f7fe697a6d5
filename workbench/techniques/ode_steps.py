"""ode_steps: being written (nothing registered yet)."""
