"""deliveries: the claim-time and message-id indexes hold only the rows that need them;
delivery_papers loses its index on paper_id

Every send writes a delivery three times (planned, claimed, recorded), and each write
that changes `state` adds an entry to every index of the table. Two of them only ever
answer questions about some rows:

- (state, claimed_at) serves the sweep and the recovery, which ask for `pending` and
  `sending` rows: it now holds those alone, so a settled row (most of an edition, and
  every edition of the past) leaves it, and its recorded version adds nothing to it;
- message_id serves the provider's events (`message_id IN (...)`): it now holds rows
  with an id, so the planned and claimed versions add nothing to it.

PostgreSQL only: SQLite, the small-scale default, keeps the full indexes (its planner
uses a partial index only for a query repeating its predicate word for word).

delivery_papers' index on paper_id served the foreign key to papers that migration 0008
dropped; every query of the table starts from a delivery (its primary key's first
column). Each email adds ~7 rows: 7 index entries fewer per email. Both databases.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01 23:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

LIVE = sa.text("state IN ('pending', 'sending')")
HAS_ID = sa.text("message_id IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("delivery_papers") as batch:
        batch.drop_index("ix_delivery_papers_paper_id")
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_deliveries_state_claimed", table_name="deliveries")
    op.create_index(
        "ix_deliveries_state_claimed",
        "deliveries",
        ["state", "claimed_at"],
        postgresql_where=LIVE,
    )
    op.drop_index("ix_deliveries_message_id", table_name="deliveries")
    op.create_index(
        "ix_deliveries_message_id", "deliveries", ["message_id"], postgresql_where=HAS_ID
    )


def downgrade() -> None:
    with op.batch_alter_table("delivery_papers") as batch:
        batch.create_index("ix_delivery_papers_paper_id", ["paper_id"], unique=False)
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_deliveries_message_id", table_name="deliveries")
    op.create_index("ix_deliveries_message_id", "deliveries", ["message_id"])
    op.drop_index("ix_deliveries_state_claimed", table_name="deliveries")
    op.create_index("ix_deliveries_state_claimed", "deliveries", ["state", "claimed_at"])
