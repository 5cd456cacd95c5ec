"""delivery_papers: no foreign key to papers

Every chunk records the papers of its ~200 deliveries (about 1,200 rows) in one INSERT,
and the foreign key to ``papers`` checked each row with its own ``SELECT … FOR KEY SHARE``
(a text key) on the same few hundred paper rows that every other worker's chunk locks at
that moment. EXPLAIN ANALYZE of 1,200 rows on PostgreSQL 15 (three runs each):
the statement took 42-49 ms without that key and 63-93 ms with it, its trigger 27-55 ms.
Papers are never deleted by papermail, the rows come from the candidates just loaded, and
every reader joins ``papers`` explicitly, so the key guarded nothing. The key to
``deliveries`` stays (its cascade removes a delivery's papers with it).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 20:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

FK = "fk_delivery_papers_paper_id_papers"


def upgrade() -> None:
    with op.batch_alter_table("delivery_papers") as batch_op:
        batch_op.drop_constraint(FK, type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("delivery_papers") as batch_op:
        batch_op.create_foreign_key(FK, "papers", ["paper_id"], ["id"], ondelete="CASCADE")
