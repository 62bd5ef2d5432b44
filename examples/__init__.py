"""Runnable examples of blaq_jax."""
