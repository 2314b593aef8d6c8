"""What a job ran, besides what it asked: the prompt with trigger words, the ControlNet, where the seed came from.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("prompt_used", sa.Text()))
        batch.add_column(sa.Column("controlnet", sa.JSON()))
        batch.add_column(sa.Column("seed_origin", sa.String(8)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("seed_origin")
        batch.drop_column("controlnet")
        batch.drop_column("prompt_used")
