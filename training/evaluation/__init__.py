"""The evaluation lab: references, metrics, stock samplers, the benchmark, the demo and the simulated preview loop."""
