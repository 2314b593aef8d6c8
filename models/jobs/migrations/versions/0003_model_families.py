"""The model family a job ran on and the family's own arguments (second prompt, SDXL sizes, refiner, guidance).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("family", sa.String(16)))
        batch.add_column(sa.Column("family_arguments", sa.JSON()))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("family_arguments")
        batch.drop_column("family")
