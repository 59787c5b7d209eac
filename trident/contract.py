"""What the gateway and the Triton models agree on across the gRPC seam: one definition, imported
by both sides (no heavy imports here: the gateway loads this without numpy's engine code).
"""
from __future__ import annotations

#: Request parameter (bool) of the ``llm`` model: send one empty response as soon as the request
#: is validated and queued, before any text. The gateway asks for it so that a streaming client
#: gets its HTTP 200 and SSE heartbeats while the request waits for the engine, and every
#: validation error still arrives before that as an HTTP status.
ADMISSION_PARAMETER = "trident_admission_ack"
