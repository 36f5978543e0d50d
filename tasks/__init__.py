"""Built-in tasks, one file per task. Importing this package registers them."""

from archbench.tasks import lm_char, teacher_student  # noqa: F401
