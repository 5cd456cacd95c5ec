"""PostgreSQL: analyze the fast-growing send tables early

A new deployment's first big edition fills deliveries and delivery_papers from empty; with
the default autovacuum thresholds (10% of the table) the planner keeps its empty-table
statistics and scans delivery_papers sequentially twice per chunk. Analyze after 1,000
changed rows plus 1% instead. No-op on SQLite.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 03:40:00
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLES = ("deliveries", "delivery_papers", "delivery_attempts")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(
            f"ALTER TABLE {table} SET (autovacuum_analyze_scale_factor = 0.01, "
            "autovacuum_analyze_threshold = 1000)"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(
            f"ALTER TABLE {table} RESET (autovacuum_analyze_scale_factor, "
            "autovacuum_analyze_threshold)"
        )
