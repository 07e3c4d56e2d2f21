"""Locust users that call the `search_rank` and `text_embed` ensembles over gRPC.

    locust -f loadtests/locustfile.py --headless -H 127.0.0.1:8001 -u 8 -r 8 -t 60s \
        --catalog build/model_repository/ranker/1/catalog ClosedLoopUser

`python -m loadtests.run` (`make loadtest`) wraps this with a local server, metrics scraping,
the plot and the targets table. Two user classes:

- ClosedLoopUser: each user sends one request, waits for the answer, thinks, repeats. Load
  adapts to the server (the classic "N concurrent callers").
- OpenLoopUser: requests arrive at a constant total rate (--arrival-rate, per second) whether or
  not earlier ones have been answered, each in a greenlet of its own, so queueing beyond
  capacity shows up as growing latency and DEADLINE_EXCEEDED failures instead of silently
  lowering the offered load. The rate is split evenly over the open-loop users (-u), also
  across workers in distributed mode.

Every request is reported to Locust's request event with its latency measured around the
client call and, on failure, an exception whose text starts with the gRPC status name. At the
end (master or single process) the achieved numbers are checked against the targets profile and
`environment.process_exit_code` is set, so Locust's own exit code gates the pipeline.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Locust monkey-patches the standard library on import; gRPC's gevent integration must come after
# that and before any channel exists, or every blocking call stalls the whole process.
import gevent
import gevent.pool
from locust import User, events, task
from locust.runners import MasterRunner, WorkerRunner

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

from search_rank_client import SearchClient, SearchError  # noqa: E402  (after init_gevent)
from loadtests import targets as targets_mod  # noqa: E402
from loadtests import traffic  # noqa: E402

log = logging.getLogger("loadtests.locustfile")


@dataclass
class _State:
    """Per-process state: the request stream (shared by all users, so the k-th request is fixed),
    the in-flight counter that proves requests really overlap, and the open clients."""

    stream: traffic.RequestStream | None = None
    inflight: int = 0
    max_inflight: int = 0
    worker_max_inflight: dict[str, int] = field(default_factory=dict)
    # Think-time jitter only shapes timing, not content, so it need not follow the traffic seed.
    jitter: random.Random = field(default_factory=random.Random)
    clients: list[SearchClient] = field(default_factory=list)


def _close_clients() -> None:
    # Close channels while the gevent hub still runs instead of leaving them to __del__ during
    # interpreter teardown (users killed at quit never reach on_stop); see _exit_without_teardown.
    while STATE.clients:
        STATE.clients.pop().close()


STATE = _State()


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    g = parser.add_argument_group("search-rank load test")
    g.add_argument("--catalog", default="build/model_repository/ranker/1/catalog",
                   help="catalog artifact folder the request mix is generated from")
    g.add_argument("--seed", type=int, default=2024, help="traffic seed (workers add their index)")
    g.add_argument("--targets", default=str(targets_mod.DEFAULT_TARGETS), help="targets file")
    g.add_argument("--targets-profile", default="cpu", help="profile in the targets file (cpu, gpu)")
    g.add_argument("--results-file", default="", help="write the targets check (JSON) here")
    g.add_argument("--request-timeout", type=float, default=2.0, help="gRPC deadline per call, seconds")
    g.add_argument("--think-time", type=float, default=0.1,
                   help="ClosedLoopUser: mean pause between requests, seconds (uniform 0.5x..1.5x)")
    g.add_argument("--arrival-rate", type=float, default=10.0, help="OpenLoopUser: requests/s in total")
    g.add_argument("--arrival-users", type=int, default=0,
                   help="OpenLoopUser: how many open-loop users share the rate (default: -u)")
    g.add_argument("--max-inflight", type=int, default=500,
                   help="OpenLoopUser: in-flight cap per user; arrivals beyond it fail as CLIENT_OVERLOAD")


@events.init.add_listener
def _on_init(environment, **_kw) -> None:
    opts = environment.parsed_options
    # Custom options travel from the master to the workers, -u does not: pin the user count the
    # open-loop rate is divided by here, on the process that knows it.
    if opts is not None and not isinstance(environment.runner, WorkerRunner) and not opts.arrival_users:
        opts.arrival_users = max(1, int(opts.num_users or 1))


@events.test_start.add_listener
def _on_test_start(environment, **_kw) -> None:
    STATE.inflight = STATE.max_inflight = 0
    if isinstance(environment.runner, MasterRunner):
        return  # the master sends no requests
    opts = environment.parsed_options
    seed = opts.seed + (environment.runner.worker_index if isinstance(environment.runner, WorkerRunner) else 0)
    STATE.stream = traffic.RequestStream(traffic.CatalogData.load(opts.catalog), seed=seed)
    log.info("traffic: seed %d, catalog %s", seed, opts.catalog)


@events.report_to_master.add_listener
def _report(client_id, data, **_kw) -> None:
    data["max_inflight"] = STATE.max_inflight


@events.worker_report.add_listener
def _worker_report(client_id, data, **_kw) -> None:
    if "max_inflight" in data:
        STATE.worker_max_inflight[client_id] = max(STATE.worker_max_inflight.get(client_id, 0), data["max_inflight"])


@events.test_stop.add_listener
def _on_test_stop(environment, **_kw) -> None:
    _close_clients()


@events.quitting.add_listener
def _on_quitting(environment, **_kw) -> None:
    _close_clients()
    if isinstance(environment.runner, WorkerRunner):
        return  # only the master (or a single process) has the whole run's statistics
    opts = environment.parsed_options
    profile = targets_mod.load_profile(opts.targets, opts.targets_profile)
    achieved = targets_mod.achieved_from_locust_stats(environment.stats, traffic.REQUEST_NAMES)
    checks = targets_mod.evaluate(profile, achieved)
    passed = targets_mod.all_passed(checks)
    crashed = bool(environment.runner.exceptions) if environment.runner else False
    failed = sum(not c.passed for c in checks)
    if opts.results_file:  # run.py prints the table from the results file
        log.info("targets: %d of %d lines failed (%s, profile %s)", failed, len(checks), opts.targets,
                 opts.targets_profile)
    else:
        log.info("targets (%s, profile %s):\n%s", opts.targets, opts.targets_profile, targets_mod.format_table(checks))
    # Set explicitly either way: request failures are judged by the error-rate targets, not by
    # Locust's default "any failure exits 1"; exceptions in user code still fail the run.
    environment.process_exit_code = 0 if passed and not crashed else 1
    if opts.results_file:
        max_inflight = max([STATE.max_inflight, *STATE.worker_max_inflight.values()])
        fp_seed = opts.seed  # the stream a single process (or worker 0) sends
        fp = traffic.fingerprint(traffic.RequestStream(traffic.CatalogData.load(opts.catalog), seed=fp_seed).take(200))
        summary = targets_mod.Summary(
            profile=opts.targets_profile, targets_file=str(opts.targets), checks=targets_mod.checks_to_json(checks),
            achieved={k: dict(asdict(v), error_rate=v.error_rate) for k, v in achieved.items()},
            max_inflight=max_inflight, mode=",".join(opts.user_classes or [u.__name__ for u in environment.user_classes]),
            seed=opts.seed, traffic_fingerprint=fp, passed=passed and not crashed)
        Path(opts.results_file).write_text(json.dumps(asdict(summary), indent=2))


@events.quit.add_listener
def _exit_without_teardown(exit_code, **_kw) -> None:
    # gRPC's gevent integration can hang in interpreter teardown (a channel closed from __del__
    # while garbage-collecting; seen on about one worker exit in three). Locust has written every
    # report and chosen its exit code by now, so leave right after sys.exit's own flushing.
    def hard_exit() -> None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)

    atexit.register(hard_exit)


class SearchUser(User):
    """One gRPC channel per user (the project's client), requests from the shared seeded stream."""

    abstract = True

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.search = SearchClient(self.host, timeout_s=opts.request_timeout)
        STATE.clients.append(self.search)

    def on_stop(self) -> None:
        if self.search in STATE.clients:
            STATE.clients.remove(self.search)
            self.search.close()

    def send(self, request: traffic.Request) -> None:
        exception: Exception | None = None
        length = 0
        STATE.inflight += 1
        STATE.max_inflight = max(STATE.max_inflight, STATE.inflight)
        start = time.perf_counter()
        try:
            if isinstance(request, traffic.RankRequest):
                ranked = self.search.rank(request.query, request.user_id, request.candidate_ids, top_k=request.top_k)
                length = len(ranked)
            else:
                length = int(self.search.embed(request.text).size)
        except SearchError as e:  # str(e) starts with the gRPC status name, e.g. "DEADLINE_EXCEEDED: ..."
            exception = e
        except Exception as e:  # not from the server: name it so it never hides among gRPC codes
            exception = RuntimeError(f"CLIENT_{type(e).__name__}: {e}")
        finally:
            STATE.inflight -= 1
        self.environment.events.request.fire(
            request_type="grpc", name=request.name, response_time=(time.perf_counter() - start) * 1000,
            response_length=length, exception=exception, context={})


class ClosedLoopUser(SearchUser):
    def wait_time(self) -> float:
        think = self.environment.parsed_options.think_time
        return think * (0.5 + STATE.jitter.random())

    @task
    def call(self) -> None:
        self.send(next(STATE.stream))


class OpenLoopUser(SearchUser):
    def wait_time(self) -> float:
        return 0.0  # pacing happens inside the task, against absolute arrival times

    def on_start(self) -> None:
        super().on_start()
        opts = self.environment.parsed_options
        self.interval_s = max(1, opts.arrival_users) / opts.arrival_rate
        self.pool = gevent.pool.Pool(opts.max_inflight)
        self.next_arrival = time.perf_counter()

    def on_stop(self) -> None:
        # Let requests already sent finish (they carry a deadline), then close the channel.
        self.pool.join(timeout=self.environment.parsed_options.request_timeout + 1)
        self.pool.kill()
        super().on_stop()

    @task
    def arrive(self) -> None:
        self.next_arrival += self.interval_s
        delay = self.next_arrival - time.perf_counter()
        if delay > 0:
            gevent.sleep(delay)
        request = next(STATE.stream)
        if self.pool.full():
            self.environment.events.request.fire(
                request_type="grpc", name=request.name, response_time=0.0, response_length=0, context={},
                exception=RuntimeError(f"CLIENT_OVERLOAD: {self.pool.size} requests in flight"))
            return
        self.pool.spawn(self.send, request)
