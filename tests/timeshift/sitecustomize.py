"""CI's second pass: every Python process of the suite runs with its clock moved ahead.

`.ci/run` puts this directory on PYTHONPATH with PAPERMAIL_TEST_TIME_SHIFT_DAYS set, so the
suite, its Celery workers, the `papermail` CLI and web processes it starts and the
SES-compatible server all import this at start-up and travel by the same offset (the wall
clock moves on from there; monotonic time, which only measures intervals, is untouched).
No test may depend on today's date: this is how that is proved.
"""

import os

_days = os.environ.get("PAPERMAIL_TEST_TIME_SHIFT_DAYS")
if _days:
    import time
    from datetime import UTC, datetime, timedelta

    import time_machine

    time_machine.travel(datetime.now(UTC) + timedelta(days=float(_days)), tick=True).start()
    # time-machine starts ticking at the first read: read now, so every process keeps the
    # same offset from the real clock however long its imports take.
    time.time()
