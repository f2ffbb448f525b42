"""The public API: :class:`Teacher`, :func:`distill`, :class:`Student`, :func:`evaluate_models`.

A ten-line session::

    import fewstep
    teacher = fewstep.Teacher.cached("digits")             # train once (a few minutes on 2 cores), then reuse
    student = fewstep.distill(teacher, method="cd", steps=3000)
    images = student.sample(16, nfe=2, label=torch.arange(16) % 10)
    student.save("runs/digits-cd/student")
    report = fewstep.evaluate_models(teacher, [student])
    print(fewstep.format_table(report))
"""

from fewstep.conditions import TextCondition
from fewstep.data import DATASETS, load_dataset
from fewstep.eval.evaluate import evaluate_models, format_table
from fewstep.eval.levels import tune_levels
from fewstep.methods import METHODS
from fewstep.pipeline import build_method, distill
from fewstep.student import Student
from fewstep.teachers import Teacher

__all__ = ["DATASETS", "METHODS", "Student", "Teacher", "TextCondition", "build_method", "distill",
           "evaluate_models", "format_table", "load_dataset", "tune_levels"]
