"""Celery settings of the late observer, derived from observer_tasks' settings object.

The observer's app loads this file as ``observer_tasks.core.celeryconfig`` (a link to it inside the
package, so it is installed with the package): it is never installed as a top-level ``celeryconfig``, so
another program's ``config_from_object("celeryconfig")`` cannot pick it up, and the observer's app never
picks up theirs.

A bad environment falls back to the defaults here only so that importing the
app never fails: the worker refuses bad settings in its start-up step (worker/services.py), and
the apply layer's calls return "error".
"""

from observer_tasks.core.messages import QUEUE
from observer_tasks.core.settings import Settings, SettingsError

try:
    _settings = Settings.from_env()
except SettingsError:
    _settings = Settings()

# The observer's broker: P28_LATE_OBS_BROKER_URL, else CELERY_BROKER_URL, else REDIS_URL (Settings.broker). Celery
# gives the CELERY_BROKER_URL variable precedence over broker_url in every app of a process, so the observer's
# broker goes into the read and write URLs (what every connection uses), which that variable does not
# override: an apply layer whose own Celery app uses CELERY_BROKER_URL keeps it, and this app keeps its own. A
# redis+sentinel:// broker becomes kombu's sentinel:// form, its master name in the transport options.
broker_url, _sentinel_options, broker_use_ssl = _settings.celery_broker()
broker_read_url = broker_write_url = broker_url
broker_connection_retry_on_startup = True
# A broker outage of any length is ridden out: the worker's consumer tries again for as long as it takes. Celery's
# default, 100 attempts, made the worker exit (`Unrecoverable error: OperationalError`) after ~46 min at kombu's
# pace, ~13 min behind three sentinels, ~33 s there at the guarded Redis transport's (kombu_guard.RECONNECT_S).
broker_connection_max_retries = None
# Results are never read: the stream and the counters are the results.
task_ignore_result = True
result_backend = None

# JSON only: a pickled message is refused by the worker.
task_serializer = "json"
accept_content = ["json"]
event_serializer = "json"

task_default_queue = QUEUE
if _settings.late_obs_queue_type == "quorum":
    # late_obs as a RabbitMQ quorum queue. Celery sends its countdowns through RabbitMQ's native delayed
    # delivery (whole seconds, which the settings enforce), which needs a topic exchange; Celery detects the
    # quorum queue and drops global QoS. Both the apply layer and the worker must read the same setting:
    # each declares the queue, and RabbitMQ refuses a declaration of another type.
    task_default_queue_type = "quorum"
    task_default_exchange_type = "topic"
task_routes = {"observer_tasks.late_*": {"queue": QUEUE}}

# Flower and celery-exporter see every plan's life (worker/task_states.py): observe_late's message sends
# task-sent (with the queue name), the first look sends task-retried when the plan still waits, and whoever
# decides the plan (a look, the wake step, the sweeper) sends its one task-succeeded with the outcome. The
# tasks send no other events (send_events=False on both), and the worker sends no task-sent for its own
# reschedules (worker/services.py): each event is a broker message. Task events stay on for the worker so
# that those events and its heartbeats go out.
worker_send_task_events = True
task_send_sent_event = True

# A killed worker's message comes back rather than vanishing; the ledger covers the rest.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 4
worker_concurrency = _settings.late_obs_max_workers
worker_pool = "threads"
worker_hijack_root_logger = True
worker_cancel_long_running_tasks_on_connection_loss = False

# Publishing never waits on a dead broker: no retries, short connect timeout.
task_publish_retry = False
broker_connection_timeout = 1.0

broker_transport_options = {
    # A killed worker's unacked messages come back after this; derived from the settings so it is longer
    # than any message is legitimately held (see Settings.visibility_timeout_s). The restore sweep runs
    # every 5 s instead of kombu's default ~100 s.
    "visibility_timeout": _settings.visibility_timeout_s,
    "unacked_restore_interval": 5,
    "unacked_restore_throttle": 1,
    # Above kombu's 1 s BRPOP wait, so a blocked read is not mistaken for a dead socket.
    "socket_timeout": 5.0,
    "socket_connect_timeout": 1.0,
    "max_retries": 0,
    # Named like the observer's own connections, so CLIENT LIST (and `observer-tasks status`) shows them.
    "client_name": "observer_tasks:broker",
    **_sentinel_options,
}
