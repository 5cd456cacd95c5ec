"""deliveries: (edition_date, state, id) replaces (edition_date, state)

`papermail deliveries list` streams an edition's deliveries one state at a time in id
order. With (edition_date, state) only, PostgreSQL sorted every matching row before the
first one came out (890,000 `sent` rows of a 1M edition); with id as the third column the
index gives the order and the first rows come at once. It serves every query the old index
served (counts by state are index-only scans of it), so the old one is dropped.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 19:50:00
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_deliveries_edition_state_id", "deliveries", ["edition_date", "state", "id"])
    op.drop_index("ix_deliveries_edition_state", table_name="deliveries")


def downgrade() -> None:
    op.create_index("ix_deliveries_edition_state", "deliveries", ["edition_date", "state"])
    op.drop_index("ix_deliveries_edition_state_id", table_name="deliveries")
