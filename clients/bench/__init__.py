"""`omnibus bench`: a seeded load generator for a running Omnibus server, with vLLM's serving metrics.

workloads (what to send) -> arrivals (when) -> runner (send over gRPC, record timestamps)
-> metrics (TTFT, TPOT, ITL, E2E, throughput) -> report (table, JSON) -> plots (PNG from JSONs).
"""
