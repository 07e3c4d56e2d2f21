"""Typed gRPC client for the search-ranking bundle's `search_rank` and `text_embed` ensembles.

One channel per client, reused for every call; every call carries a deadline. Server errors come
back as `SearchError` subclasses carrying the gRPC status code and Triton's message (a malformed
request is `InvalidRequest`). The target may name several replicas (`search_rank_client.channel`):
calls are balanced round_robin, and a call that finds a replica gone (UNAVAILABLE) is retried
within its deadline, counted in `stats`. `SearchClient` blocks; `AsyncSearchClient` is the same
client for asyncio services.
"""
from search_rank_client import contract
from search_rank_client._blocking import SearchClient
from search_rank_client._common import (DEFAULT_URL, NEVER_RETRIED, CallStats, InvalidRequest, RankedItem,
                                        RetryBudget, RetryPolicy, SearchError)
from search_rank_client.aio import AsyncSearchClient
from search_rank_client.channel import ChannelSettings, ClientTls

__all__ = ["AsyncSearchClient", "CallStats", "ChannelSettings", "ClientTls", "DEFAULT_URL", "InvalidRequest",
           "NEVER_RETRIED", "RankedItem", "RetryBudget", "RetryPolicy", "SearchClient", "SearchError", "contract"]
__version__ = "0.2.0"
