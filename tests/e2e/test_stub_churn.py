"""Thousands of short streams at once straight to the ``llm`` model: the Python-backend stub of
Triton 2.51 frees objects without the GIL when a finished BLS response iterator is dropped
before its cleanup ran, and when a response carries outputs the request did not ask for
(trident.stub_objects). Before the adapters kept clear of both, this load aborted the ``llm``
stub ("malloc(): unaligned tcache chunk detected") or hung it within about 4,000 streams on 2
cores; every stream after that failed. The load is scripts/stress_llm_stub.py's, for 30 s."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from stress_llm_stub import abort_lines, churn  # noqa: E402

SECONDS = 30
THREADS = 48


def test_short_streams_churn_without_hurting_the_llm_stub(triton):
    texts, failures = churn(triton.grpc_url, seconds=SECONDS, clients=THREADS)
    assert not abort_lines(triton.log_path.read_text(errors="replace"))
    assert not failures, failures[:5]
    streams = sum(texts.values())
    assert streams >= 300, texts  # a few hundred at the least, even on a slow machine
    assert len(texts) == 1, texts  # greedy: every stream the same three tokens
