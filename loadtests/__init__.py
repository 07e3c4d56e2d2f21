"""Locust load tests that gate a release on latency, error-rate and throughput targets.

`python -m loadtests.run` (`make loadtest`) is the entry point; `locustfile.py` is the Locust side,
`traffic.py` the seeded request mix, `targets.py` the targets file and the PASS/FAIL check,
`metrics.py` the Triton Prometheus scraper, `report.py` the PNG and `sweep.py` the open-loop
rate sweep, `naive_server.py` the eager-PyTorch baseline server for side-by-side benchmarks. See
loadtests/README.md.
"""
