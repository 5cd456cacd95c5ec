"""papers: arXiv categories, version, comment, DOI, and every source that gave the paper

One paper is one row whatever its sources: Hugging Face gives upvotes and its page, arXiv
gives categories (primary first), the version, the authors' comment and the DOI. Existing
rows get empty lists and NULLs (they were never merged).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("papers") as batch:
        batch.add_column(sa.Column("categories", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("arxiv_version", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("comment", sa.Text(), nullable=True))
        batch.add_column(sa.Column("doi", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("sources", sa.JSON(), nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("papers") as batch:
        for column in ("sources", "doi", "comment", "arxiv_version", "categories"):
            batch.drop_column(column)
