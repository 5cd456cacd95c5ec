"""deliveries.recipient: the subscriber's settings an edition was made for

Written when the edition's papers are recorded (address, topics, frequency, weekday,
send hour, time zone), so "view in browser" shows the edition as it was sent, its footer
included, whatever the subscriber changed or did since. Nullable: editions recorded
before this revision have none, and show the subscriber's current settings.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("recipient", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("recipient")
