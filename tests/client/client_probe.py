"""Run inside a venv that has only the client wheel (python -I client_probe.py URL IDS_JSON): what a
backend service would do. Prints one JSON object; the calling test judges it."""
import asyncio
import importlib.util
import json
import sys

url, ids = sys.argv[1], json.loads(sys.argv[2])
absent = {name: importlib.util.find_spec(name) is None
          for name in ("torch", "onnxruntime", "tritonserver", "pytriton", "model_repository", "conversion",
                       "loadtests", "deploy", "client")}

from search_rank_client import AsyncSearchClient, InvalidRequest, RetryPolicy, SearchClient  # noqa: E402

# admission refusals (UNAVAILABLE) on a busy 2-core machine are retried, given the attempts
PATIENT = RetryPolicy(max_attempts=10, backoff_s=0.05, budget_tokens=0)


def invalid_argument(call):
    try:
        call()
    except InvalidRequest as err:
        return {"code": err.code, "message": err.message}
    return None


with SearchClient(url, timeout_s=30.0, retry=PATIENT) as c:
    blocking = {
        "rank": [[r.item_id, r.score] for r in c.rank("waterproof hiking boots", 3, ids, top_k=5)],
        "embed": c.embed("waterproof hiking boots").tolist(),
        "invalid": invalid_argument(lambda: c.rank("boots", 3, [ids[0], ids[0]])),
    }


async def main():
    async with AsyncSearchClient(url, timeout_s=30.0, retry=PATIENT) as c:
        ranked, emb = await asyncio.gather(c.rank("waterproof hiking boots", 3, ids, top_k=5),
                                           c.embed("waterproof hiking boots"))
        try:
            await c.rank("boots", 3, [ids[0], ids[0]])
            invalid = None
        except InvalidRequest as err:
            invalid = {"code": err.code, "message": err.message}
        return {"rank": [[r.item_id, r.score] for r in ranked], "embed": emb.tolist(), "invalid": invalid}


print(json.dumps({"python": sys.version.split()[0], "absent": absent, "blocking": blocking,
                  "asyncio": asyncio.run(main())}))
