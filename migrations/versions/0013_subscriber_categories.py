"""subscribers: arXiv category filters (keep only some categories, exclude others)

Two JSON lists of arXiv names, like ``topics``: ``categories_only`` (a paper's primary
category must be one of them, or in one of their archives) and ``categories_exclude`` (none
of its categories may be). Existing subscribers get empty lists: no filter.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 20:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("subscribers") as batch:
        batch.add_column(
            sa.Column("categories_only", sa.JSON(), nullable=False, server_default="[]")
        )
        batch.add_column(
            sa.Column("categories_exclude", sa.JSON(), nullable=False, server_default="[]")
        )


def downgrade() -> None:
    with op.batch_alter_table("subscribers") as batch:
        batch.drop_column("categories_exclude")
        batch.drop_column("categories_only")
