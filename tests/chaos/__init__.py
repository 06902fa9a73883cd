"""The chaos soak: real processes on loopback, a fault schedule drawn from a seed, and an independent checker.

``python -m tests.chaos --help`` (or ``make chaos SEED=N MINUTES=M``) runs it; docs/reliability.md
("The chaos soak") says what it does and what the checker checks. One module per concern:

- ``cluster``: the Redis master, replica and three sentinels, and the Redis faults (stall, kill with failover, BUSY);
- ``workers``: the two real workers, their supervisor (every exit recorded, caused or not), kill/stop faults;
- ``apply`` / ``heatbridge``: the apply process and the HeatBridge stand-in (each its own process, each a log);
- ``tcpproxy``: the TCP proxy in front of RabbitMQ that the broker fault stops and starts;
- ``schedule`` / ``faults``: the seeded schedule and the runner that carries it out and records each window;
- ``collect``: the stream tail during the run and the final reads (stream, inflight, /metrics) after the drain;
- ``checker``: the checker on those files only, and its table (``table``);
- ``soak``: the orchestration, with every process and temporary folder cleaned up on any exit.
"""
