"""Continual learning with function-space-distance regularizers (METHOD.md section 4).

- :class:`FSDRegularizer`: ``after_task(model, data, outputs)`` / ``penalty(model)``, for any training loop;
- :func:`run_method`: the regularized loop over a :class:`TaskStream` (a sequence of :class:`Task` s);
  :func:`train_task` trains on one task (or several, jointly) with a regularizer;
- :data:`METHODS`: method name -> estimator and config; :data:`BENCHMARKS`: the paper's benchmarks;
  :func:`load_stream_data` and :func:`build_stream` make a benchmark's task stream for one seed;
- :func:`run_benchmark`: several methods and seeds -> ``results.json``, ``table.md``, heatmaps
  (``laftr continual`` on the command line), as :class:`ContinualSettings` say (checked once constructed).
"""

from ..data.tasks import Task, TaskStream
from .benchmarks import ARCHS, BENCHMARKS, BenchmarkSpec, build_stream, get_benchmark, load_stream_data
from .methods import METHODS, TRAITS, MethodSpec, parse_method, parse_methods
from .metrics import average_accuracy, backward_transfer
from .regularizer import FSDRegularizer
from .runner import ContinualSettings, run_benchmark
from .train import RunResult, TrainConfig, evaluate_task, run_method, train_task

__all__ = [
    "ARCHS",
    "BENCHMARKS",
    "METHODS",
    "TRAITS",
    "BenchmarkSpec",
    "ContinualSettings",
    "FSDRegularizer",
    "MethodSpec",
    "RunResult",
    "Task",
    "TaskStream",
    "TrainConfig",
    "average_accuracy",
    "backward_transfer",
    "build_stream",
    "evaluate_task",
    "get_benchmark",
    "load_stream_data",
    "parse_method",
    "parse_methods",
    "run_benchmark",
    "run_method",
    "train_task",
]
