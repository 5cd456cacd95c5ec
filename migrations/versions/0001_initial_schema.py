"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-27 02:10:50.021141
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import worker.models

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "control_flags",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.Column("updated_at", worker.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_control_flags")),
    )
    op.create_table(
        "papers",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("abstract", sa.Text(), nullable=False),
        sa.Column("authors", sa.JSON(), nullable=False),
        sa.Column("upvotes", sa.Integer(), nullable=False),
        sa.Column("published_at", worker.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("ingested_at", worker.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", worker.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("pdf_url", sa.Text(), nullable=True),
        sa.Column("hf_url", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_papers")),
    )
    with op.batch_alter_table("papers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_papers_ingested_at"), ["ingested_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_papers_published_at"), ["published_at"], unique=False)

    op.create_table(
        "subscribers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("topics", sa.JSON(), nullable=False),
        sa.Column("max_papers", sa.Integer(), nullable=False),
        sa.Column("frequency", sa.String(length=8), nullable=False),
        sa.Column("weekday", sa.Integer(), nullable=True),
        sa.Column("send_hour", sa.Integer(), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("paused_until", sa.Date(), nullable=True),
        sa.Column("suppressed_at", worker.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("suppression_reason", sa.Text(), nullable=True),
        sa.Column("soft_bounce_count", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("created_at", worker.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", worker.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("confirmed_at", worker.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("unsubscribed_at", worker.models.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "frequency IN ('daily', 'weekly')", name=op.f("ck_subscribers_frequency_valid")
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'active', 'paused', 'unsubscribed', 'bounced', 'complained')",
            name=op.f("ck_subscribers_status_valid"),
        ),
        sa.CheckConstraint(
            "max_papers BETWEEN 1 AND 50", name=op.f("ck_subscribers_max_papers_range")
        ),
        sa.CheckConstraint(
            "send_hour BETWEEN 0 AND 23", name=op.f("ck_subscribers_send_hour_range")
        ),
        sa.CheckConstraint(
            "weekday IS NULL OR weekday BETWEEN 0 AND 6", name=op.f("ck_subscribers_weekday_range")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscribers")),
        sa.UniqueConstraint("email", name=op.f("uq_subscribers_email")),
    )
    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_subscribers_status"), ["status"], unique=False)

    op.create_table(
        "deliveries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("subscriber_id", sa.Integer(), nullable=False),
        sa.Column("edition_date", sa.Date(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.String(length=255), nullable=True),
        sa.Column("rfc_message_id", sa.String(length=255), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("skip_reason", sa.Text(), nullable=True),
        sa.Column("scheduled_at", worker.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", worker.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", worker.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("claimed_at", worker.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("sent_at", worker.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", worker.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", worker.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("bounced_at", worker.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("complained_at", worker.models.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'sending', 'sent', 'delivered', 'bounced', 'complained', 'skipped', 'failed', 'unknown')",
            name=op.f("ck_deliveries_state_valid"),
        ),
        sa.ForeignKeyConstraint(
            ["subscriber_id"],
            ["subscribers.id"],
            name=op.f("fk_deliveries_subscriber_id_subscribers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
        sa.UniqueConstraint(
            "subscriber_id", "edition_date", name="uq_deliveries_subscriber_edition"
        ),
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_deliveries_edition_state", ["edition_date", "state"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_deliveries_message_id"), ["message_id"], unique=False)
        batch_op.create_index("ix_deliveries_state_claimed", ["state", "claimed_at"], unique=False)

    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("subscriber_id", sa.Integer(), nullable=False),
        sa.Column("paper_id", sa.String(length=64), nullable=False),
        sa.Column("vote", sa.Integer(), nullable=False),
        sa.Column("created_at", worker.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", worker.models.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("vote IN (-1, 1)", name=op.f("ck_feedback_vote_valid")),
        sa.ForeignKeyConstraint(
            ["paper_id"],
            ["papers.id"],
            name=op.f("fk_feedback_paper_id_papers"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["subscriber_id"],
            ["subscribers.id"],
            name=op.f("fk_feedback_subscriber_id_subscribers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
        sa.UniqueConstraint("subscriber_id", "paper_id", name="uq_feedback_subscriber_paper"),
    )
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_feedback_subscriber_id"), ["subscriber_id"], unique=False
        )

    op.create_table(
        "subscriber_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("subscriber_id", sa.Integer(), nullable=False),
        sa.Column("at", worker.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("actor", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["subscriber_id"],
            ["subscribers.id"],
            name=op.f("fk_subscriber_log_subscriber_id_subscribers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscriber_log")),
    )
    with op.batch_alter_table("subscriber_log", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_subscriber_log_subscriber_id"), ["subscriber_id"], unique=False
        )

    op.create_table(
        "delivery_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "delivery_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("started_at", worker.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", worker.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("message_id", sa.String(length=255), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("actor", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["deliveries.id"],
            name=op.f("fk_delivery_attempts_delivery_id_deliveries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_attempts")),
    )
    with op.batch_alter_table("delivery_attempts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_delivery_attempts_delivery_id"), ["delivery_id"], unique=False
        )

    op.create_table(
        "delivery_papers",
        sa.Column(
            "delivery_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("paper_id", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("matched_topic", sa.Text(), nullable=True),
        sa.Column("score", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["deliveries.id"],
            name=op.f("fk_delivery_papers_delivery_id_deliveries"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["paper_id"],
            ["papers.id"],
            name=op.f("fk_delivery_papers_paper_id_papers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("delivery_id", "paper_id", name=op.f("pk_delivery_papers")),
    )
    with op.batch_alter_table("delivery_papers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_delivery_papers_paper_id"), ["paper_id"], unique=False)

    op.create_table(
        "provider_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("dedupe_key", sa.String(length=255), nullable=False),
        sa.Column("event_type", sa.String(length=32), nullable=False),
        sa.Column("subtype", sa.String(length=64), nullable=True),
        sa.Column("provider_message_id", sa.String(length=255), nullable=True),
        sa.Column(
            "delivery_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("recipients", sa.JSON(), nullable=False),
        sa.Column("occurred_at", worker.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("received_at", worker.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("via", sa.String(length=16), nullable=False),
        sa.Column("orphan", sa.Boolean(), nullable=False),
        sa.Column("raw", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["deliveries.id"],
            name=op.f("fk_provider_events_delivery_id_deliveries"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provider_events")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_provider_events_dedupe_key")),
    )
    with op.batch_alter_table("provider_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_provider_events_delivery_id"), ["delivery_id"], unique=False
        )
        batch_op.create_index("ix_provider_events_message", ["provider_message_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("provider_events", schema=None) as batch_op:
        batch_op.drop_index("ix_provider_events_message")
        batch_op.drop_index(batch_op.f("ix_provider_events_delivery_id"))

    op.drop_table("provider_events")
    with op.batch_alter_table("delivery_papers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_delivery_papers_paper_id"))

    op.drop_table("delivery_papers")
    with op.batch_alter_table("delivery_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_delivery_attempts_delivery_id"))

    op.drop_table("delivery_attempts")
    with op.batch_alter_table("subscriber_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_subscriber_log_subscriber_id"))

    op.drop_table("subscriber_log")
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_feedback_subscriber_id"))

    op.drop_table("feedback")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_state_claimed")
        batch_op.drop_index(batch_op.f("ix_deliveries_message_id"))
        batch_op.drop_index("ix_deliveries_edition_state")

    op.drop_table("deliveries")
    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_subscribers_status"))

    op.drop_table("subscribers")
    with op.batch_alter_table("papers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_papers_published_at"))
        batch_op.drop_index(batch_op.f("ix_papers_ingested_at"))

    op.drop_table("papers")
    op.drop_table("control_flags")
