"""Hypothesis profiles for the fuzz tests (tests/core/test_fuzz_*.py).

`fast` (the default, what `make test` runs) keeps every fuzz test to a few seconds; `fuzz` (`make fuzz`, or
HYPOTHESIS_PROFILE=fuzz, or pytest's --hypothesis-profile=fuzz) runs many more examples. Generated inputs touch real
files and often the `datasets` loader, so no example has a deadline: a slow disk must not fail a test.
"""

import os

from hypothesis import HealthCheck, settings

# Fuzz tests build their files in fresh folders per example, so a function-scoped fixture (tmp_path) shared by all
# examples is fine; the data they draw is large by design (huge lines, deep nesting).
_RELAXED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
            HealthCheck.large_base_example]

settings.register_profile("fast", max_examples=25, deadline=None, suppress_health_check=_RELAXED, print_blob=True)
settings.register_profile("fuzz", max_examples=600, deadline=None, suppress_health_check=_RELAXED, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
