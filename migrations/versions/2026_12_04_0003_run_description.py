"""run description: what the API tells of a run, written with its records (listing runs loads none)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("run", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lrs", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("groups", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("group_sizes", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("skipped_steps", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("rejected_steps", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("last_snapshot_t", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("last_snapshot_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("state_bytes", sa.BigInteger(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("run", schema=None) as batch_op:
        for column in (
            "state_bytes",
            "last_snapshot_at",
            "last_snapshot_t",
            "rejected_steps",
            "skipped_steps",
            "group_sizes",
            "groups",
            "lrs",
        ):
            batch_op.drop_column(column)
