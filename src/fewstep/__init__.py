"""fewstep: distil many-step diffusion and flow teachers into 1-4 step students, checked against exact
analytic teachers. Start with :class:`Teacher`, :func:`distill` and :func:`evaluate_models`."""

from fewstep.api import Student, Teacher, build_method, distill, evaluate_models
from fewstep.data import DATASETS, load_dataset
from fewstep.eval.evaluate import format_table
from fewstep.eval.levels import tune_levels
from fewstep.methods import METHODS

__version__ = "0.1.0"

__all__ = ["DATASETS", "METHODS", "Student", "Teacher", "build_method", "distill", "evaluate_models",
           "format_table", "load_dataset", "tune_levels"]
