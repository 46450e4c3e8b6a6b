"""The benchmark registry: `BENCHMARKS` (name -> Benchmark class), filled by the modules below.

Adding a benchmark is one module with one `@register_benchmark` class (see `base.Benchmark`)
and its import here.
"""

from src.eval.benchmarks import llava_bench, mmbench, mme, pope, scienceqa, vqa  # noqa: F401  (they register themselves)
from src.eval.benchmarks.base import BENCHMARKS, Benchmark, Question, Release, get_benchmark, register_benchmark

__all__ = ["BENCHMARKS", "Benchmark", "Question", "Release", "get_benchmark", "register_benchmark"]
