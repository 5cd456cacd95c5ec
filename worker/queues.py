"""The broker's queue names, shared by the Celery shell and the health checks (which must
not import Celery)."""

PLAN_QUEUE = "plan"
SEND_QUEUE = "send"
QUEUES = (PLAN_QUEUE, SEND_QUEUE)
