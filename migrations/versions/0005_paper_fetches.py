"""paper_fetches and fetch_validators: the scheduled fetch of each source, and its cache

paper_fetches records every run of the daily fetch (or `papers fetch`) for a source and
date: status (ok, not_modified, failed), counts, bytes, the error, the first page's
validators. Editions wait for a successful one (see worker.papers.fetch.ready).
fetch_validators keeps the ETag / Last-Modified a source sent for each URL whose papers
are stored, so a repeated fetch is a conditional request answered 304.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 17:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import worker.models

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "paper_fetches",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("fetch_date", sa.Date(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", worker.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", worker.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("pages", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("papers", sa.Integer(), nullable=False),
        sa.Column("new", sa.Integer(), nullable=False),
        sa.Column("updated", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("etag", sa.String(length=255), nullable=True),
        sa.Column("last_modified", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "status IN ('ok', 'not_modified', 'failed')",
            name=op.f("ck_paper_fetches_fetch_status_valid"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_paper_fetches")),
    )
    op.create_index(
        "ix_paper_fetches_date_source", "paper_fetches", ["fetch_date", "source"], unique=False
    )
    op.create_table(
        "fetch_validators",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("etag", sa.String(length=255), nullable=True),
        sa.Column("last_modified", sa.String(length=64), nullable=True),
        sa.Column("updated_at", worker.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fetch_validators")),
        sa.UniqueConstraint("source", "url", name=op.f("uq_fetch_validators_source_url")),
    )


def downgrade() -> None:
    op.drop_table("fetch_validators")
    op.drop_index("ix_paper_fetches_date_source", table_name="paper_fetches")
    op.drop_table("paper_fetches")
