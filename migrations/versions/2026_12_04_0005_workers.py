"""workers: the record of every applied step (its contributing ranks, those dropped, when), and each rank's last
gradient on the run (exactly once per rank and t, across restarts)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 23:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "step_record",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("t", sa.BigInteger(), nullable=False),
        sa.Column("contributors", sa.JSON(), nullable=False),
        sa.Column("dropped", sa.JSON(), nullable=False),
        sa.Column("base_t", sa.JSON(), nullable=True),
        sa.Column("received", sa.JSON(), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["run.id"], name=op.f("fk_step_record_run_id_run"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_step_record")),
        sa.UniqueConstraint("run_id", "t", name=op.f("uq_step_record_run_id_t")),
    )
    with op.batch_alter_table("step_record", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_step_record_run_id"), ["run_id"], unique=False)
    with op.batch_alter_table("run", schema=None) as batch_op:
        batch_op.add_column(sa.Column("worker_marks", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run", schema=None) as batch_op:
        batch_op.drop_column("worker_marks")
    with op.batch_alter_table("step_record", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_step_record_run_id"))
    op.drop_table("step_record")
