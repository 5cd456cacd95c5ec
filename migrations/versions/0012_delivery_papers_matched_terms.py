"""delivery_papers.matched_terms: what in the paper matched the topic

The email's reason line names it ("Because you follow graph neural networks: message
passing, node embeddings"); recorded with the pick, so a retry and "view in browser" say what
the email said. A JSON list of strings; NULL for rows recorded before and for picks that
matched no topic.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 20:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("delivery_papers") as batch_op:
        batch_op.add_column(sa.Column("matched_terms", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("delivery_papers") as batch_op:
        batch_op.drop_column("matched_terms")
