"""Load tests and benchmarks that gate a release: latency, error-rate, throughput, overload.

`python -m loadtests.run` (`make loadtest`) is the Locust entry point; `locustfile.py` is the Locust
side, `traffic.py` the seeded request mix, `targets.py` the targets file and the PASS/FAIL check,
`metrics.py` the Triton Prometheus scraper, `report.py` the PNG and `sweep.py` the open-loop rate
sweep. Without Locust: `grpc_load.py` is a lean raw-gRPC load engine, `overload.py` the 3x-capacity
admission check (`make bench-overload`), `side_by_side.py` the comparison with `naive_server.py`,
an eager-PyTorch baseline server, and Triton FP32 (`make bench`). `bench_item_encoding.py` measures
offline item encoding, one process vs Ray Data actors (`make bench-encoding`, docs/catalog.md).
See loadtests/README.md.
"""
