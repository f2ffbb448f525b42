"""fewstep: distil many-step diffusion and flow teachers into 1-4 step students, checked against exact
analytic teachers. Start with :class:`Teacher`, :func:`distill` and :func:`evaluate_models`."""

from fewstep.api import (
    DATASETS,
    METHODS,
    Student,
    Teacher,
    TextCondition,
    build_method,
    distill,
    evaluate_models,
    format_table,
    load_dataset,
    tune_levels,
)

__version__ = "0.1.0"

__all__ = ["DATASETS", "METHODS", "Student", "Teacher", "TextCondition", "build_method", "distill",
           "evaluate_models", "format_table", "load_dataset", "tune_levels"]
