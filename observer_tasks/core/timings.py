"""Every fixed timing and bound of the observer, with its unit and why (the settings' defaults are in settings.py).

The interlocked ones must cover the ones they depend on: ``Settings`` derives the two that depend on settings
(``sweep_grace_ms``, ``visibility_timeout_s``) and tests/test_settings.py checks the rest. Nothing else in the
package defines a timing: a module that needs one imports it from here.
"""

from __future__ import annotations

# -- the apply layer's call ------------------------------------------------------------------------------------
#: Socket timeout of the apply layer's Redis calls (s): the most one call can stall its caller.
CALL_TIMEOUT_S = 0.05
#: Socket timeout of the outbox thread's own Redis connection (s): a stall up to this long is simply waited out.
OUTBOX_TIMEOUT_S = 1.0
#: Socket timeout of the outbox's broker connection (s): off the caller's path, but bounds the exit flush.
PUBLISH_TIMEOUT_S = 0.25
#: Calls and messages the outbox holds while Redis or the broker cannot take them; beyond it a call is refused
#: (counted as outbox_full) and a message is left to the sweeper.
OUTBOX_MAX = 10_000
#: Operations the outbox thread sends in one pipeline (or messages in one pass).
OUTBOX_BATCH = 500
#: After the outbox has caught up, callers keep handing their calls over for this long (s): a Redis just out of
#: a stall is busy with every client's backlog, and a caller must not pay the cap again for that.
HOLD_S = 0.5
#: After a failed attempt the outbox tries again after this (s), doubling up to RETRY_MAX_S while it fails: a
#: stall's end is seen within tens of ms, a dead service is not hammered.
RETRY_S = 0.05
RETRY_MAX_S = 0.4
#: The outbox opens the callers' Redis breaker once Redis has not answered it for this long (s): after it,
#: calls are handed over at once without trying Redis (still kept, up to OUTBOX_MAX).
RIDE_OUT_S = 2.0
#: A broker that has failed for this long (s) leaves the plans of the messages it refused to the sweeper.
BROKER_PATIENCE_S = 2.0
#: Admissions the outbox keeps after they were made (s): after it sees Redis fail, it admits those made this
#: long before the failure again (an admission asynchronous replication lost in a failover is then found).
RECHECK_WINDOW_S = 5.0
#: The exit flush gives up after this long (s); what is left is counted (calls) or the sweeper's (messages).
EXIT_FLUSH_S = 0.9
#: How often the outbox reads the wake path's health for the first looks' eta (s).
WAKE_HEALTH_READ_S = 1.0
#: How often an apply process writes its limits to Redis for `observer-tasks status` (s).
PRODUCER_REPORT_S = 10.0
#: Breakers: refuse at once for this long (s), doubling up to the max while failures continue.
BREAKER_FIRST_OPEN_S = 1.0
BREAKER_MAX_OPEN_S = 30.0
#: A problem is logged at most once per this period (s), with how many were not logged.
LOG_EVERY_S = 10.0

# -- the worker -------------------------------------------------------------------------------------------------
#: Socket timeout of the tasks' Redis client (s): a look that takes longer is a failed look.
LOOKUP_TIMEOUT_S = 0.5
#: Socket timeout of the worker main process's Redis clients (s): metrics, sweeper, heartbeat, wake step.
MAIN_TIMEOUT_S = 2.0
#: Socket timeout of the /metrics collector's Redis client (s): a scrape that meets a Redis which does not answer
#: (a script before busy-reply-threshold, a stall) still answers, with p28_metrics_redis_up 0, well within
#: Prometheus' scrape timeout; a scrape that timed out would read as the worker down (P28LateObsWorkersDown).
SCRAPE_REDIS_TIMEOUT_S = 0.5
#: How long a task keeps trying to record redis_error before leaving the plan to the sweeper (s).
RECORD_PATIENCE_S = 2.0
#: Least time a lease outlives its plan's deadline before the sweeper decides it (ms); see Settings.sweep_grace_ms.
MIN_SWEEP_GRACE_MS = 1_000
#: How often each worker's sweeper looks for leases past their end (s).
SWEEP_INTERVAL_S = 1.0
#: Most overdue plans one sweep step decides (plans; the sweeper pages through the rest).
SWEEP_BATCH = 200
#: How often each worker writes its heartbeat and the wake path's health to Redis (s).
HEARTBEAT_S = 0.5
#: A heartbeat (or the wake listener's wake step) slower than this means Redis did not answer in time (ms): the
#: worker records the window as a gap in what it could watch.
GAP_MIN_MS = 1_500
#: How long one healthy heartbeat vouches for the wake path (ms): four missed beats and the chains poll at POLL_MS.
WAKE_HEALTH_TTL_MS = 2_000
#: The wake listener's liveness check (s): after WAKE_PING_S without a byte it sends PING (and asks Sentinel
#: whether the master moved); a PING unanswered for WAKE_SILENT_S more means the connection is lost.
WAKE_PING_S = 1.0
WAKE_SILENT_S = 2.0
#: How long one read of the wake listener waits for a push before it checks whether to stop (s).
WAKE_READ_S = 0.5
#: Most plans handed to one wake step (one Redis call).
WAKE_BATCH = 500
#: Pause before the wake listener reconnects, doubling to WAKE_RECONNECT_MAX_S while Redis stays away (s).
WAKE_RECONNECT_S = 0.1
WAKE_RECONNECT_MAX_S = 2.0
#: A worker whose heartbeat is older than this is counted as gone (ms).
WORKER_STALE_MS = 10_000
#: A gone worker's heartbeat entry is removed after this (ms).
WORKER_FORGET_MS = 60_000
#: Least visibility timeout of the Redis broker (s): kombu restores a killed worker's messages after it.
MIN_VISIBILITY_TIMEOUT_S = 30
#: How long after a wake or sweep decision its final event is sent (s). Celery's event State lets a RETRY
#: overwrite any state, and events from two processes are ordered only by when they leave, so the first look's
#: RETRY must leave first: it leaves within RETRY_FRESH_S of the look that found the plan waiting, or not at all
#: (the plan then shows PENDING until its final state; worker/task_states.py). A RETRY takes ~1 ms, tens of ms on
#: a new connection or a loaded host: half a second is never reached in practice, and a final state 1 s late is
#: nothing to an operator (the stream and the counters have the plan at once).
FINAL_STATE_DELAY_S = 1.0
RETRY_FRESH_S = FINAL_STATE_DELAY_S / 2
#: After the broker refused a task event, the events are kept and tried again after this (s), on a new connection.
EVENTS_RETRY_S = 1.0
#: Task events the broker refused are kept (at most OUTBOX_MAX per process, the oldest dropped first) and sent
#: again for this long (s): long enough for the outages the observer rides out (a broker restart or failover, a
#: BUSY spell: seconds to minutes), so no plan stays PENDING or RETRY in Flower after one. A longer outage is an
#: incident read from the stream and the p28_* counters; its oldest events would only reach a Flower that lists
#: thousands of newer plans above them (and a worker restart loses kept events anyway: they are in memory).
EVENTS_KEEP_S = 600.0

# -- Redis data -----------------------------------------------------------------------------------------------
#: Stream length kept by XADD ... MAXLEN ~ (approximate trimming, entries).
STREAM_MAXLEN = 10_000
#: Redis outage windows kept in the gaps set (entries), and how long (ms): older ones cannot overlap a plan
#: still waiting to be decided.
GAPS_MAX = 1_000
GAPS_KEEP_MS = 3_600_000
