"""Built-in evaluators, one file per evaluator. Importing this package registers them."""

from archbench.evaluators import (alpha_ell, depth_to_solve, error_by_k, layer_correspondence,  # noqa: F401
                                  layer_similarity, regime, skip_sensitivity, test_time_depth)
