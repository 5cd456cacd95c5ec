"""deliveries.queued_epoch: which broker life a pending row's task was published into

The broker can lose a queued task (Redis restarted without persistence, or with the last
second of its append-only file missing, a failover, a publish that failed after the rows
were committed). The recovery sweep re-enqueues pending rows whose task was published into
a broker life that no longer exists (another Redis run id), or never published at all
(NULL). Nullable, no default: rows planned before this revision count as never published
and the first sweep queues them once more (harmless: the atomic claim decides).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 13:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("queued_epoch", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("queued_epoch")
