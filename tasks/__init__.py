"""Built-in tasks, one file per task. Importing this package registers them."""

from archbench.tasks import (cfg_language, hop_induction, k_hop, language, modular_chain, teacher_student,  # noqa: F401
                             variable_binding, word_problem)
