"""Benchmarks of blaq_jax: step time and memory (``step_time``), convergence per
unit of cost (``convergence``). Scripts that print and save numbers, not tests."""
