"""CPU benchmark suite of ichflow (issue 10): ``python -m benchmarks run [--quick] [--only NAME]``."""
