"""deliveries.waiting_for: an edition held back until the day's papers are fetched

When the beat plans an edition whose day's papers have not been fetched yet (every source
in PAPERMAIL_SOURCES with a successful fetch), the row waits: waiting_for = 'papers' and
scheduled_at = the deadline (send time + PAPERMAIL_FETCH_WAIT_MINUTES). Nothing claims,
sweeps or sends such a row; the fetch, or the beat at the deadline, releases or skips it.
Nullable: every existing row is not waiting.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 18:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("waiting_for", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("waiting_for")
