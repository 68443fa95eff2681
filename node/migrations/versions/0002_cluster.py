"""Several nodes, one queue (issue 19): leases on claims, the node registry, the claim history
and the shared storage identity.

Rows an older node left ``running``/``sending`` get no holder and no lease: the first node
that starts on the upgraded database puts them back in the queue (node.queue.reap_expired).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

LEASED = ("jobs", "deliveries", "shadow_runs")


def upgrade() -> None:
    for table in LEASED:
        op.add_column(table, sa.Column("holder", sa.String(length=64), nullable=True))
        op.add_column(table, sa.Column("lease_until", sa.DateTime(), nullable=True))
        op.create_index(f"ix_{table}_holder", table, ["holder"])
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(length=64), primary_key=True, nullable=False),
        sa.Column("roles", sa.String(length=64), nullable=False,
                  server_default="receive,analyse,deliver"),
        sa.Column("host", sa.String(length=255), nullable=False, server_default=""),
        sa.Column("pid", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("version", sa.String(length=32), nullable=False, server_default=""),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False, index=True),
        sa.Column("state", sa.String(length=16), nullable=False, server_default="running"),
    )
    op.create_table(
        "claims",
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False, index=True),
        sa.Column("row_id", sa.Integer(), nullable=False, index=True),
        sa.Column("holder", sa.String(length=64), nullable=False, index=True),
        sa.Column("claimed_at", sa.DateTime(), nullable=False),
        sa.Column("released_at", sa.DateTime(), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
    )
    op.create_table(
        "cluster_settings",
        sa.Column("key", sa.String(length=64), primary_key=True, nullable=False),
        sa.Column("value", sa.Text(), nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_table("cluster_settings")
    op.drop_table("claims")
    op.drop_table("nodes")
    for table in LEASED:
        op.drop_index(f"ix_{table}_holder", table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("lease_until")
            batch.drop_column("holder")
