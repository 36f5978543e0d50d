"""Built-in evaluators, one file per evaluator. Importing this package registers them."""

from archbench.evaluators import alpha_ell  # noqa: F401
