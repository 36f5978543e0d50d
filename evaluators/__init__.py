"""Built-in evaluators, one file per evaluator. Importing this package registers them."""

from archbench.evaluators import alpha_ell, depth_to_solve, test_time_depth  # noqa: F401
